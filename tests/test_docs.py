"""Every command in README.md and docs/ runs as written (issue 24): the bench scripts through the one
documented form (``.venv/bin/python -m bench.NAME``: ``python bench/NAME.py`` puts bench/, not the
repository, on the path and failed on ``import bench``), each answering ``--help``; every ``recsys``
command line parses with the real parser (its subcommand and every flag exist, its values have their
types); the cheap ones run."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BENCH = re.compile(r"(?:\.venv/bin/)?python[0-9.]* -m (bench\.[a-z_]+)")
RECSYS = re.compile(r"^(?:\.venv/bin/)?recsys ([a-z].*)$")
PLACEHOLDERS = {
    "RUN_ID": "0123456789abcdef",
    "RUN": "0123456789abcdef",
    "RUN2": "0123456789abcdef",
    "DIR": "some/dir",
    "DIR2": "some/dir2",
    "N": "2",
    "S": "1",
    "NAME": "synthetic-ctr",
    "PATH_OR_URL": "some/file.csv",
}


def documented_lines() -> list[tuple[str, str]]:
    """(file, command) of every command line in fenced code blocks (continuations joined, comments
    dropped) and every inline code span that is a command."""
    found: list[tuple[str, str]] = []
    for doc in DOCS:
        text = doc.read_text()
        for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                found.append((doc.name, re.split(r"\s#\s", line)[0].strip()))
        found += [(doc.name, span.strip()) for span in re.findall(r"`([^`\n]+)`", text)]
    return found


def bench_modules() -> set[str]:
    return {m for _, line in documented_lines() for m in BENCH.findall(line)}


def recsys_commands() -> list[tuple[str, list[str]]]:
    """Documented ``recsys`` command lines that pass flags (syntax summaries with ``[...]``, ``|`` or
    ``...`` are not commands), placeholders filled in."""
    out = []
    for name, line in documented_lines():
        match = RECSYS.match(line)
        if match is None or any(t in line for t in ("[", "|", "...", "$", "<")):
            continue
        words = [PLACEHOLDERS.get(w, w) for w in match.group(1).split()]
        if not any(w.startswith("--") for w in words) or words[-1].startswith("--"):
            continue  # a subcommand or a flag named in prose (``recsys index --out``), not a command line
        out.append((name, words))
    return out


def test_no_doc_runs_a_bench_script_by_its_path() -> None:
    for doc in [*DOCS, ROOT / "Makefile", *sorted((ROOT / "bench").glob("*.py"))]:
        bad = re.findall(r"python[0-9.]* bench/[a-z_]+\.py", doc.read_text())
        assert not bad, f"{doc.name}: {bad} (document `.venv/bin/python -m bench.NAME`)"


def test_the_docs_name_every_bench_script_that_exists() -> None:
    modules = bench_modules()
    assert len(modules) >= 10, modules
    for module in modules:
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(bench_modules()))
def test_each_documented_bench_script_answers_help_as_documented(module: str) -> None:
    """From the repository root, as the README says: ``.venv/bin/python -m bench.NAME --help``."""
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_every_documented_recsys_command_parses() -> None:
    from app.cli import parse_command

    commands = recsys_commands()
    assert len(commands) >= 15, commands
    for name, words in commands:
        try:
            parse_command(words)
        except Exception as e:  # the command line as a user would copy it must parse
            if "the following arguments are required" not in str(e):  # prose names a fragment of one
                raise AssertionError(f"{name}: recsys {' '.join(words)}: {e}") from None


def test_the_documented_subcommands_answer_help_through_the_installed_script() -> None:
    script = Path(sys.executable).parent / "recsys"
    subcommands = {" ".join(words[:2]) if words[0] == "data" else words[0] for _, words in recsys_commands()}
    assert {"train", "recommend", "index", "data prepare"} <= subcommands
    for sub in sorted(subcommands):
        done = subprocess.run([str(script), *sub.split(), "--help"], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "usage:" in done.stdout, (sub, done.stderr[-1000:])


def test_the_cheap_documented_commands_run(ml_dataset: Path, tmp_path: Path) -> None:
    """``recsys data summary DIR`` and the synthetic-ctr prepare of docs/BENCHMARKS.md (made small)."""
    from app.cli import main

    assert main(["data", "summary", str(ml_dataset)]) == 0
    assert main(["data", "prepare", "--dataset", "synthetic-ctr", "--out", str(tmp_path / "ctr"), "--rows", "500"]) == 0
    assert (tmp_path / "ctr" / "metadata.json").is_file()
