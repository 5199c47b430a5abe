"""Safety: a checkpoint never runs code; missing or corrupted data fails the run; ``data prepare``
deletes only what it should and concurrent prepares of one output cannot both win."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Lightning binds its log handler to the stderr of the moment it is first imported: at collection,
# not inside a test whose capsys stream is closed afterwards ("Logging error" tracebacks later on)
import lightning  # noqa: F401
import pytest
import torch

from app.cli import main
from app.config import RunConfig, TrackingConfig, TrainerConfig
from core.errors import RecsysError
from datamodules.config import DataConfig
from modules.config import ModelConfig

ROOT = Path(__file__).parent.parent


def one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error, which must be one line, the last on stderr (a run that started may have said
    what it trains before: the project's own info lines, never a traceback)."""
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("recsys: error:")]
    assert len(errors) == 1 and err[-1] == errors[0], err
    assert all(line.startswith(("recsys: error:", "training ", "trained ")) for line in err), err
    return errors[0]


def run_config(data: Path, tmp: Path, **trainer: Any) -> RunConfig:
    trainer.setdefault("max_epochs", 1)
    trainer.setdefault("patience", 0)
    return RunConfig(
        model="dlrm",
        data=DataConfig(path=str(data), batch_size=64, cache_dir=str(tmp / "cache")),
        arch=ModelConfig(embedding_dim=8, dense_arch=[8], over_arch=[16]),
        trainer=TrainerConfig(output_dir=str(tmp / "runs"), progress_bar=False, **trainer),
        tracking=TrackingConfig(enabled=False),
    )


def train_args(data: Path, tmp: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        "dlrm",
        "--data",
        str(data),
        "--batch-size",
        "64",
        "--max-epochs",
        "1",
        "--trainer.patience",
        "0",
        "--arch.embedding_dim",
        "8",
        "--tracking.enabled",
        "false",
        "--trainer.progress_bar",
        "false",
        "--trainer.output_dir",
        str(tmp / "runs"),
        "--data.cache_dir",
        str(tmp / "cache"),
        *extra,
    ]


@pytest.fixture(autouse=True)
def fresh_master_port(monkeypatch: pytest.MonkeyPatch) -> None:
    # an in-process training earlier in this pytest process leaves Lightning's MASTER_PORT in the
    # environment with its store still bound
    from cluster.local import free_port

    monkeypatch.setenv("MASTER_PORT", str(free_port()))


# -- 1. a checkpoint never runs code --------------------------------------------------------------


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _pickle_trainer_state(d: Path, marker: Path) -> None:
    (d / "trainer.pt").write_bytes(pickle.dumps(Payload(marker)))


def _torch_saved_trainer_state(d: Path, marker: Path) -> None:
    torch.save({"epoch": 0, "global_step": 1, "loops": Payload(marker)}, d / "trainer.pt")


def _dcp_metadata(d: Path, marker: Path) -> None:
    torch.save({"epoch": 0, "global_step": 1}, d / "trainer.pt")  # plain: the payload is in the DCP index
    (d / ".metadata").write_bytes(pickle.dumps(Payload(marker)))


def _garbage_trainer_state(d: Path, marker: Path) -> None:
    (d / "trainer.pt").write_bytes(b"\x00this is not a checkpoint\xff" * 10)


def _empty(d: Path, marker: Path) -> None:
    pass


CHECKPOINTS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "pickle payload in trainer.pt": (_pickle_trainer_state, "trainer.pt: refused to load"),
    "torch.save payload in trainer.pt": (_torch_saved_trainer_state, "trainer.pt: refused to load"),
    "pickle payload in the DCP .metadata": (_dcp_metadata, ".metadata: refused to load"),
    "garbage trainer.pt": (_garbage_trainer_state, "trainer.pt: not a readable checkpoint file"),
    "empty directory": (_empty, "not a recsys checkpoint directory (no trainer.pt in it)"),
}
ENTRY_POINTS = ["train --resume-from", "evaluate --checkpoint", "evaluate --run-id"]


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A local MLflow store (tracking URI, experiment id) whose artifacts live in a temp dir."""
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    experiment = MlflowClient(uri).create_experiment("safety", artifact_location=str(base / "artifacts"))
    return uri, experiment


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_a_checkpoint_never_runs_code(
    case: str,
    entry: str,
    ctr_dataset: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from app.tracking import config_yaml

    make, message = CHECKPOINTS[case]
    ckpt, marker = tmp_path / "ckpt", tmp_path / "PWNED"
    ckpt.mkdir()
    make(ckpt, marker)
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(run_config(ctr_dataset, tmp_path)))
    try:
        if entry == "train --resume-from":
            code = main(train_args(ctr_dataset, tmp_path, "--resume-from", str(ckpt)))
        elif entry == "evaluate --checkpoint":
            code = main(["evaluate", "--checkpoint", str(ckpt), "--config-file", str(config)])
        else:
            from mlflow.tracking import MlflowClient

            uri, experiment = request.getfixturevalue("mlflow_store")
            client = MlflowClient(uri)
            run_id = client.create_run(experiment).info.run_id
            client.log_artifact(run_id, str(config))
            (ckpt / "placeholder").write_text("")  # MLflow logs no empty directory
            client.log_artifacts(run_id, str(ckpt), "checkpoints/best")
            client.set_terminated(run_id)
            monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # MLflow's download bars on stderr
            capsys.readouterr()  # the store's set-up logs
            code = main(["evaluate", "--run-id", run_id, "--tracking-uri", uri])
    finally:  # also when main() raised: the old loaders crashed after running the payload
        assert not marker.exists(), "the checkpoint ran code"
    line = one_line(capsys)
    assert code == 2 and line.startswith("recsys: error:") and message in line, line


def test_dcp_byte_items_load_as_plain_data_only(tmp_path: Path) -> None:
    """Non-tensor entries of the DCP part (torch.save'd inside ``*.distcp``, which DCP itself loads
    with weights_only=False) go through the strategy's loader as plain data only."""
    import torch.distributed.checkpoint as dcp

    from modules.sharding import TorchRecMixin

    class Fused:  # the fused optimizer: its state is where a non-tensor item can land
        def state_dict(self) -> dict[str, Any]:
            return {"extra": None}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.loaded = state

    class Task(torch.nn.Module):  # the LightningModule's shape that load_checkpoint relies on
        def __init__(self) -> None:
            super().__init__()
            self.model = torch.nn.Linear(2, 1)
            self.model.fused_optimizer = Fused()  # type: ignore[assignment]

    strategy: Any = TorchRecMixin()
    strategy.optimizers = []
    strategy.lightning_module = Task()
    marker = tmp_path / "PWNED"
    weights = {k: torch.full_like(v, 3.0) for k, v in strategy.lightning_module.state_dict().items()}
    for name, extra in (("good", 0.5), ("bad", Payload(marker))):
        dcp.save({"model": weights, "fused": {"extra": extra}}, checkpoint_id=str(tmp_path / name))
        torch.save({"epoch": 0}, tmp_path / name / "trainer.pt")
    assert strategy.load_checkpoint(tmp_path / "good")["epoch"] == 0
    assert strategy.lightning_module.model.fused_optimizer.loaded == {"extra": 0.5}
    assert torch.equal(strategy.lightning_module.model.weight.detach(), torch.full((1, 2), 3.0))
    with pytest.raises(RecsysError, match="refused to load") as err:
        strategy.load_checkpoint(tmp_path / "bad")
    assert len(str(err.value).splitlines()) == 1
    assert not marker.exists(), "the checkpoint ran code"


@pytest.mark.slow
def test_a_real_checkpoint_still_resumes_and_evaluates(
    ctr_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression guard for the allow-lists: Lightning's state and the DCP index of a real
    checkpoint load as plain data (this part also passed before the fix); then the same checkpoint
    with a crafted ``__0_0.distcp`` is refused in one line."""
    from app.tracking import config_yaml
    from app.train import train
    from cluster.local import free_port

    cfg = run_config(ctr_dataset, tmp_path)
    best = train(cfg)["best_checkpoint"]
    state = torch.load(Path(best) / "trainer.pt", weights_only=True)
    assert state["epoch"] == 0 and "loops" in state
    config = tmp_path / "config.yaml"
    config.write_text(config_yaml(cfg))
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    assert main(["evaluate", "--checkpoint", best, "--config-file", str(config)]) == 0
    assert "test/auroc" in capsys.readouterr().out
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    resumed = train(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, max_epochs=2, resume_from=best)))
    assert resumed["epochs"] == 2 and len(resumed["train_loss_per_epoch"]) == 1

    # a crafted DCP shard (the tensors' part, read by DCP itself) was refused as a traceback whose
    # last line advised weights_only=False; now one line, and nothing runs
    marker = tmp_path / "PWNED"
    crafts = {
        "pickle payload": (pickle.dumps(Payload(marker)), "refused to load"),
        "truncated": (b"PK\x03\x04", "a checkpoint shard is unreadable"),
    }
    for name, (data, message) in crafts.items():
        crafted = tmp_path / f"crafted-{name.replace(' ', '-')}"
        shutil.copytree(best, crafted)
        (crafted / "__0_0.distcp").write_bytes(data)
        capsys.readouterr()
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
        code = main(["evaluate", "--checkpoint", str(crafted), "--config-file", str(config)])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("recsys: error:")]
        assert code == 2 and len(lines) == 1 and message in lines[0], err
        assert "Traceback" not in err and "weights_only" not in err, err
        assert not marker.exists(), "the checkpoint ran code"


# -- 2. missing or corrupted data fails the run ---------------------------------------------------


def _shard(d: Path, split: str = "train") -> Path:
    return d / split / json.loads((d / split / "index.json").read_text())["shards"][0]["zip_data"]["basename"]


def _delete(d: Path) -> None:
    _shard(d).unlink()


def _truncate(d: Path) -> None:
    shard = _shard(d)
    shard.write_bytes(shard.read_bytes()[:1000])


def _overwrite(d: Path) -> None:
    shard = _shard(d)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 400] = b"\xff" * 400  # same size: only the hash tells
    shard.write_bytes(bytes(data))


def _overwrite_without_hashes(d: Path) -> None:
    """A dataset prepared before hashes were recorded: zstd's own checks are all there is."""
    for split in ("train", "val", "test"):
        index_path = d / split / "index.json"
        index = json.loads(index_path.read_text())
        for shard in index["shards"]:
            shard["zip_data"]["hashes"] = {}
        index_path.write_text(json.dumps(index))
    shard = _shard(d)
    data = bytearray(shard.read_bytes())
    data[:8] = b"\x00" * 8  # the zstd frame header
    shard.write_bytes(bytes(data))


def _delete_index(d: Path) -> None:
    (d / "val" / "index.json").unlink()


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "shard deleted": (_delete, "train/shard.00000.mds.zstd: shard missing"),
    "shard truncated": (_truncate, "train/shard.00000.mds.zstd: shard has 1000 bytes"),
    "bytes overwritten": (_overwrite, "train/shard.00000.mds.zstd: shard corrupted"),
    "bytes overwritten, no hashes": (_overwrite_without_hashes, "train/shard.00000.mds.zstd: shard unreadable"),
    "split index deleted": (_delete_index, "val/index.json: missing"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_missing_or_corrupted_data_fails_the_run(
    case: str, ctr_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage, message = DAMAGE[case]
    data = tmp_path / "data"
    shutil.copytree(ctr_dataset, data)
    damage(data)
    code = main(train_args(data, tmp_path))
    line = one_line(capsys)
    assert code == 2 and message in line, line


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("case", ["shard deleted", "bytes overwritten", "bytes overwritten, no hashes"])
def test_loader_thread_and_worker_errors_are_raised(case: str, workers: int, ctr_dataset: Path, tmp_path: Path) -> None:
    """Damage after the dataset was opened: StreamingDataset's download thread (in this process or a
    DataLoader worker) fails, and the loader raises it as one line instead of ending the epoch."""
    from datamodules.streaming import StreamingDataModule

    data = tmp_path / "data"
    shutil.copytree(ctr_dataset, data)
    dm = StreamingDataModule(DataConfig(path=str(data), batch_size=64, loader_workers=workers, cache_dir=str(tmp_path)))
    damage, message = DAMAGE[case]
    damage(data)
    batches = 0
    with pytest.raises(RecsysError) as err:
        for _ in dm.train_dataloader():
            batches += 1
    dm.teardown()
    text = str(err.value)
    assert batches == 0 and len(text.splitlines()) == 1 and message in text, text


def test_a_failed_shard_does_not_block_other_readers(ctr_dataset: Path, tmp_path: Path) -> None:
    """Ranks and workers on a node share StreamingDataset's shard states: a shard that failed in one of
    them must not stay PREPARING, or the others wait for it forever (a 2-rank run hung that way)."""
    from streaming.base.dataset import _ShardState

    from datamodules.streaming import StreamingDataModule

    data = tmp_path / "data"
    shutil.copytree(ctr_dataset, data)
    dm = StreamingDataModule(DataConfig(path=str(data), batch_size=64, cache_dir=str(tmp_path)))
    dataset = dm.dataset("train")
    _overwrite(data)
    with pytest.raises(RecsysError, match="shard corrupted"):
        dataset.prepare_shard(0)
    assert dataset._shard_states[0] == _ShardState.REMOTE
    dm.teardown()


# -- 3. data prepare deletes only what it should --------------------------------------------------


def prepare_args(source: Path, out: str | Path, *extra: str) -> list[str]:
    return ["data", "prepare", "--dataset", "sets2019", "--source", str(source), "--out", str(out), *extra]


def _plain_directory(tmp: Path) -> tuple[str, Path]:
    d = tmp / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_text("precious")
    return str(d), d / "holiday.jpg"


def _empty_directory(tmp: Path) -> tuple[str, Path]:
    d = tmp / "empty"
    d.mkdir()
    return str(d), d


def _a_file(tmp: Path) -> tuple[str, Path]:
    f = tmp / "notes.txt"
    f.write_text("precious")
    return str(f), f


def _current_directory(tmp: Path) -> tuple[str, Path]:
    (tmp / "work").mkdir()
    (tmp / "work" / "code.py").write_text("precious")
    os.chdir(tmp / "work")
    return ".", tmp / "work" / "code.py"


def _parent_of_cwd(tmp: Path) -> tuple[str, Path]:
    (tmp / "work" / "sub").mkdir(parents=True)
    (tmp / "work" / "code.py").write_text("precious")
    os.chdir(tmp / "work" / "sub")
    return "..", tmp / "work" / "code.py"


def _dataset_holding_the_source(tmp: Path) -> tuple[str, Path]:
    out = tmp / "out"
    assert main(prepare_args(tmp / "sets.zip", out, "--block-rows", "8")) == 0
    shutil.copy(tmp / "sets.zip", out / "sets.zip")
    return str(out), out / "sets.zip"


OVERWRITE_REFUSED: dict[str, tuple[Callable[[Path], tuple[str, Path]], str]] = {
    "directory that is no dataset": (_plain_directory, "is a folder (no metadata.json), not a prepared dataset"),
    "empty directory": (_empty_directory, "is a folder (no metadata.json), not a prepared dataset"),
    "a file": (_a_file, "is a file, not a prepared dataset"),
    "the current directory": (_current_directory, "is the current directory or one of its parents"),
    "a parent of the current directory": (_parent_of_cwd, "is the current directory or one of its parents"),
    "a dataset holding the source": (_dataset_holding_the_source, "lies inside --out"),
}


@pytest.mark.parametrize("case", list(OVERWRITE_REFUSED))
def test_overwrite_refuses_what_is_not_a_dataset(
    case: str, sets2019_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # restored after the test, also when a case changes directory
    make, message = OVERWRITE_REFUSED[case]
    out, kept = make(tmp_path)
    source = kept if kept.suffix == ".zip" else sets2019_zip
    capsys.readouterr()
    code = main(prepare_args(source, out, "--block-rows", "8", "--overwrite"))
    line = one_line(capsys)
    assert code == 2 and message in line, line
    assert kept.exists() and (kept.is_dir() or kept.suffix == ".zip" or kept.read_text() == "precious")
    assert not [p.name for p in tmp_path.rglob(".*tmp-*")]


def test_overwrite_replaces_a_dataset_and_records_shard_hashes(sets2019_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(prepare_args(sets2019_zip, out, "--block-rows", "8")) == 0
    (out / "stale-file").write_text("from the old dataset")
    assert main(prepare_args(sets2019_zip, out, "--block-rows", "16", "--overwrite")) == 0
    assert not (out / "stale-file").exists() and json.loads((out / "metadata.json").read_text())["block_rows"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sets.zip"]  # no temporary, no old copy
    for split in ("train", "val", "test"):
        shards = json.loads((out / split / "index.json").read_text())["shards"]
        assert all("xxh64" in s["zip_data"]["hashes"] for s in shards)


HOLDER = """
import sys, time
from pathlib import Path
from datamodules.prepare import atomic_output
with atomic_output(Path(sys.argv[1]), False) as tmp:
    print("writing", flush=True)
    time.sleep(120)
"""


def hold_output(out: Path) -> subprocess.Popen[str]:
    """A process inside ``atomic_output(out)``, as a prepare mid-way through writing."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
    return proc


def test_a_second_prepare_of_an_output_being_written_fails(
    sets2019_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    holder = hold_output(out)
    try:
        for extra in ([], ["--overwrite"]):
            code = main(prepare_args(sets2019_zip, out, "--block-rows", "8", *extra))
            line = one_line(capsys)
            assert code == 2 and f"another recsys process (pid {holder.pid}) is writing it" in line, line
            assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_prepare_leaves_nothing_behind(sets2019_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    holder = hold_output(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]  # what it left
    assert main(prepare_args(sets2019_zip, out, "--block-rows", "8")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "sets.zip"]


def test_an_output_that_appeared_meanwhile_is_not_replaced(ctr_dataset: Path, tmp_path: Path) -> None:
    """Two writers of one output: the one that finishes second fails (without --overwrite) and the
    first one's dataset stays."""
    from datamodules.prepare import atomic_output

    out = tmp_path / "out"
    with pytest.raises(RecsysError) as err, atomic_output(out, False) as tmp:
        (tmp / "metadata.json").write_text("{}")
        shutil.copytree(ctr_dataset, out)  # another prepare finished first
    assert "appeared while this command ran" in str(err.value) and len(str(err.value).splitlines()) == 1
    assert (out / "metadata.json").read_text() == (ctr_dataset / "metadata.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("/proc/recsys-prepare", "--out /proc/recsys-prepare: cannot write in /proc"),
        ("/proc/no-such-dir/data", "its parent folder /proc/no-such-dir does not exist"),
        ("/dev/null", "is a character device, not a prepared dataset"),
        ("missing/data", "does not exist; create it first"),
    ],
)
def test_prepare_into_a_path_it_cannot_write_is_one_line(
    out: str, message: str, sets2019_zip: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """``prepare --out /proc/...`` was a traceback after the work was done; a missing parent was created."""
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--overwrite"]):
        code = main(prepare_args(sets2019_zip, out, "--block-rows", "8", *extra))
        line = one_line(capsys)
        assert code == 2 and message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sets.zip"]


def test_a_file_output_is_installed_whole_or_not_at_all(tmp_path: Path) -> None:
    """The rule's file kind (``recommend --out recs.parquet``): written beside, renamed when complete."""
    import pandas as pd

    from core.output import PARQUET_FILE, atomic_output

    out = tmp_path / "recs.parquet"
    with pytest.raises(RuntimeError), atomic_output(out, PARQUET_FILE) as tmp:
        pd.DataFrame({"a": [1]}).to_parquet(tmp)
        raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []
    with atomic_output(out, PARQUET_FILE) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".recs.parquet.tmp-")
        pd.DataFrame({"a": [1, 2]}).to_parquet(tmp)
    with pytest.raises(RecsysError, match="already exists"), atomic_output(out, PARQUET_FILE):
        pass
    with atomic_output(out, PARQUET_FILE, overwrite=True) as tmp:
        pd.DataFrame({"a": [3]}).to_parquet(tmp)
    assert pd.read_parquet(out)["a"].tolist() == [3] and [p.name for p in tmp_path.iterdir()] == ["recs.parquet"]
