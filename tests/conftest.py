"""Fixtures: tiny generated files in the real source formats, prepared tiny datasets, and the shipped
presets shrunk for CPU (``tiny_run``)."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from app.config import RunConfig
from datamodules.config import PrepareConfig, SyntheticConfig
from datamodules.prepare import prepare
from datamodules.sources import ML_GENRES

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + str(Path("/tmp") / f"recsys-tests-{os.getpid()}.db"))


def ratings_frame(n_users: int = 30, n_items: int = 40, per_user: int = 12, seed: int = 0) -> pd.DataFrame:
    """Random ratings in the GroupLens layout (userId, movieId, rating, timestamp)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, n_users + 1):
        items = rng.choice(np.arange(1, n_items + 1), size=per_user, replace=False)
        ts = np.sort(rng.integers(1_000_000_000, 1_100_000_000, per_user))
        for i, t in zip(items, ts, strict=True):
            rows.append((u, int(i), float(rng.integers(1, 11)) / 2, int(t)))
    return pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"])


def write_sets2019_zip(path: Path, frame: pd.DataFrame) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("learning-from-sets-2019/item_ratings.csv", frame.to_csv(index=False))
        z.writestr("learning-from-sets-2019/set_ratings.csv", "userId,setId,rating\n1,1,3.0\n")
    return path


def write_ml100k(directory: Path, frame: pd.DataFrame, recbole: bool = False) -> Path:
    """The GroupLens ml-100k layout (u.data/u.user/u.item) or RecBole atomic files."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    users = sorted(frame["userId"].unique())
    items = sorted(frame["movieId"].unique())
    occupations = ["student", "engineer", "artist", "writer"]
    if recbole:
        inter = frame.rename(
            columns={
                "userId": "user_id:token",
                "movieId": "item_id:token",
                "rating": "rating:float",
                "timestamp": "timestamp:float",
            }
        )
        inter.to_csv(directory / "ml-100k.inter", sep="\t", index=False)
        lines = ["user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token"]
        for u in users:
            lines.append(f"{u}\t{20 + u % 40}\t{'MF'[u % 2]}\t{occupations[u % 4]}\t{10000 + 37 * u}")
        (directory / "ml-100k.user").write_text("\n".join(lines) + "\n")
        lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
        for i in items:
            genres = " ".join(rng.choice(ML_GENRES[1:], size=1 + i % 3, replace=False))
            lines.append(f"{i}\tMovie {i}\t{1980 + i % 20}\t{genres}")
        (directory / "ml-100k.item").write_text("\n".join(lines) + "\n")
    else:
        frame.to_csv(directory / "u.data", sep="\t", index=False, header=False)
        lines = [f"{u}|{20 + u % 40}|{'MF'[u % 2]}|{occupations[u % 4]}|{10000 + 37 * u}" for u in users]
        (directory / "u.user").write_text("\n".join(lines) + "\n")
        lines = []
        for i in items:
            flags = ["0"] * len(ML_GENRES)
            for g in rng.choice(len(ML_GENRES), size=1 + i % 3, replace=False):
                flags[g] = "1"
            lines.append(f"{i}|Movie {i} (1990)|01-Jan-{1980 + i % 20}||http://x|" + "|".join(flags))
        (directory / "u.item").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return directory


@pytest.fixture
def ratings() -> pd.DataFrame:
    return ratings_frame()


@pytest.fixture
def sets2019_zip(tmp_path: Path, ratings: pd.DataFrame) -> Path:
    return write_sets2019_zip(tmp_path / "sets.zip", ratings)


@pytest.fixture
def ml100k_dir(tmp_path: Path, ratings: pd.DataFrame) -> Path:
    return write_ml100k(tmp_path / "ml-100k", ratings)


def tiny_prepare(out: Path, dataset: str, **kw: object) -> PrepareConfig:
    """A PrepareConfig for tiny tests (small blocks so that batches span several of them)."""
    kw.setdefault("block_rows", 8)
    synthetic = kw.pop("synthetic", SyntheticConfig(chunk_rows=4096))
    return PrepareConfig(dataset=dataset, out=str(out), synthetic=synthetic, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ctr_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared synthetic-ctr set: 2048 rows, 4 dense, 3 sparse (1 multi-hot), blocks of 8 rows."""
    out = tmp_path_factory.mktemp("ctr") / "data"
    prepare(
        tiny_prepare(
            out,
            "synthetic-ctr",
            rows=2048,
            synthetic=SyntheticConfig(
                num_dense=4, num_sparse=3, cardinalities=[5, 50, 20], multi_hot=1, chunk_rows=1000
            ),
        )
    )
    return out


@pytest.fixture(scope="session")
def ctr_wide_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic-ctr set whose tables differ in size, so that 2 ranks hold different shards and the
    planner makes the smallest tables data-parallel."""
    out = tmp_path_factory.mktemp("ctr-wide") / "data"
    synthetic = SyntheticConfig(
        num_dense=4, num_sparse=6, cardinalities=[3, 5, 200, 300, 400, 500], multi_hot=1, chunk_rows=2000
    )
    prepare(tiny_prepare(out, "synthetic-ctr", rows=4096, synthetic=synthetic))
    return out


@pytest.fixture(scope="session")
def ml_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MovieLens-layout retrieval dataset (side features, multi-hot genres), blocks of 16 rows."""
    base = tmp_path_factory.mktemp("ml")
    src = write_ml100k(base / "src", ratings_frame(n_users=60, n_items=50, per_user=16))
    out = base / "data"
    prepare(tiny_prepare(out, "movielens-100k", source=str(src), block_rows=16))
    return out


CONFIGS = Path(__file__).parent.parent / "configs"
SHRINK = [
    "--max-epochs=2",
    "--batch-size=64",
    "--arch.embedding_dim=8",
    "--arch.tower_layers=[16, 8]",
    "--arch.dense_arch=[8]",
    "--arch.over_arch=[16]",
    "--arch.deepfm_hidden=[16]",
    "--arch.uniform_negatives=16",
    "--trainer.patience=0",
    "--trainer.progress_bar=false",
    "--trainer.log_every_n_steps=1",
]
"""Flags that shrink any shipped preset to seconds on a CPU (tiny tables, towers and batches)."""


def shrunk_flags(tmp: Path, data: Path, tracking: bool = False) -> list[str]:
    """``SHRINK`` plus where the run reads and writes (MLflow off unless ``tracking``)."""
    flags = [*SHRINK, f"--data={data}", f"--trainer.output_dir={tmp / 'runs'}"]
    return flags + ([f"--tracking-uri=sqlite:///{tmp}/mlflow.db"] if tracking else ["--tracking.enabled=false"])


def shrink(preset: str, data: Path, tmp: Path, *overrides: str, tracking: bool = False) -> RunConfig:
    """The shipped preset ``configs/PRESET.yaml`` shrunk for CPU, with ``overrides`` (CLI flags) last."""
    from app.cli import load_run_config

    return load_run_config(CONFIGS / f"{preset}.yaml", [*shrunk_flags(tmp, data, tracking), *overrides])


@pytest.fixture
def tiny_run(tmp_path: Path) -> object:
    """``tiny_run(preset, data, *flags, tracking=False) -> RunConfig`` writing under this test's tmp dir."""

    def make(preset: str, data: Path, *overrides: str, tracking: bool = False) -> RunConfig:
        return shrink(preset, data, tmp_path, *overrides, tracking=tracking)

    return make
