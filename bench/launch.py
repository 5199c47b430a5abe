"""Launch overhead of each backend: the same small job through ``recsys train`` on local, Ray and Spark.

    .venv/bin/python -m bench.launch                    # 20k rows of synthetic-ctr, 2 workers, 2 epochs
    .venv/bin/python -m bench.launch --repeats 3 --backends local ray spark spark-executors

Each backend runs the same command line in a fresh process (so no backend inherits another's
services), with only ``--backend`` and its own flags changed:
  local             --backend local --num-workers 2      (two spawned processes, gloo)
  ray               --backend ray --num-workers 2        (starts a local Ray, TorchTrainer)
  spark             --backend spark --num-workers 2      (local[2], TorchDistributor local_mode=True)
  spark-executors   ... --cluster.spark_local_mode false --spark-master local-cluster[2,1,1024]
For each, the time from starting the command to the first training step (rank 0's first batch, as
``recsys train`` reports it) and the total wall time, and both as ratios to local; the median over
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BACKENDS = {
    "local": ["--backend", "local"],
    "ray": ["--backend", "ray"],
    "spark": ["--backend", "spark"],
    "spark-executors": [
        "--backend",
        "spark",
        "--cluster.spark_local_mode",
        "false",
        "--spark-master",
        "local-cluster[2,1,1024]",
    ],
}
FIRST_STEP = re.compile(r"^first_step_unix_time\s+([0-9.]+)\s*$", re.M)


def recsys(*args: str) -> list[str]:
    return [sys.executable, "-m", "app.cli", *args]


def run_once(backend: str, data: Path, work: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds to the first training step, total seconds) of one ``recsys train``."""
    cmd = recsys(
        "train",
        "--model",
        "dlrm",
        "--data",
        str(data),
        "--num-workers",
        str(args.workers),
        "--max-epochs",
        str(args.epochs),
        "--trainer.progress_bar",
        "false",
        "--trainer.output_dir",
        str(work / "runs"),
        "--tracking-uri",
        f"sqlite:///{work}/mlflow.db",
        "--cluster.storage_path",
        str(work / "ray"),
        *BACKENDS[backend],
    )
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "PYTHONWARNINGS": "ignore"}
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    total = time.time() - start
    match = FIRST_STEP.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:])
        raise SystemExit(f"bench/launch.py: {backend} failed (exit {proc.returncode}):\n{tail}")
    return float(match.group(1)) - start, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["local", "ray", "spark"], choices=list(BACKENDS))
    args = parser.parse_args()
    if "local" not in args.backends:
        args.backends.insert(0, "local")  # the baseline of the ratios

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prep = recsys("data", "prepare", "--dataset", "synthetic-ctr", "--rows", str(args.rows), "--out", str(data))
        subprocess.run(prep, check=True, capture_output=True)
        results: dict[str, tuple[float, float]] = {}
        for backend in args.backends:
            runs = []
            for i in range(args.repeats):
                work = Path(tmp) / f"{backend}-{i}"
                work.mkdir()
                first, total = run_once(backend, data, work, args)
                runs.append((first, total))
                print(f"[launch] {backend:<16} run {i + 1}: first step {first:6.1f} s, total {total:6.1f} s")
            results[backend] = (
                statistics.median(r[0] for r in runs),
                statistics.median(r[1] for r in runs),
            )

    base_first, base_total = results["local"]
    print(
        f"\nsynthetic-ctr {args.rows:,} rows, DLRM, {args.workers} workers, {args.epochs} epochs, "
        f"median of {args.repeats}; the same `recsys train` command, only --backend changed\n"
    )
    print(f"{'backend':<16} {'to first step':>14} {'ratio':>7} {'total':>9} {'ratio':>7}")
    for backend, (first, total) in results.items():
        print(f"{backend:<16} {first:>12.1f} s {first / base_first:>6.2f}x {total:>7.1f} s {total / base_total:>6.2f}x")


if __name__ == "__main__":
    main()
