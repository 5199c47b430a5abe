"""Bad input at the command line and the tracking store (issue 24): a YAML error names its preset, a
quoted ``~`` or ``null`` stays the path it was typed as, a value starting with a dash says how to pass it,
control characters in ids never reach the terminal raw, a reading command never creates a store, and
two trainings started together into one new SQLite store both finish."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.cli import main


def one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("recsys: error: "), err
    return err


def test_a_yaml_syntax_error_names_the_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    preset = tmp_path / "broken.yaml"
    preset.write_text("model: dlrm\ndata: [unclosed\n")
    assert main(["train", "--config", str(preset)]) == 2
    err = one_line_error(capsys)
    assert f"--config {preset}: not a valid YAML preset" in err and "<unicode string>" not in err
    assert f"in {preset}, line 2" in err


def test_a_quoted_tilde_or_null_is_the_path_typed_not_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    prepare = ["data", "prepare", "--dataset", "synthetic-ctr", "--rows", "200"]
    assert main([*prepare, "--out", "~"]) == 2
    assert "--out ~: '~' is not expanded here (it was quoted)" in one_line_error(capsys)
    assert main([*prepare, "--out", "~/x"]) == 2
    assert f"e.g. --out {os.path.expanduser('~/x')}" in one_line_error(capsys)
    # `--out null` was read as YAML null: --all-users said "--out DIR is required"; now it is a folder
    # named null, and the command goes on to its next check (the tracking store here)
    store = f"sqlite:///{tmp_path}/none.db"
    args = ["recommend", "--retrieval", "r", "--all-users", "--out", "null", "--tracking-uri", store]
    assert main(args) == 2
    assert "--out DIR is required" not in one_line_error(capsys)
    assert main(["index", "--run-id", "r", "--out", "null", "--tracking-uri", store]) == 2
    one_line_error(capsys)
    assert not (tmp_path / "null").exists() and not (tmp_path / "~").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["recommend", "--retrieval", "r", "--history", "-1,2"],
        ["train", "--model", "dlrm", "--data", "d", "--cluster.memory_per_worker", "-1GiB"],
    ],
)
def test_a_value_starting_with_a_dash_says_to_write_flag_equals_value(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    err = one_line_error(capsys)
    flag = args[-2]
    assert f"argument {flag}: expected one argument" in err and f"write {flag}=VALUE" in err


def test_control_characters_in_a_message_are_escaped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ids\x1b[2J\x07"
    assert main(["data", "summary", str(path)]) == 2
    err = one_line_error(capsys)
    assert "\x1b" not in err and "\x07" not in err and "ids\\x1b[2J\\x07" in err


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", "--run-id", "0123456789abcdef"],
        ["recommend", "--retrieval", "0123456789abcdef", "--user", "1"],
        ["index", "--run-id", "0123456789abcdef"],
        ["package", "--retrieval", "0123456789abcdef"],
        ["data", "candidates", "--retrieval", "0123456789abcdef", "--data", "DATA", "--out", "o"],
    ],
)
def test_a_reading_command_never_creates_a_missing_sqlite_store(
    args: list[str],
    ml_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    args = [str(ml_dataset) if a == "DATA" else a for a in args]
    missing = tmp_path / "missing.db"
    assert main([*args, "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert f"no tracking store at {missing}" in one_line_error(capsys)
    assert not missing.exists()


@pytest.mark.slow
def test_two_trainings_started_together_into_one_new_sqlite_store_both_finish(
    ctr_dataset: Path, tmp_path: Path
) -> None:
    store = tmp_path / "new.db"
    cmd = [
        sys.executable,
        "-m",
        "app.cli",
        "train",
        "--model",
        "dlrm",
        "--data",
        str(ctr_dataset),
        "--tracking-uri",
        f"sqlite:///{store}",
        "--max-steps",
        "2",
        "--batch-size",
        "256",
        "--arch.embedding_dim",
        "4",
        "--trainer.progress_bar",
        "false",
    ]
    procs = [
        subprocess.Popen(
            [*cmd, "--trainer.output_dir", str(tmp_path / f"runs{i}")],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err[-3000:]
        assert "Traceback" not in err
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("recsys")
    assert experiment is not None
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_runs_opened_together_in_a_new_sqlite_store_all_open(tmp_path: Path) -> None:
    """The race behind two trainings started together, made to happen: four processes create the same new
    store and open a run in it at the same instant (``table ... already exists``, ``experiment ... already
    exists`` before the store was created under a lock and a lost experiment creation reused the winner's)."""
    store = tmp_path / "new.db"
    start = time.time() + 8.0  # every process imported and waiting before the instant
    script = (
        "import sys, time\n"
        "from app.config import RunConfig, TrackingConfig\n"
        "from app.tracking import open_run, prepare_store\n"
        "from datamodules.config import DataConfig\n"
        f"uri = 'sqlite:///{store}'\n"
        "cfg = RunConfig(model='dlrm', data=DataConfig(path='d'), tracking=TrackingConfig(tracking_uri=uri))\n"
        f"time.sleep(max(0.0, {start} - time.time()))\n"
        "prepare_store(uri)\n"
        "print(open_run(cfg))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_out, err) in zip(procs, results, strict=True):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert len({out.strip() for out, _ in results}) == 4  # four runs
