"""Recommendation latency and throughput: in process and through `mlflow models serve` over HTTP.

    .venv/bin/python -m bench.serve --work DIR      # DIR from bench.funnel (trains there when missing)

One user's recommendation = the shipped funnel of ``bench.funnel``'s recipe: user tower, exact index
top 100 (train items excluded), the candidate features (with the low-rank EASE^R item-item model of
the bundle), the DCN ranker reading the user's history over the 100, top 10. Reported: p50/p99 of a
single-user request over a bounded loop of distinct users, in process (``Recommender.recommend_users``)
and as a JSON request to the registered pyfunc served on 127.0.0.1; and batched throughput (users/s)
both ways, with the load average at the start and the end. Targets on the development machine
(2 cores, issue 22): in-process p99 <= 10 ms, served p99 <= 25 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from app.bundle import assemble_bundle, load_bundle
from app.serving import package
from bench.funnel import setup
from cluster.local import free_port
from core.services import running_service

NAME = "recommender-bench"


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = np.asarray(seconds) * 1000
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def in_process(rec: Any, users: list[str], requests: int, k: int, candidates: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)  # as the served model does (app/serving.py: RecommenderModel.load_context)
    for u in users[:20]:  # warm-up
        rec.recommend_users([u], k, candidates)
    times = []
    for i in range(requests):
        started = time.perf_counter()
        rec.recommend_users([users[i % len(users)]], k, candidates)
        times.append(time.perf_counter() - started)
    started = time.perf_counter()
    rec.recommend_users(users, k, candidates)
    batch = time.perf_counter() - started
    p50, p99 = percentiles(times)
    return {"p50_ms": p50, "p99_ms": p99, "batch_users_per_s": len(users) / batch}


def post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def served(uri: str, tracking: str, users: list[str], requests: int, k: int, candidates: int) -> dict[str, float]:
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # mlflow starts `uvicorn` by name
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    cmd += ["-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="recsys-serve-")) / "serve.log"
    with running_service(cmd, url + "/ping", log, env, wait_s=240):
        params = {"candidates": candidates}
        for u in users[:20]:
            post(url + "/invocations", {"dataframe_records": [{"user": u, "k": k}], "params": params})
        times = []
        for i in range(requests):
            body = {"dataframe_records": [{"user": users[i % len(users)], "k": k}], "params": params}
            started = time.perf_counter()
            post(url + "/invocations", body)
            times.append(time.perf_counter() - started)
        batch = users[:256]
        started = time.perf_counter()
        post(url + "/invocations", {"dataframe_records": [{"user": u, "k": k} for u in batch], "params": params})
        elapsed = time.perf_counter() - started
    p50, p99 = percentiles(times)
    return {"p50_ms": p50, "p99_ms": p99, "batch_users_per_s": len(batch) / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=str, default=None, help="bench.funnel's working directory (its runs reused)")
    parser.add_argument(
        "--data", type=Path, default=None, help="the prepared MovieLens-100K (default: the one --work's runs used)"
    )
    parser.add_argument("--requests", type=int, default=500, help="single-user requests timed per mode")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=100, help="what the recipe's ranker learned from")
    parser.add_argument("--skip-http", action="store_true", help="only the in-process figures")
    args = parser.parse_args()
    load = f"{os.getloadavg()[0]:.2f}"  # latency tails are the machine's: say how busy it was
    work = Path(args.work or tempfile.mkdtemp(prefix="recsys-funnel-"))
    work.mkdir(parents=True, exist_ok=True)
    saved = work / "runs.json"  # the recipe bench.funnel trained there, on the dataset it recorded
    data = args.data or (Path(json.loads(saved.read_text())["data"]) if saved.is_file() else None)
    _, tracking, runs = setup(work, data)
    bundle = assemble_bundle(runs["retrieval"], runs["ranking"], work / "serve-bundle", tracking)
    rec = load_bundle(bundle).recommender
    rng = np.random.default_rng(0)
    users = [str(u) for u in rng.permutation(rec.retrieval.user_vocab)]
    rows = {"in process": in_process(rec, users, args.requests, args.k, args.candidates)}
    print(f"[serve] in process: {rows['in process']}", flush=True)
    if not args.skip_http:
        line = package(runs["retrieval"], runs["ranking"], register=NAME, tracking_uri=tracking)
        uri = line.split("(", 1)[1].split(")", 1)[0]
        rows["served (HTTP, 1 worker)"] = served(uri, tracking, users, args.requests, args.k, args.candidates)
        print(f"[serve] served: {rows['served (HTTP, 1 worker)']}", flush=True)
    print(
        f"\n{args.requests} single-user requests per mode; k={args.k}, candidates={args.candidates}; "
        f"load average {load} at the start, {os.getloadavg()[0]:.2f} at the end ({os.cpu_count()} cores)"
    )
    print("\n| mode | p50 ms | p99 ms | batched users/s |\n| --- | ---: | ---: | ---: |")
    for mode, r in rows.items():
        print(f"| {mode} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['batch_users_per_s']:.0f} |")


if __name__ == "__main__":
    main()
