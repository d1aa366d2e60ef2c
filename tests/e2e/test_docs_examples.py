"""The documentation as a user reads it: every shell example in README.md and docs/ is either run here (on the
phantom, at a tiny budget) or says why not; every ``nnunet-ext`` command in the examples parses; the
README's first screen fits 40 lines; pictures exist and are small; no words about how the package was made.

Markers, on the line before a shell block:

    <!-- example: runs in tests -->
    <!-- example: not run in tests (REASON[, REASON]) -->     REASON: one of REASONS below
"""
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_ext.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", REPO / "CHANGELOG.md"] + sorted((REPO / "docs").glob("*.md"))
SHELL = {"bash", "sh", "shell", "console"}
RUNS = "runs in tests"
MARKER = re.compile(r"^<!-- example: (runs in tests|not run in tests \((?P<why>[^)]+)\)) -->$")
REASONS = {"needs real data", "needs a GPU", "needs Slurm", "needs Docker", "sets up the environment",
           "installs packages", "synopsis", "benchmark", "shows a generated file"}

# what makes a runnable example tiny: the phantom and the budget (every runnable block must use them as written)
TINY = [("NNUNET_EXT_NUM_EPOCHS=20 NNUNET_EXT_ITERATIONS=20",
         "NNUNET_EXT_NUM_EPOCHS=1 NNUNET_EXT_ITERATIONS=2 NNUNET_EXT_VAL_ITERATIONS=1"),
        ("--cases 20 --test-cases 6 --shape 64 64 64", "--cases 5 --test-cases 1 --shape 24 24 24")]

# words about how the package was developed, not about what it does
PROCESS_WORDS = [r"\bsessions?\b", r"\bissues? ?(\d+|:)", r"\(issue\b", r"-issue-", r"\bpre-issue\b",
                 r"\bhelpers? [A-H]\b", r"\bthe lead\b", r"\bengineers?\b", r"\bworking tree\b",
                 r"\bgit (show|stash|checkout|reset)\b", r"\b(was|were) renamed\b", r"\bbefore the renaming\b",
                 r"\b(first|second|third|fourth|fifth|sixth) (session|round of work)\b", r"\bas first built\b",
                 r"\bthis (PR|pull request)\b", r"\bTODO\b"]


def shell_blocks():
    """(file, line number, marker match or None, text) of every fenced shell block."""
    out = []
    for f in DOCS:
        lines = f.read_text().split("\n")
        i = 0
        while i < len(lines):
            m = re.match(r"^```(\w*)\s*$", lines[i])
            if m and m.group(1):
                j = i + 1
                while j < len(lines) and not lines[j].startswith("```"):
                    j += 1
                if m.group(1) in SHELL:
                    prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
                    out.append((f, i + 1, MARKER.match(prev.strip()), "\n".join(lines[i + 1:j])))
                i = j + 1
            else:
                i += 1
    return out


def _where(f, line):
    return f"{f.relative_to(REPO)}:{line}"


def test_every_shell_example_is_marked():
    blocks = shell_blocks()
    assert len(blocks) > 30
    unmarked = [_where(f, n) for f, n, m, _ in blocks if m is None]
    assert not unmarked, f"shell examples without an example marker: {unmarked}"
    for f, n, m, _ in blocks:
        if m.group("why"):
            reasons = {r.strip() for r in m.group("why").split(",")}
            assert reasons <= REASONS, f"{_where(f, n)}: unknown reason(s) {reasons - REASONS}"
    assert sum(1 for *_, m, _ in blocks if m.group(1) == RUNS) >= 2


def _commands(text):
    """Each simple command of a shell block as tokens (comments dropped, continuations joined)."""
    text = re.sub(r"\\\n", " ", text)
    for line in text.split("\n"):
        line = re.sub(r"(^|\s)#.*$", "", line)
        for part in re.split(r"&&|;|\|\|", line):
            try:
                tokens = shlex.split(part)
            except ValueError:
                continue
            while tokens and re.match(r"^[A-Za-z_]\w*=", tokens[0]):
                tokens = tokens[1:]
            if tokens:
                yield tokens


def _subparser(parser, tokens):
    """The (sub)parser a command's tokens select, and the tokens after the subcommand names."""
    while parser._subparsers is not None and tokens:
        action = parser._subparsers._group_actions[0]
        if tokens[0] not in action.choices:
            break
        parser, tokens = action.choices[tokens[0]], tokens[1:]
    return parser, tokens


def test_nnunet_ext_commands_in_examples_parse():
    """Every ``nnunet-ext`` command of every example parses with the command's own parser; in synopses
    (which show optional parts in brackets) every option exists."""
    parser = build_parser()
    bad, seen = [], 0
    for f, n, m, text in shell_blocks():
        synopsis = bool(m and m.group("why") and "synopsis" in m.group("why"))
        for tokens in _commands(text):
            if not Path(tokens[0]).name == "nnunet-ext":
                continue
            seen += 1
            args = [t for t in tokens[1:] if t not in ("--debug", "--quiet", "--verbose")]
            if synopsis:
                sub, rest = _subparser(parser, [t.strip("[]") for t in args])
                for t in rest:
                    opt = re.match(r"^\[?(-{1,2}[A-Za-z][\w-]*)", t)
                    if opt and opt.group(1) not in sub._option_string_actions:
                        bad.append(f"{_where(f, n)}: {' '.join(tokens[:2])}: no option {opt.group(1)}")
                continue
            try:
                with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                    parser.parse_args(args)
            except SystemExit as e:
                if e.code != 0:  # 0: --version / --help
                    bad.append(f"{_where(f, n)}: {' '.join(tokens)}")
    assert seen > 40
    assert not bad, "\n".join(bad)


def test_no_development_process_words():
    hits = []
    for f in DOCS:
        for k, line in enumerate(f.read_text().split("\n"), 1):
            for w in PROCESS_WORDS:
                if re.search(w, line, flags=re.I if w != r"\bTODO\b" else 0):
                    hits.append(f"{_where(f, k)}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_readme_first_screen():
    text = (REPO / "README.md").read_text()
    first = text[:text.index("\n## What is here\n")].split("\n")
    assert len(first) <= 40, len(first)
    screen = "\n".join(first)
    assert "bash scripts/setup.sh && .venv/bin/nnunet-ext demo" in screen
    assert "bash scripts/setup.sh --test && .venv/bin/python -m pytest -q" in screen
    assert "![" in screen and "docs/img/demo_curves.png" in screen
    assert "| part |" not in screen  # the long table comes after


def _anchors(md: Path) -> set:
    """GitHub's heading anchors of a Markdown file (lower case, punctuation dropped, spaces to hyphens)."""
    out = set()
    for line in md.read_text().split("\n"):
        m = re.match(r"^#{1,6} (.+?)\s*$", line)
        if m:
            text = re.sub(r"[`*]", "", m.group(1)).lower()
            out.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return out


def test_links_and_pictures():
    """Relative links of README and docs point at files (and at headings that exist); pictures exist under
    docs/img and are < 150 KB."""
    missing, big = [], []
    for f in DOCS:
        for target, frag in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", f.read_text()):
            if re.match(r"^[a-z]+://", target) or target.startswith("mailto:"):
                continue
            p = (f.parent / target).resolve() if target else f
            if not p.exists():
                missing.append(f"{_where(f, 0)} -> {target}")
                continue
            if frag and p.suffix == ".md" and frag not in _anchors(p):
                missing.append(f"{_where(f, 0)} -> {target}#{frag} (no such heading)")
            elif p.suffix == ".png":
                assert p.is_relative_to(REPO / "docs" / "img"), target
                if p.stat().st_size >= 150_000:
                    big.append(f"{target}: {p.stat().st_size} bytes")
    assert not missing, "\n".join(missing)
    assert not big, "\n".join(big)


def _tiny(text):
    for old, new in TINY:
        text = text.replace(old, new)
    assert not re.search(r"NNUNET_EXT_NUM_EPOCHS=(?!1\b)", text), "a runnable example with another budget"
    assert not re.search(r"--cases (?!5\b)", text), "a runnable example with another phantom size"
    return text


@pytest.mark.slow
@pytest.mark.heavy  # every runnable example of the docs on the phantom (about 140 s): CI's heavy part
def test_runnable_examples_run(tmp_path):
    """Each block marked as run, as a bash script in a fresh folder (the package's console commands on PATH),
    with the phantom and budget made tiny; every JSON it writes with ``-o`` exists and holds results."""
    runnable = [(f, n, text) for f, n, m, text in shell_blocks() if m.group(1) == RUNS]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "NNUNET_EXT_"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    for k, (f, n, text) in enumerate(runnable):
        work = tmp_path / f"example_{k}"
        work.mkdir()
        script = "set -euo pipefail\n" + _tiny(text) + "\n"
        r = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=1200)
        assert r.returncode == 0, f"{_where(f, n)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        outputs = re.findall(r"-o (\S+\.json)", text)
        assert outputs, _where(f, n)
        for o in outputs:
            res = json.loads((work / o).read_text())
            assert res, f"{_where(f, n)}: {o} is empty"


@pytest.mark.slow  # draws four figures (seconds)
def test_doc_figures_regenerate(tmp_path):
    """benchmarks/make_doc_figures.py draws every picture of docs/img it owns from the stored results, each
    under 150 KB (it exits non-zero otherwise), with the names the docs use."""
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_doc_figures.py"), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    made = sorted(p.name for p in tmp_path.glob("*.png"))
    assert made == sorted(["demo_curves.png", "phantom_case.png", "reliability_ExtBaselineTrainer.png",
                           "reliability_LSRDiceTrainer.png"])
    for name in made:
        assert (REPO / "docs" / "img" / name).is_file(), name
