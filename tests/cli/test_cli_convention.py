"""One command-line convention: the shared options (-d, -f, -o, -c, -p, -tr, -i, -chk, -device, -np/-npp/-nps,
--overwrite) are declared alike by every command that has them; every option of every command has a help
line; every documented ``nnunet-ext`` command (README, docs/, each command's own examples) parses and passes
its argument checks; older spellings still work with one warning line."""
import argparse
import contextlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from nnunet_ext.cli import build_parser, options
from nnunet_ext.cli.main import verb_modules

REPO = Path(__file__).resolve().parents[2]


def _docs_examples():
    """tests/e2e/test_docs_examples.py (its extraction of the shell blocks of README.md and docs/)."""
    spec = importlib.util.spec_from_file_location("_docs_examples", REPO / "tests" / "e2e" / "test_docs_examples.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def commands(parser=None, path=()):
    """(command path, parser) of every command and subcommand."""
    parser = parser or build_parser()
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from commands(sub, path + (name,))
    if path and not any(isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        yield " ".join(path), parser


COMMANDS = dict(commands())

# commands by the -f default rule they follow
USE_MODELS = {"predict", "pseudolabel", "lesion-metrics", "select", "submission build"}
TRAIN = {"compare", "consensus train", "train"}
# the demo is a fixed recipe (docs/demo.md): its defaults are the documented run's; `submission test` runs a
# submission's entrypoint locally, on the CPU unless told otherwise
RECIPE_DEFAULTS = {("demo", "-d"): "501", ("demo", "-f"): [0], ("demo", "-device"): "cpu",
                   ("demo", "-c"): "2d", ("submission test", "-device"): "cpu"}

# option -> what every declaration must share: option strings, type, choices, nargs, default
EXPECTED = {
    "-d": (("-d", "--dataset"), None, None, None, None),
    "-f": (("-f", "--folds"), options.fold, None, "+", None),
    "-i": (("-i", "--input"), None, None, None, None),
    "-chk": (("-chk",), None, None, None, "checkpoint_final.pth"),
    "-device": (("-device",), None, None, None, "cuda"),
    "-npp": (("-npp",), int, None, None, None),
    "-nps": (("-nps",), int, None, None, None),
    "--overwrite": (("--overwrite",), None, None, 0, False),
}


def _declarations(flag):
    for name, p in COMMANDS.items():
        for a in p._actions:
            if flag in a.option_strings:
                yield name, a


@pytest.mark.parametrize("flag", sorted(EXPECTED))
def test_shared_option_is_declared_alike_everywhere(flag):
    """Fails when two commands declare the option with other long forms, types, choices, arity or defaults
    (before: -f in 6 variants, -d in 3, -device with and without --device)."""
    found = list(_declarations(flag))
    assert len(found) >= (1 if flag in ("-npp", "-nps") else 2), found
    for name, a in found:
        default = RECIPE_DEFAULTS.get((name, flag), EXPECTED[flag][4])
        got = (tuple(a.option_strings), a.type, a.choices, a.nargs, a.default)
        assert got == EXPECTED[flag][:4] + (default,), (name, got)


def test_np_o_c_p_tr_are_spelled_alike():
    """-np/--num-processes (int; its default is each command's own work size), -o/--output (a folder, or the
    result JSON for the single-result commands), -c/--configuration, -p/--plans, -tr/--trainer(s)."""
    for name, a in _declarations("-np"):
        assert (tuple(a.option_strings), a.type) == (("-np", "--num-processes"), int), name
    outputs = dict(_declarations("-o"))
    assert sorted(outputs) == ["compare", "consensus evaluate", "consensus predict", "evaluate", "fuse",
                               "operating-points", "predict", "select", "submission build"]  # not pseudolabel
    for name, a in outputs.items():
        assert tuple(a.option_strings) == ("-o", "--output") and a.type is None, name
        assert a.metavar == ("FILE.json" if name in options.FILE_OUTPUT else "FOLDER"), name
    assert set(options.FILE_OUTPUT) <= set(outputs)
    for name, a in _declarations("-c"):
        assert tuple(a.option_strings) == ("-c", "--configuration"), name
        assert a.dest == ("configurations" if a.nargs == "+" else "configuration"), name
    for name, a in _declarations("-p"):
        assert tuple(a.option_strings) == ("-p", "--plans") and a.dest == "plans", name
    for name, a in _declarations("-tr"):
        assert tuple(a.option_strings) == (("-tr", "--trainers") if a.nargs == "+" else ("-tr", "--trainer")), name


def test_folds_default_rule_is_said_in_help():
    """-f's default is every fold: every trained fold where models are used, every fold of the split where
    models are trained; the help says which."""
    seen = set()
    for name, a in _declarations("-f"):
        seen.add(name)
        if name in USE_MODELS:
            assert a.help.endswith(f"(default: {options.FOLDS_TRAINED})"), name
        elif name in TRAIN:
            assert a.help.endswith(f"(default: {options.FOLDS_SPLIT})"), name
        else:
            assert name == "demo" and "(default: 0 " in a.help
    assert seen == USE_MODELS | TRAIN | {"demo"}


def test_prediction_processes_default_as_nnunet(monkeypatch):
    """-npp/-nps: nnUNetv2_predict's 3 (or $nnUNet_npp/$nnUNet_nps); -np N sets both; given values win."""
    p = build_parser()
    base = ["predict", "-i", "x", "-o", "y", "-d", "1", "-c", "2d"]
    monkeypatch.delenv("nnUNet_npp", raising=False)
    monkeypatch.delenv("nnUNet_nps", raising=False)
    assert options.prediction_processes(p.parse_args(base)) == (3, 3)
    assert options.prediction_processes(p.parse_args(base + ["-np", "2"])) == (2, 2)
    assert options.prediction_processes(p.parse_args(base + ["-np", "2", "-nps", "5"])) == (2, 5)
    monkeypatch.setenv("nnUNet_npp", "4")
    assert options.prediction_processes(p.parse_args(base)) == (4, 3)


def test_every_option_has_a_help_line_and_every_command_examples():
    """Each command's --help (in process) lists every option with its help text and ends with examples."""
    parser = build_parser()
    for name, p in COMMANDS.items():
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            parser.parse_args(name.split() + ["--help"])
        assert e.value.code == 0
        text = " ".join(out.getvalue().split())
        for a in p._actions:
            assert a.help and a.help != argparse.SUPPRESS, (name, a.option_strings or a.dest)
            if not isinstance(a, argparse._HelpAction):
                words = " ".join((a.help % {"default": a.default, "prog": p.prog}).split())
                assert words[:40] in text, (name, a.option_strings, words[:40])
        assert re.match(r"examples?:\n  ", p.epilog or "") and f"nnunet-ext {name}" in p.epilog, name


def test_console_script_help_and_version():
    exe = Path(sys.executable).parent / "nnunet-ext"
    r = subprocess.run([str(exe), "predict", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    for flag in ("-npp NPP", "-nps NPS", "-chk CHECKPOINT", "-device DEVICE", "-f FOLD [FOLD ...], --folds FOLD"):
        assert flag in r.stdout, flag
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    from nnunet_ext import __version__

    assert r.returncode == 0 and r.stdout.strip() == f"nnunet-ext {__version__}"


def _check(argv):
    """Parse ``argv`` and run the shared and the command's own argument checks (what `nnunet-ext` does before
    any work)."""
    args = build_parser().parse_args(argv)
    options.check(args)
    module = verb_modules()[args.command]
    if hasattr(module, "check"):
        module.check(args)
    return args


def test_documented_commands_parse_and_pass_their_checks(tmp_path, monkeypatch):
    """Every ``nnunet-ext`` command of README.md and docs/ (not the synopses, which show optional parts in
    brackets) parses and passes the argument checks (parses only, where a placeholder ``...`` stands for a
    folder); so does every example of every command's --help."""
    docs = _docs_examples()
    monkeypatch.chdir(tmp_path)
    lines = []
    for f, n, m, text in docs.shell_blocks():
        if m and m.group("why") and "synopsis" in m.group("why"):
            continue
        lines += [(f"{f.name}:{n}", t) for t in docs._commands(text) if Path(t[0]).name == "nnunet-ext"]
    for name, p in COMMANDS.items():
        for line in (p.epilog or "").split("\n"):
            line = re.sub(r"\s#.*$", "", line.strip())
            if line.startswith("nnunet-ext ") and "..." not in line and "[" not in line:
                lines.append((f"{name} --help", line.replace("$(", "").split()))
    assert len(lines) > 60
    bad = []
    for where, tokens in lines:
        args = [t for t in tokens[1:] if t not in ("--debug", "--quiet", "--verbose")]
        try:
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), \
                    warnings.catch_warnings():
                warnings.simplefilter("error")  # no documented command uses a deprecated spelling
                _check(args) if "..." not in args else build_parser().parse_args(args)
        except SystemExit as e:
            if e.code != 0:
                bad.append(f"{where}: {' '.join(tokens)}")
        except (ValueError, NotImplementedError, FutureWarning) as e:
            bad.append(f"{where}: {' '.join(tokens)}: {e}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("argv,old,new,dest,value", [
    (["phantom", "--dataset-id", "7"], "--dataset-id", "-d/--dataset", "dataset", "7"),
    (["pseudolabel", "-d", "1", "-c", "2d", "-i", "u", "-o", "Dataset002_S"], "-o", "--student", "student",
     "Dataset002_S"),
    (["consensus", "split-raters", "-d", "1", "--folds", "3"], "--folds", "-nfolds/--nfolds", "n_folds", 3),
    (["demo", "--fold", "1"], "--fold", "-f/--folds", "folds", [1]),
    (["compare", "-d", "1", "-c", "2d", "-tr", "A", "B", "--device", "cpu"], "--device", "-device", "device", "cpu"),
    (["select", "-d", "1", "--configurations", "2d", "3d_fullres"], "--configurations", "-c/--configuration",
     "configurations", ["2d", "3d_fullres"]),
    (["plan-native", "-d", "1", "--plans-name", "P"], "--plans-name", "-p/--plans", "plans", "P"),
])
def test_older_spellings_still_work_with_one_warning(argv, old, new, dest, value):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    assert [(x.category, str(x.message)) for x in w] == [(FutureWarning, f"{old} is deprecated; use {new}")]


def test_deprecated_spelling_is_one_warning_line_from_the_console(tmp_path):
    exe = Path(sys.executable).parent / "nnunet-ext"
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    r = subprocess.run([str(exe), "phantom", "--dataset-id", "0", "--raw", str(tmp_path)], capture_output=True,
                       text=True, timeout=120, env=env)
    assert r.returncode == 2
    assert r.stderr.splitlines() == ["nnunet-ext: warning: --dataset-id is deprecated; use -d/--dataset",
                                     "nnunet-ext: error: -d/--dataset must be in 1..999, got 0"]


@pytest.mark.parametrize("argv", [
    ["pseudolabel", "-d", "Dataset501_T", "-c", "2d", "-tr", "LSRTrainer", "-f", "0", "all", "-i", "/u", "--student",
     "Dataset601_S", "--alpha", "0.1", "--ignore-uncertain", "--soft-rim", "0.5", "-device", "cpu", "-npp", "2"],
    ["compare", "-d", "1", "-c", "2d", "-tr", "A", "B", "-f", "0", "1", "--epochs", "3", "--thresholds", "0.2", "0.7",
     "--launcher", "slurm", "--sbatch-arg=--qos=long", "--mem", "4G", "-o", "out"],
    ["phantom", "-d", "3", "--site-spacing", "1", "1", "1", "--site-spacing", "1", "1", "3", "--cohort", "all"],
])
def test_argv_of_writes_a_command_line_that_parses_back(argv):
    """The one place a command line is written from parsed options (compare's report), checked on rich ones."""
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = COMMANDS[argv[0]]
    again = parser.parse_args([argv[0], *options.argv_of(sub, args)])
    assert vars(again) == vars(args)
    assert options.argv_of(sub, parser.parse_args(argv[:1] + ["-d", "1"] + (["-c", "2d", "-tr", "A", "B"]
                                                                          if argv[0] == "compare" else
                                                                          ["-c", "2d", "-i", "u"]
                                                                          if argv[0] == "pseudolabel" else []))) \
        == ["-d", "1"] + (["-c", "2d", "-tr", "A", "B"] if argv[0] == "compare" else
                          ["-c", "2d", "-i", "u"] if argv[0] == "pseudolabel" else [])  # defaults left out


def test_a_new_dataset_takes_its_id_from_either_form():
    p = build_parser()
    assert options.new_dataset(p.parse_args(["phantom", "-d", "7"])) == (7, None)
    assert options.new_dataset(p.parse_args(["phantom", "-d", "Dataset007_Foo"])) == (7, "Foo")
    assert options.new_dataset(p.parse_args(["phantom", "-d", "Dataset007_Foo"]), "Foo") == (7, "Foo")
    with pytest.raises(ValueError, match="-d Dataset007_Foo names the dataset Foo, --name Bar"):
        options.new_dataset(p.parse_args(["phantom", "-d", "Dataset007_Foo"]), "Bar")
    for bad in ("0", "1000", "Foo", "Dataset7_Foo", "../Dataset007_Foo"):
        with pytest.raises(ValueError, match="-d/--dataset"):
            _check(["phantom", "-d", bad])


def test_verb_modules_register_what_they_list():
    """main assembles the verbs from the modules' COMMANDS; each registers exactly those (a new verb is one
    module)."""
    import nnunet_ext.cli.main as main

    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(top.choices) == list(verb_modules())
    for name in main.VERBS:
        mod = importlib.import_module(f"nnunet_ext.cli.{name}")
        sub = argparse.ArgumentParser().add_subparsers()
        mod.register(sub)
        assert tuple(sub.choices) == mod.COMMANDS, name


def test_evaluate_presets_are_the_metrics_presets():
    """The --preset choices are listed once in the CLI and must be the presets the metrics know."""
    from nnunet_ext.cli.evaluate import PRESETS, RULE_PRESETS
    from nnunet_ext.metrics.evaluate import PRESETS as METRIC_PRESETS
    from nnunet_ext.metrics.lesions import RULE_PRESETS as METRIC_RULES

    assert set(PRESETS) == set(METRIC_PRESETS)
    assert set(RULE_PRESETS) <= set(METRIC_RULES)


def test_no_cli_function_is_longer_than_80_lines():
    import ast

    long = []
    for f in sorted((REPO / "nnunet_ext" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{f.name}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
