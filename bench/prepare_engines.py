"""Prepare engines: ``--engine local`` against ``--engine spark`` on one interactions CSV.

    PYTHONPATH=. .venv/bin/python -m bench.prepare_engines                     # 5M rows, 125k users, 50k items
    PYTHONPATH=. .venv/bin/python -m bench.prepare_engines --rows 500000 --users 12500 --items 5000
    PYTHONPATH=. .venv/bin/python -m bench.prepare_engines --doc docs/SCALE.md  # also write the figures
    PYTHONPATH=. .venv/bin/python -m bench.prepare_engines --synthetic 1000000,10000000  # + generated sets

Writes a seeded CSV (user, item, rating, timestamp), prepares it with each engine through the CLI
(``recsys data prepare``, one subprocess each; wall time, CPU time and peak RSS of its processes sampled
by psutil), checks that both give the same dataset (metadata but the engine and the block count,
vocabularies, every split's (user_id, item_id, label) rows, histories, users and items tables), prints
wall time, peak RSS and the ratio spark / local. ``--synthetic ROWS,...`` also prepares
``synthetic-retrieval`` (generated and written in chunks) at each size, for its peak RSS. With ``--doc``
the figures replace the part of that file's "Prepare engines" section between its markers (the section
is added when missing; the notes around the markers and the other sections are left alone). The load
average (1 minute) is recorded before and after each run: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

SECTION = "## Prepare engines"
BEGIN, END = "<!-- bench/prepare_engines.py: begin -->", "<!-- bench/prepare_engines.py: end -->"


def write_csv(path: Path, rows: int, users: int, items: int, seed: int = 0) -> None:
    """Interactions with Zipf-skewed items and lognormal user activity, in random order."""
    import pyarrow as pa
    from pyarrow import csv

    rng = np.random.default_rng(seed)
    activity = rng.lognormal(0, 0.8, users)
    user = np.repeat(np.arange(users), 1 + rng.multinomial(rows - users, activity / activity.sum()))
    pop = 1 / np.arange(1, items + 1) ** 1.0
    item = rng.permutation(items)[np.minimum(np.searchsorted(np.cumsum(pop / pop.sum()), rng.random(rows)), items - 1)]
    order = rng.permutation(rows)
    table = pa.table(
        {
            "user": user[order] + 1,
            "item": item[order] + 1,
            "rating": rng.integers(1, 11, rows)[order] / 2,
            "timestamp": 1_400_000_000 + rng.integers(0, 200_000_000, rows),
        }
    )
    csv.write_csv(table, path)


@dataclass
class Run:
    wall: float
    cpu: float
    rss: float
    stderr: str
    load: tuple[float, float]  # 1-minute load average before and after


def run_prepare(args: list[str], name: str) -> Run:
    """Wall seconds, CPU seconds (every process of the run: the JVM and Spark's Python workers too,
    sampled) and the peak RSS of the largest process (GB) of one CLI prepare (``recsys data prepare
    ARGS``)."""
    import psutil

    argv = [sys.executable, "-m", "app.cli", "data", "prepare", *args]
    before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=os.environ.copy())
    cpu: dict[int, float] = {}
    rss = 0
    lines: list[str] = []

    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                t = p.cpu_times()
                cpu[p.pid] = max(cpu.get(p.pid, 0.0), t.user + t.system)
                rss = max(rss, p.memory_info().rss)
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    proc.wait()
    reader.join()
    seconds = time.perf_counter() - start
    stderr = "".join(lines)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{stderr[-3000:]}")
    return Run(seconds, sum(cpu.values()), rss / 1e9, stderr, (before, os.getloadavg()[0]))


def table(path: Path, files: list[str], sort: list[str]) -> pd.DataFrame:
    frame = pd.concat([pd.read_parquet(path / f) for f in files], ignore_index=True)
    return frame.sort_values(sort, kind="stable").reset_index(drop=True)


def compare(local: Path, spark: Path) -> list[str]:
    """What differs between the two prepared datasets (empty: the same dataset)."""
    problems = []
    ma, mb = (json.loads((p / "metadata.json").read_text()) for p in (local, spark))
    ca, cb = ma.pop("corpus"), mb.pop("corpus")
    for m in (ma, mb):
        m["split_rule"].pop("engine")
        for s in m["splits"].values():
            s.pop("blocks")  # Spark partitions end in partial blocks elsewhere
            s["label_rate"] = round(s["label_rate"], 9)
    if ma != mb:
        problems.append("metadata.json differs")
    for f in ma["sparse_features"]:
        if (local / f["vocab_file"]).read_bytes() != (spark / f["vocab_file"]).read_bytes():
            problems.append(f"{f['vocab_file']} differs")
    for split in ma["splits"]:
        key = ["user_id", "item_id", "label"]
        if not table(local, ca["pairs"][split], key).equals(table(spark, cb["pairs"][split], key)):
            problems.append(f"{split} rows differ")
    ha, hb = (table(p, c["histories"], ["user_id"]) for p, c in ((local, ca), (spark, cb)))
    same = ha.user_id.equals(hb.user_id) and all(
        np.array_equal(x, y) for x, y in zip(ha["items"], hb["items"], strict=True)
    )
    if not same:
        problems.append("histories differ")
    for name in ("users", "items"):
        if not table(local, ca[name], [f"{name[:-1]}_id"]).equals(table(spark, cb[name], [f"{name[:-1]}_id"])):
            problems.append(f"{name}.parquet differs")
    return problems


def stage_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("spark:")]


def write_section(doc: Path, text: str) -> None:
    """Replace the generated part of ``doc``'s "Prepare engines" section (between its markers; the
    section is added when missing), leaving the notes around it and the other sections alone."""
    current = doc.read_text() if doc.is_file() else "# Scale\n"
    block = f"{BEGIN}\n{text.strip()}\n{END}"
    if BEGIN in current and END in current:
        current = current[: current.index(BEGIN)] + block + current[current.index(END) + len(END) :]
    else:
        current = current.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    doc.write_text(current)


def synthetic_runs(sizes: list[int], work: Path) -> dict[int, Run]:
    """``synthetic-retrieval`` prepared (in chunks) at each size, one after the other, each deleted after."""
    runs = {}
    for rows in sizes:
        out = work / f"synthetic-{rows}"
        shutil.rmtree(out, ignore_errors=True)
        runs[rows] = run = run_prepare(
            ["--dataset", "synthetic-retrieval", "--rows", str(rows), "--out", str(out)], f"synthetic {rows:,}"
        )
        disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e9
        shutil.rmtree(out, ignore_errors=True)
        print(f"synthetic-retrieval {rows:>11,} rows {run.wall:8.1f} s wall  peak RSS {run.rss:.2f} GB  {disk:.2f} GB")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000)
    parser.add_argument("--users", type=int, default=125_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--spark-master", default="local[*]")
    parser.add_argument("--synthetic", default="", help="also prepare synthetic-retrieval at these sizes (ROWS,...)")
    parser.add_argument("--work", type=Path, default=None, help="keep the CSV and datasets here")
    parser.add_argument("--doc", type=Path, default=None, help="write the figures into this file's section")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="recsys-engines-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"interactions-{args.rows}.csv"
    if not src.exists():
        started = time.perf_counter()
        write_csv(src, args.rows, args.users, args.items)
        print(f"wrote {src} ({src.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.0f}s")
    results: dict[str, Run] = {}
    spark_stages: list[str] = []
    for engine, extra in (("local", []), ("spark", ["--spark-master", args.spark_master])):
        out = work / engine
        shutil.rmtree(out, ignore_errors=True)
        argv = ["--dataset", "interactions", "--source", str(src), "--out", str(out), "--engine", engine, *extra]
        run = run_prepare(argv, f"{engine} engine")
        results[engine] = run
        print(
            f"{engine:<6} {run.wall:8.1f} s wall {run.cpu:8.1f} s CPU   peak RSS {run.rss:.2f} GB"
            f"   load {run.load[0]:.1f} -> {run.load[1]:.1f}"
        )
        if engine == "spark":
            spark_stages = stage_lines(run.stderr)
            for line in spark_stages:
                print("   ", line)
    problems = compare(work / "local", work / "spark")
    ratio = results["spark"].wall / results["local"].wall
    cpu_ratio = results["spark"].cpu / results["local"].cpu
    same = "; ".join(problems) if problems else "yes"
    print(f"spark / local: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU; same dataset: {same}")
    synthetic = synthetic_runs([int(n) for n in args.synthetic.split(",") if n], work)
    if args.doc:
        flags = f"--rows {args.rows} --users {args.users} --items {args.items}"
        flags += f" --synthetic {args.synthetic}" if args.synthetic else ""
        rows = "\n".join(
            f"| `--engine {e}` | {r.wall:.0f} | {r.cpu:.0f} | {r.rss:.2f} | {r.load[0]:.1f} / {r.load[1]:.1f} |"
            for e, r in results.items()
        )
        stages = "\n".join(f"    {line}" for line in spark_stages)
        text = f"""
`python -m bench.prepare_engines {flags}`
({time.strftime("%Y-%m-%d")}, {os.cpu_count()} cores, shared): one interactions CSV ({src.stat().st_size / 1e6:.0f} MB;
{args.rows:,} rows of user, item, rating, timestamp; {args.users:,} users, {args.items:,} items), prepared by
each engine through the CLI, one after the other. CPU: every process of the run (Spark's JVM and Python
workers too), sampled; load: the 1-minute load average before / after the run.

| engine | wall s | CPU s | peak RSS GB (largest process) | load |
| --- | ---: | ---: | ---: | ---: |
{rows}

Spark / local: **{ratio:.2f}x** wall time ({cpu_ratio:.2f}x CPU). Same dataset: {same} (metadata but
the engine and the block count, vocabularies, every split's rows, histories, users and items tables).
Spark's progress lines, as it printed them on stderr:

{stages}
"""
        if synthetic:
            text += """
`synthetic-retrieval` (generated and written in chunks), `recsys data prepare --dataset
synthetic-retrieval --rows N` with the default users (rows / 40) and items (rows / 20, at most 200,000):

| rows | wall s | CPU s | peak RSS GB | load |
| ---: | ---: | ---: | ---: | ---: |
"""
            text += "\n".join(
                f"| {n:,} | {r.wall:.0f} | {r.cpu:.0f} | {r.rss:.2f} | {r.load[0]:.1f} / {r.load[1]:.1f} |"
                for n, r in synthetic.items()
            )
        write_section(args.doc, text)
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
