"""Issue 24, "nothing stale, nothing silent", for data preparation and ranking data: a temporal split
of a source without timestamps, a candidates --out over one of its own inputs, duplicate or
uncomputed candidate features, val lists without a liked item, and a full disk are each one line
(exit 2) with nothing written, never a silent fallback, a replaced input or a traceback."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from conftest import ratings_frame, shrink, tiny_prepare, write_ml100k, write_sets2019_zip

from app.cli import main
from core.errors import RecsysError
from datamodules.prepare import prepare

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def one_line(err: str) -> str:
    """The one error line of a command's stderr: no traceback, no second error."""
    errors = [line for line in err.splitlines() if line.startswith("recsys: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return errors[0]


def nothing_left(parent: Path, out: Path) -> None:
    """Neither the output nor a temporary of it beside it."""
    assert not out.exists(), sorted(p.name for p in parent.iterdir())
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{out.name}.")]


@contextlib.contextmanager
def small_disk(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``directory`` (skips the test where mounting is not permitted)."""
    directory.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


# -- 1. --split temporal on a source without a timestamp column ----------------------------------------


def _interactions_csv(tmp: Path) -> tuple[list[str], str]:
    path = tmp / "inter.csv"
    ratings_frame().drop(columns="timestamp").to_csv(path, index=False)
    return ["--dataset", "interactions", "--source", str(path)], str(path)


def _interactions_parquet(tmp: Path) -> tuple[list[str], str]:
    path = tmp / "inter.parquet"
    ratings_frame().drop(columns="timestamp").to_parquet(path, index=False)
    return ["--dataset", "interactions", "--source", str(path)], str(path)


def _sets2019_zip(tmp: Path) -> tuple[list[str], str]:
    path = write_sets2019_zip(tmp / "sets.zip", ratings_frame().drop(columns="timestamp"))
    return ["--dataset", "sets2019", "--source", str(path)], "item_ratings.csv"


def _movielens_recbole(tmp: Path) -> tuple[list[str], str]:
    path = write_ml100k(tmp / "ml", ratings_frame().drop(columns="timestamp"), recbole=True)
    return ["--dataset", "movielens-100k", "--source", str(path)], "ml-100k.inter"


NO_TIMESTAMP = {
    "interactions csv (chunked)": _interactions_csv,
    "interactions parquet (chunked)": _interactions_parquet,
    "sets2019 zip (in memory)": _sets2019_zip,
    "movielens-100k recbole (in memory)": _movielens_recbole,
}


@pytest.mark.parametrize("case", list(NO_TIMESTAMP))
def test_temporal_split_of_a_source_without_timestamps_is_one_line(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, named = NO_TIMESTAMP[case](tmp_path)
    out = tmp_path / "out"
    code = main(["data", "prepare", *args, "--out", str(out), "--split", "temporal", "--block-rows", "8"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and named in line and "--split temporal needs a timestamp column" in line, line
    nothing_left(tmp_path, out)
    # the same file splits at random, as before
    assert main(["data", "prepare", *args, "--out", str(out), "--block-rows", "8"]) == 0


@pytest.mark.cluster
def test_spark_temporal_split_of_a_source_without_timestamps_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args, named = _interactions_csv(tmp_path)
    out = tmp_path / "out"
    spark = ["--engine", "spark", "--spark-master", "local[2]"]
    code = main(["data", "prepare", *args, *spark, "--out", str(out), "--split", "temporal", "--block-rows", "8"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and named in line and "--split temporal needs a timestamp column" in line, line
    nothing_left(tmp_path, out)


# -- 2 (prepare). --out is never inside the --source it reads ------------------------------------------


def test_prepare_never_writes_inside_its_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = write_ml100k(tmp_path / "ml", ratings_frame())
    before = sorted(p.name for p in source.iterdir())
    out = source / "prepared"
    code = main(["data", "prepare", "--dataset", "movielens-100k", "--source", str(source), "--out", str(out)])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and f"lies inside --source {source}, an input of this command" in line, line
    assert sorted(p.name for p in source.iterdir()) == before


# -- 6 (prepare). a full disk at --out ------------------------------------------------------------------


@pytest.mark.cluster
def test_spark_prepare_on_a_full_disk_is_one_line(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The executors' write error (a Python worker's OSError) reaches the driver as Spark's exception:
    one line, and no JVM stack trace on stderr either."""
    source = tmp_path / "inter.csv"
    ratings_frame(n_users=100, n_items=80, per_user=20).to_csv(source, index=False)
    with small_disk(tmp_path / "disk", "16k") as disk:
        out = disk / "out"
        args = ["data", "prepare", "--dataset", "interactions", "--source", str(source), "--out", str(out)]
        code = main([*args, "--engine", "spark", "--spark-master", "local[2]", "--block-rows", "8"])
        err = capfd.readouterr().err
        line = one_line(err)
        assert code == 2 and f"--out {out}: cannot write the output (No space left on device" in line, err
        assert "ERROR" not in err and "Exception" not in err, err
        nothing_left(disk, out)


def test_spark_write_errors_are_recognised_in_both_runtimes() -> None:
    """What a failed Spark job reports: a Python worker's traceback, or the JVM's stack trace."""
    from datamodules.spark_prepare import write_error_in

    python = "PythonException: ... OSError: [Errno 28] Error writing bytes to file. Detail: [errno 28] No space"
    jvm = "Py4JJavaError: ... Caused by: java.io.IOException: Disk quota exceeded\n\tat java.base/..."
    for text, code in ((python, errno.ENOSPC), (jvm, errno.EDQUOT)):
        error = write_error_in(text)
        assert error is not None and error.errno == code
    assert write_error_in("Py4JJavaError: java.lang.OutOfMemoryError: Java heap space") is None


@pytest.mark.parametrize("dataset", ["interactions", "movielens-100k", "synthetic-ctr", "synthetic-retrieval"])
def test_local_prepare_on_a_full_disk_is_one_line(
    dataset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every local path: the first write of a vocabulary fails as a full disk would (a regression test:
    ``core.output.atomic_output`` already reported it in one line)."""
    import datamodules.encoding

    frame = ratings_frame()
    frame.to_csv(tmp_path / "inter.csv", index=False)
    sources = {"interactions": tmp_path / "inter.csv", "movielens-100k": write_ml100k(tmp_path / "ml", frame)}
    args = ["--source", str(sources[dataset])] if dataset in sources else ["--rows", "2000"]

    def full(*_: object, **__: object) -> None:
        raise ENOSPC

    monkeypatch.setattr(datamodules.encoding, "write_vocab", full)
    out = tmp_path / "out"
    code = main(["data", "prepare", "--dataset", dataset, *args, "--out", str(out), "--block-rows", "8"])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and f"--out {out}: cannot write the output (No space left on device, ENOSPC)" in line, line
    nothing_left(tmp_path, out)


# -- recsys data candidates: a tiny dataset and a two-tower run trained on it ------------------------------


class Funnel:
    def __init__(self, data: Path, run: str, tracking: str, work: Path) -> None:
        self.data, self.run, self.tracking, self.work = data, run, tracking, work

    def args(self, out: Path | str, *flags: str, data: Path | None = None) -> list[str]:
        """``recsys data candidates`` on this run's dataset (or ``data``) into ``out``."""
        source = data if data is not None else self.data
        command = ["data", "candidates", "--retrieval", self.run, "--data", str(source), "--out", str(out)]
        return [*command, *flags, "--tracking-uri", self.tracking]


@pytest.fixture(scope="module")
def funnel(tmp_path_factory: pytest.TempPathFactory) -> Funnel:
    from app.train import run_training

    work = tmp_path_factory.mktemp("issue24-funnel")
    source = write_ml100k(work / "src", ratings_frame(n_users=60, n_items=50, per_user=16))
    prepare(tiny_prepare(work / "data", "movielens-100k", source=str(source), block_rows=16))
    cfg = shrink("two-tower-movielens", work / "data", work, tracking=True)
    return Funnel(work / "data", str(run_training(cfg)["run_id"]), f"sqlite:///{work}/mlflow.db", work)


def digest(path: Path) -> dict[str, bytes]:
    """Every file of a directory, by relative path: to show an input was left as it was."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_dataset(funnel: Funnel, to: Path) -> Path:
    """A copy of the run's dataset elsewhere (the run's fingerprint accepts it as --data)."""
    shutil.copytree(funnel.data, to)
    return to


# -- 2. --out is never one of the command's own inputs ------------------------------------------------------


def _out_is_data(funnel: Funnel, tmp: Path) -> tuple[list[str], Path, str]:
    return funnel.args(funnel.data, "--overwrite"), funnel.data, "is --data"


def _out_inside_data(funnel: Funnel, tmp: Path) -> tuple[list[str], Path, str]:
    return funnel.args(funnel.data / "candidates"), funnel.data, "lies inside --data"


def _out_contains_data(funnel: Funnel, tmp: Path) -> tuple[list[str], Path, str]:
    outer = copy_dataset(funnel, tmp / "outer")  # a prepared dataset, so --overwrite would replace it
    inner = copy_dataset(funnel, outer / "inner")
    return funnel.args(outer, "--overwrite", data=inner), outer, "contains --data"


def _out_is_the_runs_dataset(funnel: Funnel, tmp: Path) -> tuple[list[str], Path, str]:
    copy = copy_dataset(funnel, tmp / "copy")
    relation = f"is the dataset of --retrieval {funnel.run}"
    return funnel.args(funnel.data, "--overwrite", data=copy), funnel.data, relation


def _out_is_the_serving_runs_dataset(funnel: Funnel, tmp: Path) -> tuple[list[str], Path, str]:
    """A serving run whose config names another dataset (refused before its stage is fetched)."""
    from mlflow.tracking import MlflowClient

    refit = copy_dataset(funnel, tmp / "refit")
    client = MlflowClient(funnel.tracking)
    run = client.create_run(client.get_run(funnel.run).info.experiment_id)
    config = tmp / "config.yaml"
    config.write_text(f"model: two-tower\ndata:\n  path: {refit}\narch: {{}}\n")
    client.log_artifact(run.info.run_id, str(config))
    client.set_terminated(run.info.run_id)
    serving = run.info.run_id
    args = funnel.args(refit, "--overwrite", "--serving-retrieval", serving)
    return args, refit, f"is the dataset of --serving-retrieval {serving}"


OWN_INPUTS = {
    "--out is --data": _out_is_data,
    "--out inside --data": _out_inside_data,
    "--out holds --data": _out_contains_data,
    "--out is the retrieval run's dataset": _out_is_the_runs_dataset,
    "--out is the serving run's dataset": _out_is_the_serving_runs_dataset,
}


@pytest.fixture
def run_dataset_kept(funnel: Funnel, tmp_path: Path) -> Iterator[None]:
    """The run's dataset as it was after the test, whatever the test did to it (the other tests read it)."""
    backup = shutil.copytree(funnel.data, tmp_path / "backup")
    yield
    if digest(funnel.data) != digest(backup):
        shutil.rmtree(funnel.data)
        shutil.copytree(backup, funnel.data)


@pytest.mark.parametrize("case", list(OWN_INPUTS))
def test_candidates_never_writes_over_its_own_inputs(
    case: str, funnel: Funnel, tmp_path: Path, capsys: pytest.CaptureFixture[str], run_dataset_kept: None
) -> None:
    args, kept, relation = OWN_INPUTS[case](funnel, tmp_path)
    before = digest(kept)
    code = main(args)
    line = one_line(capsys.readouterr().err)
    assert code == 2 and relation in line and "an input of this command" in line, line
    assert digest(kept) == before
    assert not [p for p in kept.parent.iterdir() if ".tmp-" in p.name]


# -- 3. and 4. candidate features: each once, each computed ------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--features", "[item_item_score, retrieval_score, item_item_score]"], "item_item_score given more than once"),
        (["--features", "[item_item_score]", "--item-item-rank", "0"], "item_item_score need(s) the item-item model"),
    ],
    ids=["duplicate", "not computed"],
)
def test_candidate_features_are_each_asked_once_and_computed(
    flags: list[str], message: str, funnel: Funnel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "candidates"
    code = main(funnel.args(out, *flags))
    line = one_line(capsys.readouterr().err)
    assert code == 2 and f"--features: {message}" in line, line
    nothing_left(tmp_path, out)
    # rank 0 without --features still leaves the item-item features out, as documented
    assert main(funnel.args(out, "--item-item-rank", "0")) == 0
    features = json.loads((out / "metadata.json").read_text())["candidates"]["features"]
    assert features and not [f for f in features if f.startswith("item_item") or "item_item" in f]


# -- 5. val lists without a liked item: refused when made, and before training ------------------------------


def test_candidates_refuse_val_lists_without_a_liked_item(
    funnel: Funnel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.candidate_data import user_split

    # which users' top-3 lists hold a liked item: every list in train (--val-users 0)
    every = tmp_path / "every"
    assert main(funnel.args(every, "--candidates", "3", "--val-users", "0")) == 0, capsys.readouterr().err
    pairs = pd.read_parquet(every / "pairs" / "train.parquet")
    vocab = json.loads((every / "vocab" / "user_id.json").read_text())
    liked = pairs.groupby("user_id").label.max()
    users = [str(vocab[u - 1]) for u in liked.index]
    hit = liked.to_numpy() > 0.5
    assert hit.any() and not hit.all()
    # a seed whose val users (a fifth) all have lists without a liked item
    seed = next(s for s in range(1000) if (v := user_split(users, 0.2, s)).any() and not (v & hit).any())
    out = tmp_path / "candidates"
    code = main(funnel.args(out, "--candidates", "3", "--val-users", "0.2", "--seed", str(seed)))
    line = one_line(capsys.readouterr().err)
    assert code == 2 and "val users' lists of 3 candidates hold no item they liked" in line, line
    nothing_left(tmp_path, out)


@pytest.mark.parametrize(
    ("preset", "rate", "flags", "message"),
    [
        ("dlrm-movielens", 0.0, [], "holds no positive label (label rate 0), so the monitored val/auroc"),
        ("two-tower-movielens", 0.0, [], "holds no positive label (label rate 0), so the monitored val/ndcg_at_10"),
        ("dlrm-movielens", 1.0, ["--trainer.monitor=val/auroc"], "holds only positive labels (label rate 1)"),
    ],
    ids=["no positive, auroc", "no positive, ndcg", "only positives, auroc"],
)
def test_train_refuses_a_val_split_its_monitor_cannot_score(
    preset: str, rate: float, flags: list[str], message: str, ml_dataset: Path, tmp_path: Path
) -> None:
    """Before any worker starts (from metadata.json), not after a whole epoch."""
    from app.resolve import resolve_run

    data = shutil.copytree(ml_dataset, tmp_path / "data")
    meta = json.loads((data / "metadata.json").read_text())
    meta["splits"]["val"]["label_rate"] = rate
    (data / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(RecsysError, match="cannot be computed") as refused:
        resolve_run(shrink(preset, data, tmp_path, *flags))
    assert message in str(refused.value) and "--trainer.monitor val/logloss" in str(refused.value)
    resolve_run(shrink(preset, data, tmp_path, "--trainer.monitor=val/logloss"))  # the log loss it gives


# -- 6 (candidates). a full disk at --out -------------------------------------------------------------------


def test_candidates_on_a_full_disk_is_one_line(
    funnel: Funnel, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying the vocabularies into the output runs out of space (shutil.copytree would turn that
    into a shutil.Error without its errno: a traceback)."""
    out = tmp_path / "candidates"
    copyfile = shutil.copyfile

    def full_at_out(src: str | Path, dst: str | Path, *, follow_symlinks: bool = True) -> str | Path:
        if f".{out.name}.tmp-" in str(dst):
            raise ENOSPC
        return copyfile(src, dst, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(shutil, "copyfile", full_at_out)
    code = main(funnel.args(out))
    line = one_line(capsys.readouterr().err)
    assert code == 2 and f"--out {out}: cannot write the output (No space left on device, ENOSPC)" in line, line
    nothing_left(tmp_path, out)


@pytest.mark.slow
def test_candidates_on_disks_of_every_size_is_one_line_or_a_dataset(
    funnel: Funnel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real full disk at each of the writes: disks from 4 KiB up, 4 KiB apart, until one holds it all."""
    disk = tmp_path / "disk"
    for kib in range(4, 512, 4):
        with small_disk(disk, f"{kib}k"):
            code = main(funnel.args(disk / "candidates"))
            err = capsys.readouterr().err
            if code == 0:
                assert json.loads((disk / "candidates" / "metadata.json").read_text())["candidates"]
                break
            line = one_line(err)
            assert code == 2 and "No space left on device" in line, (kib, line)
            nothing_left(disk, disk / "candidates")
    else:
        pytest.fail("no disk up to 512 KiB held the candidates")
