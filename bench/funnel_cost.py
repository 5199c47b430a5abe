"""Where the funnel ranker's CPU time goes, per user, beside the DLRM rerank's (issue 22's ceiling study).

    .venv/bin/python -m bench.funnel_cost --tracking-uri URI --retrieval RUN --funnel RUN --rerank RUN
                                          [--users 2000] [--candidates 100]

Both bundles are assembled from the runs (``app.bundle``) and serve the same users through the one
``Recommender``, timed part by part on one thread (``time.process_time``, what contention for the cores
changes least), in the blocks ``Recommender.rank`` uses:

  retrieval      the user tower and the index's top ``--candidates`` (train items excluded)
  inputs         the ranking rows: id mapping, the candidate features (funnel), the history bags
  model          the ranking model's forward passes
  top k          ordering the candidates, raw ids

It prints CPU milliseconds per user for each part and each ranker, the ratio of their users per CPU
second (the all-users measure of ``bench/scale.py``), and the ceiling: the ratio the funnel would reach
if its model cost nothing. ``bench/scale.py``'s funnel stage runs it on each rung's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.bundle import assemble_bundle, load_bundle
from modules.funnel import HISTORY_ROWS, RERANK_ROWS, Candidates

PARTS = ("retrieval", "inputs", "model", "top k")


def part_costs(rec: Any, users: Sequence[str], k: int, candidates: int, batch: int = 1024) -> dict[str, float]:
    """CPU seconds per user of each part of ``rec.recommend_users(users)`` (users the stage knows)."""
    spent = dict.fromkeys(PARTS, 0.0)
    idx = rec.retrieval.user_index(list(users))
    idx = idx[idx > 0]
    raw = np.asarray(rec.retrieval.user_vocab, dtype=object)[idx - 1].astype(str)
    for lo in range(0, len(idx), batch):
        rows, names = idx[lo : lo + batch], raw[lo : lo + batch]
        started = time.process_time()
        queries = rec.retrieval.embed("user", rows)
        found = rec.candidates(queries, [rec.seen.get(int(u), set()) for u in rows], candidates)
        spent["retrieval"] += time.process_time() - started
        n = found.ids.shape[1]
        step = max(1, (HISTORY_ROWS if rec.ranking.arch.history else RERANK_ROWS) // n)
        scores = []
        for s in range(0, len(rows), step):
            part = slice(s, s + step)
            started = time.process_time()
            inputs = rec.ranking_rows(list(names[part]), Candidates(found.ids[part], found.scores[part]))
            spent["inputs"] += time.process_time() - started
            started = time.process_time()
            scores.append(rec.ranking.score_pairs(*inputs).reshape(-1, n))
            spent["model"] += time.process_time() - started
        started = time.process_time()
        probabilities = np.concatenate(scores)
        rec.finish(found, probabilities if rec.features is not None else rec.joint(found, probabilities), k)
        spent["top k"] += time.process_time() - started
    return {part: seconds / max(len(idx), 1) for part, seconds in spent.items()}


def measure(bundles: dict[str, Path], users: int, k: int, candidates: int, repeats: int = 3) -> dict[str, Any]:
    """Each bundle's best of ``repeats`` passes (after a warm-up) over the same evenly spaced users."""
    torch.set_num_threads(1)  # one worker per core, as the batch engines run it
    recs = {name: load_bundle(path).recommender for name, path in bundles.items()}
    vocab = next(iter(recs.values())).retrieval.user_vocab
    chosen = [vocab[i] for i in np.linspace(0, len(vocab) - 1, min(users, len(vocab))).astype(int)]
    out: dict[str, Any] = {"users": len(chosen), "candidates": candidates}
    for name, rec in recs.items():
        part_costs(rec, chosen[:50], k, candidates)
        runs = [part_costs(rec, chosen, k, candidates) for _ in range(repeats)]
        best = min(runs, key=lambda r: sum(r.values()))
        out[name] = {part: round(seconds * 1000, 4) for part, seconds in best.items()}
        out[name]["total"] = round(sum(best.values()) * 1000, 4)
    funnel, rerank = out["funnel"], out["rerank"]
    out["ratio"] = round(rerank["total"] / funnel["total"], 3)
    out["ceiling"] = round(rerank["total"] / (funnel["total"] - funnel["model"]), 3)
    return out


def table(result: dict[str, Any]) -> str:
    lines = ["| part | funnel ranker (ms / user) | DLRM rerank (ms / user) |", "| --- | ---: | ---: |"]
    for part in (*PARTS, "total"):
        lines.append(f"| {part} | {result['funnel'][part]:.3f} | {result['rerank'][part]:.3f} |")
    lines.append("")
    lines.append(
        f"users per CPU second, funnel / DLRM rerank: {result['ratio']:.2f}; with a model that cost nothing: "
        f"{result['ceiling']:.2f} ({result['users']} users, {result['candidates']} candidates, one thread)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--retrieval", required=True, help="the two-tower run both rankers serve behind")
    parser.add_argument("--funnel", required=True, help="the funnel ranker's run (trained on data candidates)")
    parser.add_argument("--rerank", required=True, help="the DLRM rerank's run (trained on rated pairs)")
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {
            name: assemble_bundle(args.retrieval, run, Path(tmp) / name, args.tracking_uri)
            for name, run in (("funnel", args.funnel), ("rerank", args.rerank))
        }
        result = measure(bundles, args.users, args.k, args.candidates)
    result["load"] = round(os.getloadavg()[0], 2)
    print(table(result))
    print(f"load average {result['load']}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
