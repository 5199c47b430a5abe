"""The scale ladder: ``synthetic-retrieval`` at 1M, 10M and 100M interactions through every stage.

    nice -n 5 .venv/bin/python -m bench.scale --work DIR [--rungs 1M,10M,100M] [--skip batch,...]
    .venv/bin/python -m bench.scale --work DIR --render          # docs/SCALE.md from DIR/results.json

Rungs (users and items as the issue names them; ~40 interactions a user):

  1M     1,000,000 rows     25,000 users     50,000 items
  10M   10,000,000 rows    250,000 users    500,000 items
  100M 100,000,000 rows  2,500,000 users  1,000,000 items
  1M-100k  1,000,000 rows   25,000 users    100,000 items  (the funnel at twice the old 50,000-item limit)
  smoke     20,000 rows        500 users      1,000 items  (a check of this script, not a rung)

Stages of a rung, each in its own process (``/usr/bin/time -v``: wall and peak RSS of that process):

  prepare   ``recsys data prepare --dataset synthetic-retrieval`` (chunked generator): wall, peak RSS,
            disk of the output (du); 1.25% val and 2.5% test rows a user (one val row for users with
            >= 40 rows, one test row for users with >= 20), so that testing stays a small part
  train     ``recsys train --config configs/two-tower-synthetic.yaml --max-steps STEPS`` in one process
            through ``bench.scale_probe``: samples/s over the steps after the first 20, per CPU second,
            peak RSS while training (tables fit one process here: no --cluster.memory_per_worker)
  evaluate  the test stage of that run: the streamed full-corpus Recall@K (``modules.evaluation``) over
            every test user at 1M and a seeded sample (``--trainer.eval_users``) above; its wall time
            and the RSS it adds above the process before it started (model, data module, corpus)
  rank      a DLRM (``configs/dlrm-movielens.yaml``) trained a few steps on the same data, only as
            the rerank of the batch stage (not measured)
  index     ``recsys index --index ivf,pq16x4fs,rflat`` (IVF-PQ with exact re-scoring) on the two-tower
  batch     ``recsys recommend --all-users`` on a subset of ``--batch-users`` users (evenly spaced in
            the vocabulary), with and without the rerank, on local 1, Ray and Spark 1 and 2 workers
            and local 1 again: ``bench.batch_recommend.measure`` (per busy worker and per CPU second,
            against the mean of the single process's two runs)

  funnel    the funnel recipe (README, "The funnel recipe") on the rung's source: a labelling copy
            (``--funnel-label-frac`` of each user's rows in val) and a refit copy (val-frac 0), both
            with the rung's seed and test split; the two-tower trained ``--steps`` on each; IVF-PQ
            index of the refit run; the item-item model's build alone (``bench.item_item
            --build-only``: rank 256, lambda 400, on the refit copy's train likes); ``recsys data
            candidates`` (100 a user); the funnel ranker (configs/funnel-ranking.yaml) trained 30
            steps; all-users with the funnel ranker and with the rung's DLRM rerank, both over the
            refit run's 100 candidates, on every ``--settings`` engine; where each ranker's CPU time
            goes (``bench.funnel_cost``: retrieval, inputs, model, top k). Wall and peak RSS of each
            step, users per CPU second of both rerankers.

and once, ``plan``: the project's sharding planner (``modules.sharding.check_plan``, compute device
cuda, on this CPU host) for the two-tower at 100M users x 10M items (the 1M rung's metadata with its
id cardinalities scaled), bytes per table and per worker and the fewest workers at 80 GiB and 16 GiB
a GPU, and the hours of an epoch and of all-users scoring at the measured rates and at a published
GPU rate.

Results go to ``DIR/results.json`` after every stage (a stopped run keeps what it measured; a rerun
skips stages already there, ``--redo STAGE`` repeats one) and the table to docs/SCALE.md, section
"Ladder", between its markers. ``--lock FILE`` holds an flock on FILE around each heavy step (shared
machines).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RUNGS = {
    "1M": (1_000_000, 25_000, 50_000),
    "10M": (10_000_000, 250_000, 500_000),
    "100M": (100_000_000, 2_500_000, 1_000_000),
    "1M-100k": (1_000_000, 25_000, 100_000),  # the funnel at twice the old item-item limit (issue 22)
    "smoke": (20_000, 500, 1_000),  # not a rung: a quick check of the script itself
}
STAGES = ("prepare", "train", "rank", "index", "batch", "funnel")
VAL_FRAC, TEST_FRAC = 0.0125, 0.025
INDEX = "ivf,pq16x4fs,rflat"
PLAN_USERS, PLAN_ITEMS = 100_000_000, 10_000_000
ROWS_PER_USER = 40
GPU_SOURCE = (
    "NVIDIA DeepLearningExamples, PyTorch/Recommendation/DLRM/README.md (April 2020 release): DLRM on "
    "Criteo Terabyte, 1x V100 32GB, batch 32k, 494k samples/s FP32, 875k mixed precision"
)
GPU_RATE = 875_000
BEGIN, END = "<!-- bench/scale.py: begin -->", "<!-- bench/scale.py: end -->"
SECTION = "## Ladder"


# -- bookkeeping --------------------------------------------------------------------------------------


class Results:
    """What the ladder measured: ``DIR/RUNG/result.json`` per rung and ``DIR/extra.json`` (plan, date),
    each written after every change, so that processes running different rungs never write the same
    file (``DIR/results.json``, the single file of an earlier version of this script, is read under
    them)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.legacy = read_json(work / "results.json") or {"rungs": {}}

    def file(self, rung: str | None) -> Path:
        return self.work / rung / "result.json" if rung else self.work / "extra.json"

    @property
    def data(self) -> dict[str, Any]:
        merged: dict[str, Any] = {k: v for k, v in self.legacy.items() if k != "rungs"}
        merged["rungs"] = dict(self.legacy.get("rungs", {}))
        for d in sorted(self.work.iterdir()):
            if (d / "result.json").is_file():
                merged["rungs"][d.name] = read_json(d / "result.json")
        merged.update(read_json(self.file(None)) or {})
        return merged

    def rung(self, name: str) -> dict[str, Any]:
        return dict(self.data["rungs"].get(name, {}))

    def put(self, rung: str | None, stage: str, value: Any) -> None:
        path = self.file(rung)
        current = read_json(path)
        if current is None:
            current = dict(self.legacy.get("rungs", {}).get(rung, {})) if rung else {}
        current[stage] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(current, indent=2))
        os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    return dict(json.loads(path.read_text())) if path.is_file() else None


@contextlib.contextmanager
def held(lock: str | None) -> Iterator[None]:
    """An exclusive flock on ``lock`` (None: nothing) for the length of the block."""
    if not lock:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def timed_run(cmd: list[str], log: Path, lock: str | None, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """``cmd`` under ``/usr/bin/time -v`` (and the lock), its output appended to ``log``; wall seconds,
    peak RSS, CPU seconds and the exit status."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    report = log.with_suffix(".time")
    with held(lock), log.open("a") as out:
        out.write(f"\n$ {' '.join(cmd)}\n")
        out.flush()
        started = time.time()
        code = subprocess.call(
            ["/usr/bin/time", "-v", "-o", str(report), *cmd],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
        )
        wall = time.time() - started
    text = report.read_text() if report.is_file() else ""

    def field(name: str) -> str:
        m = re.search(rf"{re.escape(name)}: (.+)", text)
        return m.group(1).strip() if m else "0"

    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"bench.scale: {' '.join(cmd[:6])} ... failed ({code}); {log}:\n{tail}")
    return {
        "seconds": wall,
        "peak_rss": int(field("Maximum resident set size (kbytes)")) * 1024,
        "cpu_seconds": float(field("User time (seconds)")) + float(field("System time (seconds)")),
        "load": os.getloadavg()[1],
    }


def python() -> str:
    return str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable


def du(path: Path) -> int:
    return int(subprocess.check_output(["du", "-sb", str(path)]).split()[0])


# -- stages ---------------------------------------------------------------------------------------------


def stage_prepare(rung: str, work: Path, args: Any) -> dict[str, Any]:
    rows, users, items = RUNGS[rung]
    data = work / rung / "data"
    cmd = [python(), "-m", "app.cli", "data", "prepare", "--dataset", "synthetic-retrieval", "--out", str(data)]
    cmd += [f"--rows={rows}", f"--synthetic.users={users}", f"--synthetic.items={items}"]
    cmd += [f"--val_frac={VAL_FRAC}", f"--test_frac={TEST_FRAC}", "--overwrite=true"]
    result = timed_run(cmd, work / rung / "prepare.log", args.lock)
    meta = json.loads((data / "metadata.json").read_text())
    result.update(
        disk=du(data),
        rows={split: meta["splits"][split]["rows"] for split in meta["splits"]},
        cardinalities={f["name"]: f["cardinality"] for f in meta["sparse_features"]},
    )
    return result


def train_flags(rung: str, work: Path, name: str, uri: str) -> list[str]:
    return [
        f"--data={work / rung / 'data'}",
        f"--tracking-uri={uri}",
        "--experiment=scale-ladder",
        f"--run-name={name}-{rung}",
        f"--trainer.output_dir={work / rung / 'runs'}",
        f"--data.cache_dir={work / rung / 'cache'}",
        "--trainer.progress_bar=false",
        "--trainer.patience=0",
        "--max-epochs=1",
    ]


def stage_train(rung: str, work: Path, args: Any, uri: str) -> dict[str, Any]:
    """The two-tower's steady training rate and its test-stage evaluation (both from the probe)."""
    probe = work / rung / "train-probe.json"
    eval_users = 0 if rung == "1M" else args.eval_users
    cmd = [python(), "-m", "bench.scale_probe", str(probe), "train"]
    cmd += ["--config", str(ROOT / "configs" / "two-tower-synthetic.yaml"), *train_flags(rung, work, "two-tower", uri)]
    cmd += [f"--max-steps={args.steps}", f"--trainer.eval_users={eval_users}"]
    result = timed_run(cmd, work / rung / "train.log", args.lock, {"SCALE_PROBE_WARMUP": str(args.warmup)})
    result["probe"] = json.loads(probe.read_text())
    result["eval_users_flag"] = eval_users
    return result


def stage_rank(rung: str, work: Path, args: Any, uri: str) -> dict[str, Any]:
    probe = work / rung / "rank-probe.json"
    cmd = [python(), "-m", "bench.scale_probe", str(probe), "train"]
    cmd += ["--config", str(ROOT / "configs" / "dlrm-movielens.yaml"), *train_flags(rung, work, "dlrm", uri)]
    cmd += ["--max-steps=30", "--batch-size=2048", "--data.eval_batch_size=16384"]
    result = timed_run(cmd, work / rung / "rank.log", args.lock)
    result["run_id"] = json.loads(probe.read_text())["run_id"]
    return result


def stage_index(rung: str, work: Path, args: Any, uri: str, run_id: str) -> dict[str, Any]:
    cmd = [python(), "-m", "app.cli", "index", f"--run_id={run_id}", f"--index={INDEX}"]
    cmd += [f"--tracking_uri={uri}"]
    result = timed_run(cmd, work / rung / "index.log", args.lock)
    result["index"] = INDEX
    return result


def stage_batch(rung: str, work: Path, args: Any, uri: str, retrieval: str, ranking: str) -> dict[str, Any]:
    """``bench.batch_recommend.measure`` on every setting, over a subset of the users: the driver's list
    of users (``app.batch.bundle_users``) is cut to ``--batch-users`` evenly spaced ones."""
    import app.batch
    from bench.batch_recommend import measure

    full = app.batch.bundle_users
    vocabulary: dict[str, int] = {}

    def subset(bundle: Path) -> list[str]:
        users = full(bundle)
        vocabulary["users"] = len(users)
        step = max(1, len(users) // args.batch_users)
        return users[::step][: args.batch_users]

    runs = {"retrieval": retrieval, "ranking": ranking, "tracking": uri}
    options = types.SimpleNamespace(k=10, candidates=200)
    settings = [(s.split(":")[0], int(s.split(":")[1])) for s in args.settings.split(",")]
    rows: list[dict[str, Any]] = []
    (work / rung / "batch" / "out").mkdir(parents=True, exist_ok=True)
    app.batch.bundle_users = subset  # type: ignore[assignment]
    try:
        for rerank in (None, ranking):
            for backend, workers in settings:
                with held(args.lock):
                    started = time.time()
                    r = measure(runs, rerank, backend, workers, work / rung / "batch", options)
                    r["setting_seconds"] = time.time() - started  # with the bundle's assembly
                print(json.dumps(r), flush=True)
                rows.append(r)
    finally:
        app.batch.bundle_users = full  # type: ignore[assignment]
    return {"settings": rows, "vocabulary_users": vocabulary.get("users"), "k": 10, "candidates": 200}


FUNNEL_CANDIDATES = 100


def stage_funnel(rung: str, work: Path, args: Any, uri: str, dlrm: str | None) -> dict[str, Any]:
    """The funnel recipe on the rung (see the module docstring): each step's wall and peak RSS, and the
    all-users rates of the funnel ranker beside the DLRM rerank on the same candidates."""
    rows, users, items = RUNGS[rung]
    base = work / rung / "funnel"
    base.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"label_frac": args.funnel_label_frac, "candidates": FUNNEL_CANDIDATES}
    copies = {}
    for name, val_frac in (("label", args.funnel_label_frac), ("refit", 0.0)):
        data = base / name
        cmd = [python(), "-m", "app.cli", "data", "prepare", "--dataset", "synthetic-retrieval", "--out", str(data)]
        cmd += [f"--rows={rows}", f"--synthetic.users={users}", f"--synthetic.items={items}"]
        cmd += [f"--val_frac={val_frac}", f"--test_frac={TEST_FRAC}", "--overwrite=true"]
        out[f"prepare {name}"] = timed_run(cmd, base / f"prepare-{name}.log", args.lock)
        copies[name] = data
    runs = {}
    for name, data in copies.items():
        probe = base / f"train-{name}.json"
        flags = [
            f.replace(str(work / rung / "data"), str(data)) for f in train_flags(rung, work, f"funnel-{name}", uri)
        ]
        flags = [f.replace(str(work / rung / "cache"), str(base / f"cache-{name}")) for f in flags]
        cmd = [python(), "-m", "bench.scale_probe", str(probe), "train"]
        cmd += ["--config", str(ROOT / "configs" / "two-tower-synthetic.yaml"), *flags]
        cmd += [f"--max-steps={args.steps}", "--trainer.eval_users=1000"]
        out[f"train {name}"] = timed_run(cmd, base / f"train-{name}.log", args.lock)
        runs[name] = json.loads(probe.read_text())["run_id"]
    cmd = [python(), "-m", "app.cli", "index", f"--run_id={runs['refit']}", f"--index={INDEX}", f"--tracking_uri={uri}"]
    out["index refit"] = timed_run(cmd, base / "index.log", args.lock)
    cmd = [python(), "-m", "bench.item_item", "--data", str(copies["refit"]), "--ranks", "256", "--lambdas", "400"]
    cmd += ["--build-only", "--out", str(base / "item_item.jsonl")]
    out["item-item build"] = timed_run(cmd, base / "item_item.log", args.lock)
    out["item-item build"]["fit"] = json.loads((base / "item_item.jsonl").read_text().splitlines()[0])
    candidates = base / "candidates"
    cmd = [python(), "-m", "app.cli", "data", "candidates", f"--retrieval={runs['label']}"]
    cmd += [f"--data={copies['label']}", f"--serving_retrieval={runs['refit']}", f"--out={candidates}"]
    cmd += [f"--candidates={FUNNEL_CANDIDATES}", f"--tracking_uri={uri}", "--overwrite=true"]
    out["data candidates"] = timed_run(cmd, base / "candidates.log", args.lock)
    probe = base / "ranker.json"
    flags = [
        f.replace(str(work / rung / "data"), str(candidates)) for f in train_flags(rung, work, "funnel-ranker", uri)
    ]
    flags = [f.replace(str(work / rung / "cache"), str(base / "cache-ranker")) for f in flags]
    cmd = [python(), "-m", "bench.scale_probe", str(probe), "train"]
    cmd += ["--config", str(ROOT / "configs" / "funnel-ranking.yaml"), *flags, "--max-steps=30"]
    out["train ranker"] = timed_run(cmd, base / "ranker.log", args.lock)
    ranker = json.loads(probe.read_text())["run_id"]
    out["runs"] = {**runs, "ranker": ranker, "dlrm": dlrm}
    out["batch"] = funnel_batch(rung, base, args, uri, runs["refit"], {"funnel ranker": ranker, "DLRM rerank": dlrm})
    if dlrm is not None:  # where each ranker's CPU time goes, and the ceiling of the ratio
        cost = base / "cost.json"
        cmd = [python(), "-m", "bench.funnel_cost", f"--tracking-uri={uri}", f"--retrieval={runs['refit']}"]
        cmd += [f"--funnel={ranker}", f"--rerank={dlrm}", f"--candidates={FUNNEL_CANDIDATES}", "--out", str(cost)]
        out["cost"] = {**timed_run(cmd, base / "cost.log", args.lock), "parts": json.loads(cost.read_text())}
    return out


def funnel_batch(
    rung: str, base: Path, args: Any, uri: str, retrieval: str, rankers: dict[str, str | None]
) -> list[dict[str, Any]]:
    """All-users over ``--batch-users`` users with each ranker on every engine setting (100 candidates)."""
    import app.batch
    from bench.batch_recommend import measure

    full = app.batch.bundle_users

    def subset(bundle: Path) -> list[str]:
        users = full(bundle)
        step = max(1, len(users) // args.batch_users)
        return users[::step][: args.batch_users]

    options = types.SimpleNamespace(k=10, candidates=FUNNEL_CANDIDATES)
    settings = [(s.split(":")[0], int(s.split(":")[1])) for s in args.settings.split(",")]
    rows: list[dict[str, Any]] = []
    (base / "batch" / "out").mkdir(parents=True, exist_ok=True)
    app.batch.bundle_users = subset  # type: ignore[assignment]
    try:
        for name, ranking in rankers.items():
            if ranking is None:
                continue
            for backend, workers in settings:
                with held(args.lock):
                    r = measure(
                        {"retrieval": retrieval, "tracking": uri}, ranking, backend, workers, base / "batch", options
                    )
                r["ranker"] = name
                print(json.dumps(r), flush=True)
                rows.append(r)
    finally:
        app.batch.bundle_users = full  # type: ignore[assignment]
    return rows


def funnel_text(name: str, f: dict[str, Any]) -> list[str]:
    """The funnel stage of a rung: each step's wall and peak RSS, then users per CPU second of both
    rerankers on each engine and their ratio."""
    lines = [
        f"The funnel recipe at {name} (labelling copy val-frac {f['label_frac']}, {f['candidates']} candidates):",
        "",
        "| step | wall | peak RSS GB | load |",
        "| --- | ---: | ---: | ---: |",
    ]
    for step, r in f.items():
        if isinstance(r, dict) and "peak_rss" in r:
            lines.append(f"| {step} | {fmt_s(r['seconds'])} | {gb(r['peak_rss'])} | {r.get('load', 0):.1f} |")
    fit = f.get("item-item build", {}).get("fit")
    if fit:
        lines += [
            "",
            f"Item-item model alone (rank 256, lambda 400, train likes of the refit copy): "
            f"build {fit['build_s']:.1f} s, {fit['stored_floats']:,} floats stored, "
            f"peak RSS of that process {fit['peak_rss_gb']:.2f} GB.",
        ]
    rows = f.get("batch") or []
    if rows:
        lines += [
            "",
            "| engine | workers | users | funnel ranker users per CPU s | DLRM rerank users per CPU s | ratio | load |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        dlrm = [r for r in rows if r["ranker"] == "DLRM rerank"]
        for i, r in enumerate(x for x in rows if x["ranker"] == "funnel ranker"):
            other = dlrm[i] if i < len(dlrm) else None
            ours, theirs = r.get("users_per_cpu_s"), other.get("users_per_cpu_s") if other else None
            ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
            lines.append(
                f"| {r['backend']} | {r['workers']} | {r['users']:,} | {ours or 0:,.0f} | {theirs or 0:,.0f} | {ratio} "
                f"| {r.get('load', 0):.1f} |"
            )
    parts = f.get("cost", {}).get("parts")
    if parts:
        from bench.funnel_cost import table

        lines += ["", "Where the CPU time goes (`bench/funnel_cost.py`, one thread):", "", table(parts)]
    return [*lines, ""]


def stage_plan(work: Path, rung: str) -> dict[str, Any]:
    """The sharding planner's placement of the two-tower at 100M users x 10M items (dims 32 and 128)
    for GPUs of 80 GiB and 16 GiB: the fewest workers it finds a plan for, and that plan's bytes. Twice:
    the planner's own choice (``check_plan``: it may keep tables in host memory behind a GPU cache,
    kernel ``fused_uvm_caching``), and every table in GPU memory (the same planner and topology, the
    kernel constrained to ``fused``)."""
    import logging
    import warnings

    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.types import ParameterConstraints, PlannerError

    from app.cli import load_run_config
    from core.errors import RecsysError
    from datamodules.schema import read_metadata
    from modules.registry import model_kind
    from modules.sharding import check_plan, plan_rows, sharders_of, table_bytes, topology_of

    logging.getLogger("torchrec").setLevel(logging.ERROR)  # its notes on directly built topologies
    warnings.filterwarnings("ignore", category=FutureWarning)
    meta = read_metadata(str(work / rung / "data"))
    scaled = {meta.user_id_feature: PLAN_USERS + 1, meta.item_id_feature: PLAN_ITEMS + 1}
    features = tuple(
        dataclasses.replace(f, cardinality=scaled.get(f.name, f.cardinality)) for f in meta.sparse_features
    )
    meta = dataclasses.replace(meta, sparse_features=features)
    cfg = load_run_config(ROOT / "configs" / "two-tower-synthetic.yaml", [f"--data={work / rung / 'data'}"])
    kind = model_kind("two-tower")
    batch = cfg.data.batch_size

    def in_gpu_memory(model: Any, world: int, budget: int) -> Any:
        constraints = {name: ParameterConstraints(compute_kernels=["fused"]) for name in table_bytes(model)}
        planner = EmbeddingShardingPlanner(
            topology=topology_of(world, "cuda", world, budget), batch_size=batch, constraints=constraints
        )
        try:
            return planner.plan(model, sharders_of(None))
        except PlannerError as e:
            raise RecsysError(str(e)) from None

    plans = []
    for dim in (32, 128):
        model = kind.build_model(meta, dataclasses.replace(cfg.arch, embedding_dim=dim), "meta")
        for budget_gib in (80, 16):
            for mode in ("planner's choice", "all in GPU memory"):
                entry: dict[str, Any] = {
                    "dim": dim,
                    "budget_gib": budget_gib,
                    "mode": mode,
                    "tables": table_bytes(model),
                }
                for world in (1, 2, 4, 8, 16, 32, 64):
                    try:
                        if mode == "planner's choice":
                            plan = check_plan(model, world, "cuda", budget_gib * 2**30, batch)
                        else:
                            plan = in_gpu_memory(model, world, budget_gib * 2**30)
                    except RecsysError as e:  # no plan at this size: more workers
                        entry["last_refusal"] = str(e)[:300]
                        continue
                    rows = plan_rows(plan)
                    kernels = {t: str(spec.compute_kernel) for m in plan.plan.values() for t, spec in m.items()}
                    per_worker: dict[int, int] = {}
                    for row in rows:
                        row["kernel"] = kernels.get(row["table"])
                        for r, b in row["bytes"].items():
                            per_worker[r] = per_worker.get(r, 0) + b
                    entry.update(workers=world, plan=rows, weights_per_worker=per_worker)
                    break
                plans.append(entry)
    return {"users": PLAN_USERS, "items": PLAN_ITEMS, "from_metadata_of": rung, "plans": plans}


# -- the document ---------------------------------------------------------------------------------------


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def fmt_s(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.0f} s" if s < 600 else f"{s / 60:.0f} min"


def busy(rung: dict[str, Any]) -> float:
    """Seconds the rung's stages ran (without the waits for the lock between them)."""
    total = sum(float(rung[s]["seconds"]) for s in ("prepare", "train", "rank", "index") if s in rung)
    return total + sum(float(r.get("setting_seconds", r["seconds"])) for r in rung.get("batch", {}).get("settings", []))


def render(results: dict[str, Any]) -> str:
    rungs = results["rungs"]
    names = [n for n in RUNGS if n in rungs]
    out = [
        f"`python -m bench.scale` on {platform.machine()} with {os.cpu_count()} cores, shared with other "
        f"sessions' jobs (load average in the tables); {results.get('date', time.strftime('%Y-%m-%d'))}.",
        "",
        "| rung | users | items | train rows | prepare wall | prepare peak RSS GB | disk GB "
        "| train samples/s | per CPU s | train peak RSS GB | eval users | eval s | eval GB above model "
        "| index build | rung: its stages' wall time | load |",
        "| --- |" + " ---: |" * 15,
    ]
    for n in names:
        r = rungs[n]
        p, t, ix = r.get("prepare", {}), r.get("train", {}), r.get("index", {})
        probe = t.get("probe", {})
        ev = (probe.get("evaluations") or [{}])[-1]
        _, users, items = RUNGS[n]
        rate = probe.get("samples_per_s")
        cpu = probe.get("samples_per_cpu_s")
        eval_users = f"{ev['users']:,.0f} of {ev['users_total']:,.0f}" if ev.get("users") is not None else "-"
        out.append(
            f"| {n} | {users:,} | {items:,} | {p.get('rows', {}).get('train', 0):,} | {fmt_s(p.get('seconds'))} "
            f"| {gb(p.get('peak_rss'))} | {gb(p.get('disk'))} | {f'{rate:,.0f}' if rate else '-'} "
            f"| {f'{cpu:,.0f}' if cpu else '-'} | {gb(probe.get('rss_train_peak'))} | {eval_users} "
            f"| {fmt_s(ev.get('seconds'))} | {gb(ev.get('above_model'))} | {fmt_s(ix.get('seconds'))} "
            f"| {fmt_s(busy(r))}{'' if r.get('finished') else ' (unfinished)'} "
            f"| {max(s.get('load', 0) for s in (p, t, ix) if s) if (p or t or ix) else 0:.1f} |"
        )
    out.append("")
    from bench.batch_recommend import table

    for n in names:
        b = rungs[n].get("batch")
        if b:
            out += [
                f"All-users at {n}: {len(b['settings'][0:1]) and b['settings'][0]['users']:,} of "
                f"{b['vocabulary_users']:,} users (evenly spaced), top {b['k']} of {b['candidates']} "
                f"candidates from the rung's IVF-PQ index:",
                "",
                table(b["settings"]),
                "",
            ]
    for n in names:
        f = rungs[n].get("funnel")
        if f:
            out += funnel_text(n, f)
    plan = results.get("plan")
    if plan:
        out += plan_text(plan, results)
    return "\n".join(out)


def plan_text(plan: dict[str, Any], results: dict[str, Any]) -> list[str]:
    lines = [
        f"The planner (`modules.sharding.check_plan`, compute device cuda) for the two-tower at "
        f"{plan['users']:,} users x {plan['items']:,} items (the {plan['from_metadata_of']} rung's metadata, "
        f"id cardinalities scaled):",
        "",
        "| dim | GiB per GPU | placement | workers | kernels (user_id, item_id) | sharding (user_id, item_id) "
        "| user_id table GB | item_id table GB | weights per worker GB |",
        "| ---: | ---: | --- | ---: | --- | --- | ---: | ---: | --- |",
    ]
    for p in plan["plans"]:
        tables = p["tables"]
        user = next((v for k, v in tables.items() if "user_id" in k), 0)
        item = next((v for k, v in tables.items() if "item_id" in k), 0)
        per_worker = sorted(p.get("weights_per_worker", {}).values())
        per = f"{gb(min(per_worker))}-{gb(max(per_worker))}" if per_worker else "-"
        by_table = {r["table"]: r for r in p.get("plan", [])}
        ids: list[dict[str, Any]] = [
            next((r for t, r in by_table.items() if key in t), {}) for key in ("user_id", "item_id")
        ]
        kernels = ", ".join(str(r.get("kernel", "-")).replace("EmbeddingComputeKernel.", "") for r in ids)
        shardings = ", ".join(str(r.get("sharding", "-")).replace("ShardingType.", "") for r in ids)
        lines.append(
            f"| {p['dim']} | {p['budget_gib']} | {p['mode']} | {p.get('workers', 'none up to 64')} | {kernels} "
            f"| {shardings} | {gb(user)} | {gb(item)} | {per} |"
        )
    # rates per CPU second measured at each rung: the steady training rate, and the single process's
    # all-users rates (retrieval alone, with the rerank)
    rungs = results["rungs"]
    train_rates: list[tuple[str, float]] = []
    batch_rates: list[tuple[str, float, float | None]] = []
    for n in (n for n in RUNGS if n != "smoke"):
        probe = rungs.get(n, {}).get("train", {}).get("probe", {})
        if probe.get("samples_per_cpu_s"):
            train_rates.append((n, float(probe["samples_per_cpu_s"])))
        local = [r for r in rungs.get(n, {}).get("batch", {}).get("settings", []) if r["backend"] == "local"]
        plain = [r["users_per_cpu_s"] for r in local if not r["rerank"]]
        rr = [r["users_per_cpu_s"] for r in local if r["rerank"]]
        if plain:  # the mean of the single process's runs
            batch_rates.append((n, sum(plain) / len(plain), sum(rr) / len(rr) if rr else None))
    train_rows = PLAN_USERS * ROWS_PER_USER * (1 - VAL_FRAC - TEST_FRAC)
    lines += [
        "",
        f"Hours at {plan['users']:,} users ({ROWS_PER_USER} interactions a user, {train_rows / 1e9:.1f}B train rows), "
        "in CPU-core hours at each rung's measured rate per CPU second (divided by the cores if the work "
        "spreads without loss) and at a published GPU rate:",
        "",
    ]
    if train_rates:
        at = "; ".join(
            f"{train_rows / r / 3600:,.0f} at the {n} rung's {r:,.0f} samples per CPU s" for n, r in train_rates
        )
        lines.append(
            f"- one epoch of the two-tower: {at}; at {GPU_RATE:,} samples/s on one GPU "
            f"{train_rows / GPU_RATE / 3600:.1f} GPU hours (source: {GPU_SOURCE}; a DLRM, not a two-tower figure)"
        )
    if batch_rates:
        at = "; ".join(
            f"{PLAN_USERS / b / 3600:,.0f} retrieval alone"
            + (f" and {PLAN_USERS / rr / 3600:,.0f} with the DLRM rerank" if rr else "")
            + f" at the {n} rung's rates ({b:,.0f}"
            + (f" and {rr:,.0f}" if rr else "")
            + " users per CPU s)"
            for n, b, rr in batch_rates
        )
        lines.append(
            f"- all-users scoring (top 10 of 200 from IVF-PQ): {at}; the rerank on a GPU at the same published "
            f"rate (a training rate, so a bound an inference pass beats): 200 candidates a user, "
            f"{PLAN_USERS * 200 / GPU_RATE / 3600:.1f} GPU hours"
        )
    return lines


def write_doc(doc: Path, text: str) -> None:
    """The generated part of docs/SCALE.md's "Ladder" section, between its markers."""
    from bench.batch_recommend import write_doc as write_section

    write_section(doc, text, (SECTION, BEGIN, END))


# -- main -----------------------------------------------------------------------------------------------


def run_rung(rung: str, work: Path, results: Results, args: Any) -> None:
    done = results.rung(rung)
    (work / rung).mkdir(parents=True, exist_ok=True)
    started = time.time() - float(done.get("elapsed", 0.0))
    skip = set(args.skip.split(",")) if args.skip else set()
    redo = set(args.redo.split(",")) if args.redo else set()

    def want(stage: str) -> bool:
        return stage not in skip and (stage not in done or stage in redo)

    def finish(stage: str, value: dict[str, Any]) -> None:
        done[stage] = value
        results.put(rung, stage, value)
        results.put(rung, "elapsed", time.time() - started)
        print(f"bench.scale: {rung} {stage}: {json.dumps(value)[:400]}", flush=True)

    uri = done.get("tracking")
    if not uri:  # the rung's own MLflow store (runs of the earlier single results.json: the shared one)
        uri = f"sqlite:///{work}/mlflow.db" if "train" in done else f"sqlite:///{work / rung}/mlflow.db"
        results.put(rung, "tracking", uri)
    if want("prepare"):
        finish("prepare", stage_prepare(rung, work, args))
    if want("train"):
        finish("train", stage_train(rung, work, args, uri))
    retrieval = done.get("train", {}).get("probe", {}).get("run_id")
    if want("rank"):
        finish("rank", stage_rank(rung, work, args, uri))
    if want("index") and retrieval:
        finish("index", stage_index(rung, work, args, uri, retrieval))
    ranking = done.get("rank", {}).get("run_id")
    if want("batch") and retrieval and ranking:
        finish("batch", stage_batch(rung, work, args, uri, retrieval, ranking))
    if want("funnel"):
        finish("funnel", stage_funnel(rung, work, args, uri, ranking))
    results.put(rung, "finished", all(s in done for s in STAGES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="working directory (data, runs, results.json)")
    parser.add_argument("--rungs", default="1M,10M,100M")
    parser.add_argument("--skip", default="", help="stages to leave out: " + ",".join(STAGES) + ",plan")
    parser.add_argument("--redo", default="", help="stages to measure again though results.json has them")
    parser.add_argument("--steps", type=int, default=300, help="two-tower training steps (20 warm-up)")
    parser.add_argument("--warmup", type=int, default=20, help="training steps left out of the rate")
    parser.add_argument("--eval-users", type=int, default=10_000, help="--trainer.eval_users above 1M")
    parser.add_argument("--batch-users", type=int, default=25_000, help="users of the all-users stage")
    parser.add_argument(
        "--settings",
        default="local:1,ray:1,ray:2,spark:1,spark:2,local:1",
        help="engine:workers,... (the ratios are against the mean of the local:1 runs: first and last by default)",
    )
    parser.add_argument(
        "--funnel-label-frac", type=float, default=0.1, help="val fraction of the funnel's labelling copy"
    )
    parser.add_argument("--lock", default=None, help="flock this file around each heavy step")
    parser.add_argument("--clean", action="store_true", help="delete a rung's data and runs once it finished")
    parser.add_argument("--render", action="store_true", help="only write the document from results.json")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "SCALE.md"), help="'' to print only")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = Results(work)
    if not args.render:
        for rung in args.rungs.split(","):
            run_rung(rung, work, results, args)
            if "plan" not in args.skip.split(",") and "plan" not in results.data and (work / rung / "data").is_dir():
                results.put(None, "plan", stage_plan(work, rung))
            if args.clean and results.rung(rung).get("finished"):
                for sub in ("data", "cache", "batch", "runs", "mlruns", "funnel"):
                    shutil.rmtree(work / rung / sub, ignore_errors=True)
            results.put(None, "date", time.strftime("%Y-%m-%d"))
            if args.doc:
                write_doc(Path(args.doc), render(results.data))
    text = render(results.data)
    print(text)
    if args.doc:
        write_doc(Path(args.doc), text)


if __name__ == "__main__":
    main()
