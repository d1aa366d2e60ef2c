"""The ``nnunet-ext`` command line: argument parsing over the importable functions of the layers below.

``build_parser()`` and ``run(argv)`` (returns the exit status) are importable from here; they live in
:mod:`nnunet_ext.cli.main`, which also holds ``main()``, the command with the error contract of
:mod:`nnunet_ext.core.errors`. The console script's entry point is :mod:`nnunet_ext.cli._console`, which
handles Ctrl-C before anything slow is imported: this package therefore imports nothing until one of its
names is used.
"""

__all__ = ["build_parser", "run"]


def __getattr__(name: str):
    if name in __all__:
        from importlib import import_module

        return getattr(import_module("nnunet_ext.cli.main"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
