"""``recsys recommend --all-users``: every user of the vocabulary through local processes, Ray Data and
Spark equals the single-process ``recommend``; a killed Ray run resumes without writing a partition
twice; other settings into the same DIR are refused; a worker's error comes back as one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from test_funnel import Runs, train_runs

from app.batch import DELAY_ENV, MANIFEST, AllUsersConfig, partition_of, recommend_all_users
from app.cli import main
from cluster.config import ClusterConfig

K, CANDIDATES, PARTITIONS = 5, 30, 8
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def runs(ml_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return train_runs(ml_dataset, tmp_path_factory.mktemp("batch"), other=False)


@pytest.fixture(scope="module")
def vocabulary(ml_dataset: Path) -> list[str]:
    return [str(u) for u in json.loads((ml_dataset / "vocab" / "user_id.json").read_text())]


@pytest.fixture(scope="module")
def single(runs: Runs, vocabulary: list[str], tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """The single-process ``recommend`` of every user of the vocabulary (with the rerank)."""
    work = tmp_path_factory.mktemp("single")
    (work / "users.txt").write_text("\n".join(vocabulary) + "\n")
    out = work / "recs.parquet"
    args = ["recommend", "--retrieval", runs.retrieval, "--ranking", runs.ranking, "--users", str(work / "users.txt")]
    assert (
        main(
            [*args, "--k", str(K), "--candidates", str(CANDIDATES), "--out", str(out), "--tracking-uri", runs.tracking]
        )
        == 0
    )
    return pd.read_parquet(out).drop(columns=["title"])


def all_users(runs: Runs, out: Path, **kw: Any) -> list[str]:
    """``recsys recommend --all-users`` arguments for these runs."""
    args = ["recommend", "--retrieval", runs.retrieval, "--ranking", runs.ranking, "--all-users", "--out", str(out)]
    args += ["--k", str(kw.pop("k", K)), "--candidates", str(CANDIDATES), "--tracking-uri", runs.tracking]
    for flag, value in kw.items():
        args += [f"--{flag.replace('_', '-')}", str(value)]
    return args


def check_output(out: Path, single: pd.DataFrame, vocabulary: list[str]) -> pd.DataFrame:
    """Every user of the vocabulary exactly K rows, once, equal to the single-process output."""
    table = pd.read_parquet(out)  # the partitions only: _manifest.json and .tmp files are skipped
    assert list(table.columns) == ["user", "rank", "item", "score", "source"]
    assert not table.duplicated(["user", "rank"]).any()
    assert (table.groupby("user").size() == K).all() and set(table.user) == set(vocabulary)
    both = single.merge(table, on=["user", "rank"], suffixes=("_one", "_all"), validate="one_to_one")
    assert len(both) == len(single) == len(table)
    assert (both.item_one == both.item_all).all() and (both.source_one == both.source_all).all()
    assert (both.score_one - both.score_all).abs().max() <= 1e-6
    for name in os.listdir(out):  # one file per partition, each holding only its own users
        if name.startswith("part-"):
            users = pd.read_parquet(out / name).user.unique()
            assert {partition_of(u, PARTITIONS) for u in users} <= {int(name[5:10])}
    assert not [n for n in os.listdir(out) if n.startswith(".") or n == "_bundle"]  # no leftovers
    return table


@pytest.mark.parametrize("backend", ["local", pytest.param("spark", marks=pytest.mark.cluster)])
def test_all_users_equals_single_process_recommend(
    backend: str, runs: Runs, single: pd.DataFrame, vocabulary: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "recs"
    cfg = AllUsersConfig(
        retrieval=runs.retrieval,
        ranking=runs.ranking,
        out=str(out),
        k=K,
        candidates=CANDIDATES,
        partitions=PARTITIONS,
        tracking_uri=runs.tracking,
        cluster=ClusterConfig(backend=backend, num_workers=2),  # type: ignore[arg-type]
        progress=False,
    )
    summary = recommend_all_users(cfg)
    assert f"{len(vocabulary)} users, {len(vocabulary) * K} recommendations in {PARTITIONS} partitions" in summary
    check_output(out, single, vocabulary)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["complete"] and manifest["partitions"] == PARTITIONS and manifest["users"] == len(vocabulary)
    run = manifest["runs"][-1]
    assert run["partitions_written"] == PARTITIONS
    assert 1 <= run["worker_processes"] <= 2 and run["bundle_loads"] == run["worker_processes"]  # once per worker


def test_rerun_with_other_settings_is_refused(
    runs: Runs, single: pd.DataFrame, vocabulary: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "recs"
    assert main(all_users(runs, out, partitions=PARTITIONS, k=4)) == 0
    before = {p.name: p.stat().st_ino for p in out.glob("part-*")}
    capsys.readouterr()
    assert main(all_users(runs, out, partitions=PARTITIONS)) == 2  # k 4 -> 5
    err = capsys.readouterr().err
    assert err.count("recsys: error:") == 1 and "holds --all-users output of other settings (k 4 -> 5)" in err
    assert {p.name: p.stat().st_ino for p in out.glob("part-*")} == before  # nothing touched
    assert main(all_users(runs, out, partitions=PARTITIONS, overwrite="true")) == 0
    check_output(out, single, vocabulary)
    assert main(all_users(runs, out, partitions=PARTITIONS)) == 0  # same settings: already complete
    assert "already complete" in capsys.readouterr().out

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for target, message in [
        (tmp_path / "other", "(holds notes.txt)"),
        (tmp_path / "other" / "notes.txt", "is a file"),
        (Path("."), "is the current directory or one of its parents"),
    ]:
        assert main(all_users(runs, target)) == 2
        err = capsys.readouterr().err
        assert err.count("recsys: error:") == 1 and message in err and "Traceback" not in err, err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    single_user = ["recommend", "--retrieval", runs.retrieval, "--user", "1", "--tracking-uri", runs.tracking]
    for args, message in [
        ([*all_users(runs, tmp_path / "x"), "--user", "1"], "takes no --user"),
        ([*single_user, "--backend", "ray"], "--backend, --num-workers and --cluster.* go with --all-users"),
        (all_users(runs, tmp_path / "x", backend="dask"), "dask"),
    ]:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("recsys: error:") == 1 and message in err, err
    assert main([*all_users(runs, tmp_path / "bad"), "--ranking", "0" * 32]) == 2  # checked before any worker
    assert "--ranking " + "0" * 32 in capsys.readouterr().err
    assert not list((tmp_path / "bad").glob("part-*"))


def manifest_runs(out: Path) -> list[Any]:
    try:
        return list(json.loads((out / MANIFEST).read_text())["runs"])
    except (OSError, ValueError, KeyError):
        return []


def wait_for(condition: Any, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.mark.cluster
def test_a_killed_ray_run_resumes_equal_to_single_process_without_writing_a_partition_twice(
    runs: Runs, single: pd.DataFrame, vocabulary: list[str], tmp_path: Path
) -> None:
    import psutil

    out = tmp_path / "recs"
    args = [sys.executable, "-m", "app.cli", *all_users(runs, out, partitions=PARTITIONS)]
    args += ["--backend", "ray", "--num-workers", "2"]
    env = {**os.environ, DELAY_ENV: "1.5"}  # two actors, 1.5 s a partition: 8 partitions take about 6 s
    proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list[psutil.Process] = []
    try:
        wait_for(lambda: len(list(out.glob("part-*"))) >= 2)
        children = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, as a person or the OOM killer would
        proc.wait()
        # the actors die with their driver: nothing writes into DIR any more (Ray's runtime-env and
        # dashboard agents of that local Ray may outlive it: they are killed below)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert not [p for p in alive if "Agent" not in p.name()], [p.name() for p in alive]
    finally:  # whatever is left of that run (the test fails above if anything was)
        if proc.poll() is None:
            proc.kill()
        for child in children:
            if child.is_running():
                child.kill()
    finished = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*")}
    assert 2 <= len(finished) < PARTITIONS, finished  # killed midway

    rerun = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(finished)} kept from an earlier run" in rerun.stdout
    check_output(out, single, vocabulary)
    assert {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("part-*") if p.name in finished
    } == finished
    first, second = manifest_runs(out)
    assert second["partitions_kept"] == len(finished) and second["partitions_written"] == PARTITIONS - len(finished)
    assert 1 <= second["worker_processes"] <= 2 and second["bundle_loads"] == second["worker_processes"]
    assert "finished" not in first  # the killed run never got to record its end
