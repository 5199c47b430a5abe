"""All-users batch throughput of ``recsys recommend --all-users``: one local process against 1 and 2
workers of Ray Data and Spark, retrieval alone and with the DLRM rerank.

    nice -n 10 .venv/bin/python -m bench.batch_recommend --work DIR        # ~40 min on 2 cores
    .venv/bin/python -m bench.batch_recommend --work DIR --retrieval RUN --ranking RUN --tracking-uri URI

Without runs it prepares ``synthetic-retrieval`` at 2M rows (50k users, 100k items of which ~78k have
train rows; a few validation and test rows only, because the two-tower's full-corpus evaluation on this
branch is dense: users x items) and trains a two-tower (``configs/two-tower-synthetic.yaml``) and a
DLRM (``configs/dlrm-movielens.yaml``) for ``--steps`` steps each: throughput does not depend on how
well they learned. Each setting writes
every user's top ``--k`` of ``--candidates`` into a fresh directory with ``--cluster.cpus_per_worker 1``
(torch and OpenMP at one thread per worker, the single process too). Per setting:

  end to end        users / seconds of the engine phase (starting the engine and its workers, loading
                    the bundle in each, every partition; the bundle is assembled once beforehand)
  per busy worker   users / the workers' summed wall time inside the partition function (each worker's
                    rate while it works), and its ratio to the single process's (1.0: a worker as fast
                    as one process alone; the issue's target is within 20%)
  per CPU second    users / the workers' summed CPU time inside the partition function: the same ratio
                    with what other processes' contention for the cores does to wall time taken out
  load              the machine's 5-minute load average when the setting ended

and writes the table to docs/SCALE.md, section "All-users batch" (``--doc``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any

from app.batch import AllUsersConfig, recommend_all_users
from app.cli import load_run_config
from app.train import run_training
from cluster.config import ClusterConfig
from datamodules.config import PrepareConfig
from datamodules.prepare import prepare

ROOT = Path(__file__).resolve().parent.parent
SECTION = "## All-users batch"
SETTINGS = [("local", 1), ("ray", 1), ("ray", 2), ("spark", 1), ("spark", 2)]


def train(preset: str, flags: list[str], uri: str, work: Path) -> str:
    """A shipped preset on the bench's dataset for a few steps, tracked in ``uri``; the run id."""
    common = [f"--tracking-uri={uri}", "--experiment=batch-bench", f"--trainer.output_dir={work / 'runs'}"]
    common += ["--trainer.progress_bar=false", "--trainer.patience=0", "--max-epochs=1", "--batch-size=2048"]
    return str(run_training(load_run_config(ROOT / "configs" / f"{preset}.yaml", [*common, *flags]))["run_id"])


def setup(work: Path, rows: int, steps: int) -> dict[str, str]:
    """The dataset and both runs (reused from ``work/runs.json``)."""
    saved = work / "runs.json"
    if saved.is_file():
        return dict(json.loads(saved.read_text()))
    data = work / "synthetic-retrieval"
    if not (data / "metadata.json").is_file():
        prepare(
            PrepareConfig(
                dataset="synthetic-retrieval", out=str(data), rows=rows, val_frac=0.001, test_frac=0.001, overwrite=True
            )
        )
    uri = f"sqlite:///{work}/mlflow.db"
    flags = [f"--data={data}", f"--max-steps={steps}"]
    runs = {
        "tracking": uri,
        "retrieval": train("two-tower-synthetic", [*flags, "--run-name=two-tower"], uri, work),
        "ranking": train("dlrm-movielens", [*flags, "--run-name=dlrm"], uri, work),
    }
    saved.write_text(json.dumps(runs))
    return runs


def measure(
    runs: dict[str, str], ranking: str | None, backend: str, workers: int, work: Path, args: Any
) -> dict[str, Any]:
    """One all-users run into a fresh directory; its timings."""
    out = work / "out" / f"{backend}-{workers}-{'rerank' if ranking else 'retrieval'}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = AllUsersConfig(
        retrieval=runs["retrieval"],
        ranking=ranking,
        out=str(out),
        k=args.k,
        candidates=args.candidates,
        tracking_uri=runs["tracking"],
        cluster=ClusterConfig(backend=backend, num_workers=workers, cpus_per_worker=1),  # type: ignore[arg-type]
        progress=False,
    )
    import app.batch

    started: dict[str, float] = {}
    engine = app.batch.map_partitions

    def timed(*a: Any) -> Any:  # the engine phase only: the bundle is assembled before it
        started["t"] = time.time()
        yield from engine(*a)

    app.batch.map_partitions = timed  # type: ignore[assignment]
    try:
        recommend_all_users(cfg)
    finally:
        app.batch.map_partitions = engine  # type: ignore[assignment]
    end = time.time()
    manifest = json.loads((out / "_manifest.json").read_text())
    run = manifest["runs"][-1]
    users = int(manifest["users"])
    shutil.rmtree(out, ignore_errors=True)
    return {
        "backend": backend,
        "workers": workers,
        "rerank": bool(ranking),
        "users": users,
        "partitions": manifest["partitions"],
        "seconds": end - started["t"],
        "users_per_s": users / (end - started["t"]),
        "busy_users_per_s": users / run["partition_seconds"],
        "users_per_cpu_s": users / run["partition_cpu_seconds"],
        "bundle_loads": run["bundle_loads"],
        "worker_peak_rss": run.get("worker_peak_rss"),
        "load": os.getloadavg()[1],  # the 5-minute load average at the end
    }


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| stage | engine | workers | engine phase s | users/s end to end | users/s per busy worker | vs single "
        "| users per CPU s | vs single | worker peak RSS GB | load |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for rerank in (False, True):
        rows = [r for r in results if r["rerank"] == rerank]
        # the single process: the mean of its runs (a bench may run it first and last, so that the
        # drift of a shared machine's load between settings does not fall on the engines' ratios alone)
        singles = [r for r in rows if r["backend"] == "local" and r["workers"] == 1]
        base_busy = sum(r["busy_users_per_s"] for r in singles) / len(singles) if singles else float("nan")
        base_cpu = sum(r["users_per_cpu_s"] for r in singles) / len(singles) if singles else float("nan")
        for r in rows:
            busy = r["busy_users_per_s"] / base_busy
            cpu = r["users_per_cpu_s"] / base_cpu
            rss = f"{r['worker_peak_rss'] / 1e9:.2f}" if r.get("worker_peak_rss") else "-"
            lines.append(
                f"| {'+ rerank' if rerank else 'retrieval'} | {r['backend']} | {r['workers']} | {r['seconds']:.0f} | "
                f"{r['users_per_s']:.0f} | {r['busy_users_per_s']:.0f} | {busy:.2f} | {r['users_per_cpu_s']:.0f} | "
                f"{cpu:.2f} | {rss} | {r['load']:.1f} |"
            )
    return "\n".join(lines)


BEGIN, END = "<!-- bench/batch_recommend.py: begin -->", "<!-- bench/batch_recommend.py: end -->"


def write_doc(doc: Path, text: str, markers: tuple[str, str, str] = (SECTION, BEGIN, END)) -> None:
    """Replace the generated part of docs/SCALE.md's section (between its markers; the section is added
    when missing), leaving the notes around it and the other sections alone. ``markers``: the section's
    heading and its begin and end markers (another bench's section)."""
    section, begin, end = markers
    current = doc.read_text() if doc.is_file() else "# Scale\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in current and end in current:
        current = current[: current.index(begin)] + block + current[current.index(end) + len(end) :]
    else:
        current = current.rstrip("\n") + f"\n\n{section}\n\n{block}\n"
    doc.write_text(current)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=str, required=True, help="working directory (dataset, runs, outputs)")
    parser.add_argument("--rows", type=int, default=2_000_000, help="synthetic-retrieval rows (users: rows/40)")
    parser.add_argument("--steps", type=int, default=200, help="training steps of each model")
    parser.add_argument("--retrieval", default=None, help="use this two-tower run instead of training one")
    parser.add_argument("--ranking", default=None, help="and this ranking run")
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--settings", default=",".join(f"{b}:{n}" for b, n in SETTINGS), help="engine:workers,...")
    parser.add_argument("--no-rerank", action="store_true", help="retrieval alone only")
    parser.add_argument("--doc", default=str(ROOT / "docs" / "SCALE.md"), help="'' to print only")
    args = parser.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.retrieval:
        runs = {"retrieval": args.retrieval, "ranking": args.ranking or "", "tracking": args.tracking_uri or ""}
    else:
        runs = setup(work, args.rows, args.steps)
    settings = [(s.split(":")[0], int(s.split(":")[1])) for s in args.settings.split(",")]
    results = []
    for ranking in [None] + ([] if args.no_rerank or not runs["ranking"] else [runs["ranking"]]):
        for backend, workers in settings:
            r = measure(runs, ranking, backend, workers, work, args)
            print(json.dumps(r), flush=True)
            results.append(r)
    (work / "results.json").write_text(json.dumps(results, indent=2))
    text = table(results)
    print(text)
    if args.doc:
        note = (
            f"`python -m bench.batch_recommend` on {platform.machine()} with {os.cpu_count()} cores "
            f"({time.strftime('%Y-%m-%d')}): every user's top {args.k} of {args.candidates} candidates.\n\n{text}\n"
        )
        write_doc(Path(args.doc), note)


if __name__ == "__main__":
    main()
