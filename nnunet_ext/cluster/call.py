"""One function of this package in a fresh Python process: what the launcher's tasks and the consensus
cascade's parallel predictions run.

    python -m nnunet_ext.cluster.call nnunet_ext.workflows.consensus:prepare '{"dataset": "540", "stage": 1, ...}'

:func:`function_argv` writes that command line for a module-level function and its keyword arguments
(JSON); the process imports the module, calls the function and ends with the command line's error
contract (:func:`nnunet_ext.core.errors.run_cli`: an expected error is one line and exit status 2). Nothing of
the ``nnunet-ext`` command line is parsed again: the task is the function and its arguments.
"""
from __future__ import annotations

import importlib
import json
import sys


def function_ref(function) -> str:
    """``"module:name"`` of a module-level function of this package (or that string, checked)."""
    ref = function if isinstance(function, str) else f"{function.__module__}:{function.__qualname__}"
    module, _, name = ref.partition(":")
    if not module.startswith("nnunet_ext.") or not name.isidentifier():
        raise ValueError(f"function {ref!r}: a module-level function of nnunet_ext (module:name) is expected")
    return ref


def function_argv(function, **kwargs) -> list[str]:
    """The command line that calls ``function(**kwargs)`` in a fresh process of this Python (the arguments
    must be JSON: strings, numbers, booleans, None, lists and dicts of them)."""
    return [sys.executable, "-m", "nnunet_ext.cluster.call", function_ref(function), json.dumps(kwargs)]


def _call(argv: list[str]) -> int:
    if len(argv) != 2:
        raise ValueError("usage: python -m nnunet_ext.cluster.call MODULE:FUNCTION JSON_KEYWORD_ARGUMENTS")
    module, _, name = function_ref(argv[0]).partition(":")
    kwargs = json.loads(argv[1])
    if not isinstance(kwargs, dict):
        raise ValueError(f"{argv[0]}: the keyword arguments must be a JSON object, got {argv[1][:80]!r}")
    getattr(importlib.import_module(module), name)(**kwargs)
    return 0


def main(argv: list[str] | None = None) -> int:
    from nnunet_ext.core.errors import run_cli

    return run_cli(_call, list(sys.argv[1:] if argv is None else argv), console=argv is None)


if __name__ == "__main__":
    sys.exit(main())
