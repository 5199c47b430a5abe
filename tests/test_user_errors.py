"""Setups users hit before the happy path: each gives the behaviour they expect, or one line and exit 2
before any work starts (nothing written)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONFIGS, shrunk_flags, tiny_prepare

from app.cli import main
from datamodules.prepare import prepare


@pytest.fixture(scope="module")
def ml_variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny MovieLens layout prepared without a val split, without a test split, all positives."""
    from conftest import ratings_frame, write_ml100k

    base = tmp_path_factory.mktemp("variants")
    src = write_ml100k(base / "src", ratings_frame(n_users=40, n_items=30, per_user=12))
    out = {}
    for name, kw in {
        "no-val": {"val_frac": 0.0},
        "no-test": {"test_frac": 0.0},
        "positives-only": {"label_threshold": 0.0},
    }.items():
        out[name] = base / name
        prepare(tiny_prepare(out[name], "movielens-100k", source=str(src), block_rows=16, **kw))  # type: ignore[arg-type]
    return out


def train(tmp: Path, data: Path, *flags: str, preset: str = "two-tower-movielens") -> list[str]:
    return ["train", "--config", str(CONFIGS / f"{preset}.yaml"), *shrunk_flags(tmp, data), "--max-epochs=1", *flags]


BAD_RUNS = {
    "monitor naming no metric": (["--trainer.monitor", "val/ndcg_at_5"], "--trainer.monitor: 'val/ndcg_at_5'"),
    "k of 0": (["--trainer.k", "0"], "--trainer.k: must be at least 1"),
    "negative epochs": (["--max-epochs", "-2"], "--max-epochs: must be at least 1"),
    "sqlite uri that is a directory": (
        ["--tracking.enabled=true", "--tracking-uri", "sqlite:///{tmp}"],
        "is a directory",
    ),
    "sqlite uri that is not a database": (
        ["--tracking.enabled=true", "--tracking-uri", "sqlite:///{tmp}/notes.txt"],
        "is not a SQLite database",
    ),
    "unknown tracking scheme": (["--tracking.enabled=true", "--tracking-uri", "foo://bar"], "unknown scheme 'foo'"),
    "gpu on a host without one": (["--accelerator", "gpu"], "--accelerator gpu: no CUDA GPU"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_run_is_one_line_before_any_work(
    case: str, ml_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if case == "gpu on a host without one" and torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    (tmp_path / "notes.txt").write_text("my notes\n")
    flags, message = BAD_RUNS[case]
    code = main(train(tmp_path, ml_dataset, *[f.format(tmp=tmp_path) for f in flags]))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "runs").exists()
    assert (tmp_path / "notes.txt").read_text() == "my notes\n"


def printed(out: str) -> dict[str, float]:
    rows = (line.split() for line in out.splitlines())
    return {r[0]: float(r[1]) for r in rows if len(r) == 2 and r[1].replace(".", "", 1).isdigit()}


def test_preset_on_a_dataset_without_val_split_monitors_the_training_loss(
    ml_variants: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train(tmp_path, ml_variants["no-val"], "--trainer.patience=2")) == 0
    captured = capsys.readouterr()
    assert "test/ndcg_at_10" in printed(captured.out)
    assert "no validation split: monitoring train/loss_epoch" in captured.err


def test_dataset_without_test_split_trains_and_reports_no_test_metrics(
    ml_variants: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train(tmp_path, ml_variants["no-test"])) == 0
    metrics = printed(capsys.readouterr().out)
    assert "train/loss" in metrics and not any(k.startswith("test/") for k in metrics)


def test_auroc_is_not_reported_when_every_label_is_positive(
    ml_variants: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train(tmp_path, ml_variants["positives-only"])) == 0
    metrics = printed(capsys.readouterr().out)
    assert "test/ndcg_at_10" in metrics and "test/auroc" not in metrics


def test_metadata_whose_cardinality_is_below_the_ids_stops_at_the_first_batch(
    ml_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fbgemm's CPU lookup reads index 0 for an index past its table: a metadata.json that does not
    describe the shards would train silently wrong. The loader checks every batch's indices."""
    import json
    import shutil

    data = tmp_path / "data"
    shutil.copytree(ml_dataset, data)
    meta = json.loads((data / "metadata.json").read_text())
    user = next(f for f in meta["sparse_features"] if f["name"] == "user_id")
    user["cardinality"] = 3
    (data / "metadata.json").write_text(json.dumps(meta))
    code = main(train(tmp_path, data, preset="dlrm-movielens"))
    captured = capsys.readouterr().err
    err = [line for line in captured.splitlines() if line.startswith("recsys: error:")]
    assert code == 2 and len(err) == 1 and "Traceback" not in captured, captured
    assert f"{data}/metadata.json: feature 'user_id' has cardinality 3 but its shards hold index" in err[0], err


def test_max_steps_ending_the_first_epoch_early_trains_and_publishes(
    ml_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max-steps 2 stops before any validation: early stopping has nothing to compare, and the last
    checkpoint stands for the best one (tested and published)."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    flags = ["--tracking.enabled=true", f"--tracking-uri={uri}", "--max-steps", "2"]
    code = main(train(tmp_path, ml_dataset, *flags, preset="dlrm-movielens"))
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err, captured.err
    assert "test/auroc" in printed(captured.out)
    client = MlflowClient(uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert artifacts == {"checkpoints/best", "checkpoints/last"}


def test_an_empty_sharding_map_is_no_constraint(
    ml_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(train(tmp_path, ml_dataset, "--cluster.sharding", "{}", "--max-steps", "2", preset="dlrm-movielens"))
    captured = capsys.readouterr()
    assert code == 0 and "test/auroc" in printed(captured.out), captured.err
