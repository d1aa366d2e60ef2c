"""Progress output: plain lines off a terminal, a tqdm bar on one, --quiet / --verbose; and --version."""
import io

import pytest

from nnunet_ext.core import progress
from nnunet_ext.cli import run
from nnunet_ext.core.errors import run_cli


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def level(monkeypatch):
    def set_level(v):
        monkeypatch.setenv(progress.ENV, str(v))

    monkeypatch.delenv(progress.ENV, raising=False)
    return set_level


def _count_lines(out):
    return [int(ln.split(": ")[1].split("/")[0]) for ln in out.splitlines()]


def test_plain_lines_at_every_tenth(level):
    # 25 items: a line at the first, then every ceil(25 / 10) = 3 items (3, 6, ..., 24) and at the last (25)
    out = io.StringIO()
    with progress.Progress("phantom", 25, stream=out) as bar:
        for _ in range(25):
            bar.update()
    assert "\r" not in out.getvalue()
    assert _count_lines(out.getvalue()) == [1, 3, 6, 9, 12, 15, 18, 21, 24, 25]
    assert out.getvalue().splitlines()[-1] == "phantom: 25/25 cases"


def test_verbose_one_line_per_item_with_its_name(level):
    level(2)
    out = _Terminal()  # --verbose writes lines also on a terminal
    for k, case in enumerate(["a", "b", "c"], 1):
        progress.step("evaluate", k, 3, item=case, stream=out)
    assert out.getvalue().splitlines() == ["evaluate: 1/3 cases (a)", "evaluate: 2/3 cases (b)", "evaluate: 3/3 cases (c)"]


@pytest.mark.parametrize("how", ["env", "argument"])
def test_quiet_writes_nothing(level, how):
    out = io.StringIO()
    if how == "env":
        level(0)
    with progress.Progress("x", 5, stream=out, enabled=how != "argument") as bar:
        for _ in range(5):
            bar.update()
    assert out.getvalue() == ""


def test_terminal_gets_a_tqdm_bar(level):
    out = _Terminal()
    for k in range(1, 5):
        progress.step("predict", k, 4, stream=out)
    text = out.getvalue()
    assert "\r" in text and "predict: 100%" in text and "4/4" in text  # tqdm's bar, redrawn in place


def test_cli_quiet_and_verbose_anywhere(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    args = ["phantom", "-d", "9", "--cases", "2", "--shape", "24", "24", "24", "--raw", str(tmp_path / "q")]
    assert run_cli(run, args + ["--quiet"]) == 0
    assert [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("phantom:")] == []
    args[-1] = str(tmp_path / "v")
    assert run_cli(run, ["--verbose"] + args) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("phantom:")]
    assert lines == [f"phantom: {k}/2 cases (phantom_{k - 1:03d})" for k in (1, 2)]
    assert progress.ENV not in __import__("os").environ  # the level does not outlive the command
    assert run_cli(run, ["--quiet", "--verbose", "trainers-path"]) == 2
    assert "--quiet and --verbose" in capsys.readouterr().err


def test_version(capsys):
    import nnunet_ext

    with pytest.raises(SystemExit) as e:
        run(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"nnunet-ext {nnunet_ext.__version__}"
