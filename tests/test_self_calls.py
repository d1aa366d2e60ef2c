"""Source rules over every module of the package (an AST scan, imports inside functions included):

* the package never starts itself through a code string (``python -c "..."``) or through its own command
  line (an ``nnunet-ext ...`` argv): a workflow calls the function, and where it needs a fresh process it
  spawns one on a function reference (``python -m nnunet_ext.cluster.call module:function JSON``);
* every atomic write goes through nnunet_ext.core.safety (``atomic_output`` and the writers built on it):
  no other module renames a temporary file into place (``os.replace``) or names one by hand (``.tmp``).
"""
import ast
import re
from pathlib import Path

import nnunet_ext

ROOT = Path(nnunet_ext.__file__).parent
SAFETY = ROOT / "core" / "safety.py"


def _modules():
    return sorted(p for p in ROOT.rglob("*.py") if "vendor" not in p.parts)


def _strings(node):
    """Constant strings of a node, f-string parts included."""
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            yield n.value


def _is_python(elt) -> bool:
    """``sys.executable`` or a literal ``python``/``python3``."""
    if isinstance(elt, ast.Attribute) and elt.attr == "executable":
        return True
    return isinstance(elt, ast.Constant) and isinstance(elt.value, str) and re.fullmatch(r"python3?", elt.value)


def self_calls(source: str) -> list[str]:
    """The places in ``source`` that run Python on a code string or build an ``nnunet-ext`` argv."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.List, ast.Tuple)) and len(node.elts) >= 2:
            first, second = node.elts[0], node.elts[1]
            if _is_python(first) and isinstance(second, ast.Constant) and second.value == "-c":
                found.append(f"line {node.lineno}: [python, '-c', ...]")
            if isinstance(first, ast.Constant) and first.value == "nnunet-ext":
                found.append(f"line {node.lineno}: ['nnunet-ext', ...]")
        if isinstance(node, ast.Call) and any(s == "nnunet-ext" for a in node.args for s in _strings(a)) and \
                getattr(node.func, "id", getattr(node.func, "attr", "")) in ("nnunet_command", "which"):
            found.append(f"line {node.lineno}: the nnunet-ext console command looked up to be run")
    return found


def hand_written_temporaries(source: str) -> list[str]:
    """``os.replace`` calls and ``.tmp`` names made by hand in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "replace" \
                and getattr(node.func.value, "id", None) == "os":
            found.append(f"line {node.lineno}: os.replace")
        if isinstance(node, ast.Constant) and isinstance(node.value, str):  # f-string parts included
            s = node.value
            # a shell script's own temporary-and-mv is the shell's atomic write, not Python's
            if re.search(r"(^|[/.\w])\.tmp(_|\b)", s) and "mv -f" not in s:
                found.append(f"line {node.lineno}: {s!r}")
    return found


def test_the_scanners_find_what_they_look_for():
    bad_calls = ('import sys, subprocess\nsubprocess.run([sys.executable, "-c", "print(1)"])\n'
                 'argv = ["nnunet-ext", "predict", "-i", "x"]\nx = [nnunet_command("nnunet-ext"), "pseudolabel"]\n'
                 'y = ("python3", "-c", code)\n')
    assert len(self_calls(bad_calls)) == 4
    ok_calls = ('import sys\nargv = [sys.executable, "-m", "nnunet_ext.cluster.call", "m:f", "{}"]\n'
                'print("nnunet-ext predict -i in -o out")\n')
    assert self_calls(ok_calls) == []
    bad_tmp = ('import os\ntmp = p.with_name(f".tmp_{os.getpid()}_{p.name}")\nos.replace(tmp, p)\n'
               't2 = root / f".{name}.sbatch.tmp"\n')
    assert len(hand_written_temporaries(bad_tmp)) == 3
    assert hand_written_temporaries('from nnunet_ext.core.safety import atomic_output\n'
                                    'with atomic_output(p) as tmp:\n    tmp.write_text("x")\n') == []


def test_no_module_runs_python_on_a_code_string_or_its_own_command_line():
    found = {str(p.relative_to(ROOT)): f for p in _modules() if (f := self_calls(p.read_text()))}
    assert found == {}


def test_every_atomic_write_goes_through_core_safety():
    found = {str(p.relative_to(ROOT)): f for p in _modules() if p != SAFETY
             and (f := hand_written_temporaries(p.read_text()))}
    assert found == {}
