"""Vector index: exact search against HNSW, IVF and IVF-PQ (fast scan + exact re-ranking), in one run.

    nice -n 10 .venv/bin/python -m bench.index         # 1M items x 64 dims: 45 minutes on 2 shared
                                                       # cores (16 of them training the two-tower)
    .venv/bin/python -m bench.index --quick            # 50k items: a smoke run of a few minutes
    .venv/bin/python -m bench.index --items 200000 --dim 32 --cache /tmp/index-bench
    .venv/bin/python -m bench.index --replot           # redraw docs/index_bench.png from its .json

Where the item vectors come from (trained, not random): a synthetic catalogue whose items have a
category (40, Zipf-skewed), a brand (2000, Zipf), 1-4 tags (300, drawn from the category's own
Dirichlet(0.1) tag distribution), 3-8 title tokens (5000, half from a per-category topic, half from a
global Zipf), a year and a log-normal price. A planted 16-d item factor is a weighted sum of
per-value factors of those features plus an idiosyncratic part no tower can learn; an item's
log-popularity is its brand's effect + 0.5 x its standardised year + N(0, 1) (heavy-tailed). Users
(20k) draw factors from a mixture of 30 clusters (their segment). Each interaction samples 32
candidates by popularity from a 50k-item training catalogue and keeps the one with the highest
affinity + Gumbel noise (the synthetic-retrieval recipe of datamodules/synthetic.py, with features).
A two-tower is trained on those 800k pairs (each user's last one held out) in plain PyTorch: user
tower = user-id and segment embeddings through a linear layer; item tower = embeddings of category
and brand, mean-pooled ``nn.EmbeddingBag`` of tags and tokens, year and price, through an MLP (256)
to ``--dim``; in-batch sampled softmax with log-Q correction (accidental in-batch positives masked),
dot-product similarity, Adam (lr 3e-3), 3 epochs of batch 2048. Its held-out recall@10 against
most-popular is printed as a check that it learned. The trained item tower is then applied to
``--items`` NEW items drawn from the same generator: those are the indexed vectors (ids 0..n-1);
the queries are the user tower's embeddings of ``--queries`` randomly chosen users. ``--cache DIR``
keeps both, so a rerun skips the training.

Indexes: ``flat`` (exact), ``hnsw32`` (ef_search 16..256), ``ivf,flat`` and ``ivf,pq<dim>x4fs,rflat``
(4-bit fast-scan PQ, one dimension per code, candidates re-scored exactly), the lists chosen from the
corpus size (4096 for 1M) and nprobe from 1/512 to 1/32 of them; hnsw and ivf index the dot-product
vectors on a sphere (``sphere=1``, modules/index.py). Measured, for each index and search setting:
recall@10 against the exact (``flat``) top 10 (an item counts as found when its exact score reaches
the exact 10th score, so ties are not misses), and queries/s of one batch of ``--queries`` queries on
``--threads`` threads and of ``--single`` queries one call each on one thread (a serving process
answering concurrent requests; an OpenMP team for a single query mostly waits), best of
``--repeats``, through ``modules.index.search``; ratios are to exact search's queries/s in the same
mode. Saves a plot (recall@10 against queries/s, log x) with matplotlib, and prints a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modules.index import VectorIndex, auto_nlist, build_index, search, set_search_params

K = 10
N_CATEGORIES, N_BRANDS, N_TAGS, N_TOKENS = 40, 2000, 300, 5000
MAX_TAGS, MAX_TOKENS = 4, 8
FACTOR_DIM = 16
CLUSTERS = 30
CANDIDATES = 32
PQ_GRID = ((256, 8), (128, 8), (128, 16), (64, 16), (32, 32))  # (nlist / nprobe, k_factor)


# -- the synthetic catalogue ------------------------------------------------------------------------


@dataclass
class Generator:
    """Fixed parameters of the catalogue: per-value planted factors and feature distributions."""

    category_p: np.ndarray
    brand_p: np.ndarray
    tag_cdf: np.ndarray  # (categories, tags)
    topic_cdf: np.ndarray  # (categories, tokens)
    token_cdf: np.ndarray  # (tokens,) global Zipf
    category_f: np.ndarray
    brand_f: np.ndarray
    tag_f: np.ndarray
    token_f: np.ndarray
    year_f: np.ndarray
    price_f: np.ndarray
    brand_pop: np.ndarray  # log-popularity effect of each brand

    @classmethod
    def create(cls, seed: int) -> Generator:
        rng = np.random.default_rng(seed)

        def zipf(n: int, s: float = 1.0) -> np.ndarray:
            p = 1.0 / np.arange(1, n + 1) ** s
            return p[rng.permutation(n)] / p.sum()

        def factors(n: int, scale: float) -> np.ndarray:
            return (rng.normal(size=(n, FACTOR_DIM)) * scale).astype(np.float32)

        tag_p = rng.dirichlet(np.full(N_TAGS, 0.1), size=N_CATEGORIES)
        topic_p = rng.dirichlet(np.full(N_TOKENS, 0.05), size=N_CATEGORIES)
        return cls(
            category_p=zipf(N_CATEGORIES, 0.8),
            brand_p=zipf(N_BRANDS),
            tag_cdf=np.cumsum(tag_p, axis=1),
            topic_cdf=np.cumsum(topic_p, axis=1),
            token_cdf=np.cumsum(zipf(N_TOKENS)),
            category_f=factors(N_CATEGORIES, 1.0),
            brand_f=factors(N_BRANDS, 0.7),
            tag_f=factors(N_TAGS, 0.8),
            token_f=factors(N_TOKENS, 0.8),
            year_f=factors(1, 0.4)[0],
            price_f=factors(1, 0.3)[0],
            brand_pop=rng.normal(0, 1.2, N_BRANDS),
        )

    def items(self, n: int, seed: int) -> dict[str, np.ndarray]:
        """Features of ``n`` items (padding id = vocabulary size), planted factors and log-popularity."""
        rng = np.random.default_rng(seed)
        category = rng.choice(N_CATEGORIES, n, p=self.category_p)
        brand = rng.choice(N_BRANDS, n, p=self.brand_p)
        tags = np.full((n, MAX_TAGS), N_TAGS)
        tokens = np.full((n, MAX_TOKENS), N_TOKENS)
        u_tag, u_tok = rng.random((n, MAX_TAGS)), rng.random((n, MAX_TOKENS))
        for c in range(N_CATEGORIES):
            rows = np.flatnonzero(category == c)
            tags[rows] = np.minimum(np.searchsorted(self.tag_cdf[c], u_tag[rows]), N_TAGS - 1)
            tokens[rows] = np.minimum(np.searchsorted(self.topic_cdf[c], u_tok[rows]), N_TOKENS - 1)
        global_tok = np.minimum(np.searchsorted(self.token_cdf, rng.random((n, MAX_TOKENS))), N_TOKENS - 1)
        tokens = np.where(rng.random((n, MAX_TOKENS)) < 0.5, tokens, global_tok)
        tags[np.arange(MAX_TAGS) >= rng.integers(1, MAX_TAGS + 1, n)[:, None]] = N_TAGS
        tokens[np.arange(MAX_TOKENS) >= rng.integers(3, MAX_TOKENS + 1, n)[:, None]] = N_TOKENS
        year = np.clip(np.round(rng.normal(2008, 9, n)), 1960, 2025)
        log_price = rng.normal(3.0, 0.8, n)
        year_z, price_z = ((year - 2008) / 9).astype(np.float32), ((log_price - 3.0) / 0.8).astype(np.float32)

        def pooled(ids: np.ndarray, table: np.ndarray, pad: int) -> np.ndarray:
            valid = ids != pad
            return (table[np.minimum(ids, pad - 1)] * valid[..., None]).sum(1) / valid.sum(1, keepdims=True)

        planted = (
            self.category_f[category]
            + self.brand_f[brand]
            + pooled(tags, self.tag_f, N_TAGS)
            + 0.7 * pooled(tokens, self.token_f, N_TOKENS)
            + year_z[:, None] * self.year_f
            + price_z[:, None] * self.price_f
            + rng.normal(0, 0.4, (n, FACTOR_DIM))  # idiosyncratic: not in any feature
        ).astype(np.float32)
        return {
            "category": category,
            "brand": brand,
            "tags": tags,
            "tokens": tokens,
            "dense": np.stack([year_z, price_z], axis=1),
            "planted": planted,
            "log_pop": self.brand_pop[brand] + 0.5 * year_z + rng.normal(0, 1.0, n),
        }


def interactions(items: dict[str, np.ndarray], users: int, per_user: int, seed: int) -> tuple[np.ndarray, ...]:
    """(user, item) pairs: popularity-sampled candidates, the most affine (+ Gumbel noise) kept; user clusters."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(CLUSTERS, FACTOR_DIM))
    cluster = rng.integers(0, CLUSTERS, users)
    user_f = (centres[cluster] + 0.7 * rng.normal(size=(users, FACTOR_DIM))).astype(np.float32)
    pop = np.exp(items["log_pop"] - items["log_pop"].max())
    pop /= pop.sum()
    user_of = np.repeat(np.arange(users), per_user)
    item_of = np.empty(len(user_of), dtype=np.int64)
    step = 65536
    for lo in range(0, len(user_of), step):
        u = user_of[lo : lo + step]
        cand = rng.choice(len(pop), size=(len(u), CANDIDATES), p=pop)
        affinity = np.einsum("md,mcd->mc", user_f[u], items["planted"][cand]) / math.sqrt(FACTOR_DIM)
        item_of[lo : lo + step] = cand[np.arange(len(u)), np.argmax(affinity + rng.gumbel(size=affinity.shape), 1)]
    return user_of, item_of, cluster


# -- the two-tower ----------------------------------------------------------------------------------


class UserTower(nn.Module):
    def __init__(self, users: int, dim: int, width: int = 32) -> None:
        super().__init__()
        self.user = nn.Embedding(users, width)
        self.cluster = nn.Embedding(CLUSTERS, width)
        self.out = nn.Linear(2 * width, dim)

    def forward(self, user: torch.Tensor, cluster: torch.Tensor) -> torch.Tensor:
        return self.out(torch.cat([self.user(user), self.cluster(cluster)], dim=1))


class ItemTower(nn.Module):
    def __init__(self, dim: int, width: int = 32) -> None:
        super().__init__()
        self.category = nn.Embedding(N_CATEGORIES, width)
        self.brand = nn.Embedding(N_BRANDS, width)
        self.tags = nn.EmbeddingBag(N_TAGS + 1, width, mode="mean", padding_idx=N_TAGS)
        self.tokens = nn.EmbeddingBag(N_TOKENS + 1, width, mode="mean", padding_idx=N_TOKENS)
        self.mlp = nn.Sequential(nn.Linear(4 * width + 2, 256), nn.ReLU(), nn.Linear(256, dim))

    def forward(self, f: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = [self.category(f["category"]), self.brand(f["brand"]), self.tags(f["tags"]), self.tokens(f["tokens"])]
        return self.mlp(torch.cat([*parts, f["dense"]], dim=1))


def tensors(items: dict[str, np.ndarray], rows: Any) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v[rows]) for k, v in items.items() if k not in ("planted", "log_pop")}


def train_two_tower(args: argparse.Namespace) -> tuple[ItemTower, UserTower, Generator, np.ndarray]:
    """Train on the synthetic catalogue; print held-out recall@10 against most-popular. Returns user clusters too."""
    t0 = time.perf_counter()
    gen = Generator.create(args.seed)
    catalogue = gen.items(args.train_items, seed=args.seed + 1)
    user_of, item_of, cluster = interactions(catalogue, args.users, args.per_user, seed=args.seed + 2)
    last = np.arange(args.users) * args.per_user + args.per_user - 1  # each user's last pair is held out
    train = np.setdiff1d(np.arange(len(user_of)), last)
    counts = np.bincount(item_of[train], minlength=args.train_items)
    log_q = torch.as_tensor(np.log(np.maximum(counts, 1) / len(train)), dtype=torch.float32)
    torch.manual_seed(args.seed)
    item_tower, user_tower = ItemTower(args.dim), UserTower(args.users, args.dim)
    opt = torch.optim.Adam([*item_tower.parameters(), *user_tower.parameters()], lr=3e-3)
    rng = np.random.default_rng(args.seed + 3)
    for epoch in range(args.epochs):
        total, steps = 0.0, 0
        order = train[rng.permutation(len(train))]
        for lo in range(0, len(order), args.batch):
            pairs = order[lo : lo + args.batch]
            items, users = item_of[pairs], user_of[pairs]
            u = user_tower(torch.as_tensor(users), torch.as_tensor(cluster[users]))
            v = item_tower(tensors(catalogue, items))
            logits = u @ v.T - log_q[torch.as_tensor(items)][None, :]  # in-batch softmax, log-Q corrected
            same = torch.as_tensor(items[:, None] == items[None, :]) & ~torch.eye(len(items), dtype=torch.bool)
            loss = nn.functional.cross_entropy(logits.masked_fill(same, -math.inf), torch.arange(len(items)))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        print(f"[index] two-tower epoch {epoch + 1}/{args.epochs}: softmax loss {total / steps:.3f}", flush=True)
    with torch.no_grad():
        item_vecs = torch.cat(
            [item_tower(tensors(catalogue, slice(lo, lo + 65536))) for lo in range(0, args.train_items, 65536)]
        )
        users = rng.choice(args.users, min(2000, args.users), replace=False)
        scores = user_tower(torch.as_tensor(users), torch.as_tensor(cluster[users])) @ item_vecs.T
    seen = [set(item_of[u * args.per_user : (u + 1) * args.per_user - 1].tolist()) for u in users]
    target = item_of[last[users]]
    top = torch.topk(scores, K + args.per_user, dim=1).indices.tolist()
    hits = [t in [i for i in row if i not in s][:K] for row, s, t in zip(top, seen, target, strict=True)]
    head = np.argsort(-counts)[: K + args.per_user].tolist()
    pop_hits = [t in [i for i in head if i not in s][:K] for s, t in zip(seen, target, strict=True)]
    print(
        f"[index] two-tower trained in {time.perf_counter() - t0:.0f} s: held-out recall@{K} "
        f"{np.mean(hits):.3f} (most-popular {np.mean(pop_hits):.3f}) over {args.train_items} training items",
        flush=True,
    )
    return item_tower, user_tower, gen, cluster


def make_vectors(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """Item vectors (the trained item tower on ``--items`` new items) and queries (user-tower embeddings)."""
    cache = args.cache / f"items{args.items}-dim{args.dim}-seed{args.seed}{'-quick' if args.quick else ''}.npz"
    if args.cache.name and cache.is_file():
        print(f"[index] vectors and queries from {cache}", flush=True)
        with np.load(cache) as z:
            return z["vectors"], z["queries"][: args.queries]
    item_tower, user_tower, gen, cluster = train_two_tower(args)
    t0 = time.perf_counter()
    vectors = np.empty((args.items, args.dim), dtype=np.float32)
    step = 100_000
    with torch.no_grad():
        for lo in range(0, args.items, step):
            items = gen.items(min(step, args.items - lo), seed=args.seed + 100 + lo)
            vectors[lo : lo + len(items["category"])] = item_tower(tensors(items, slice(None))).numpy()
        users = np.random.default_rng(args.seed + 4).choice(args.users, args.queries, replace=False)
        queries = user_tower(torch.as_tensor(users), torch.as_tensor(cluster[users])).numpy()
    norms = np.linalg.norm(vectors, axis=1)
    print(
        f"[index] {args.items} x {args.dim} item vectors in {time.perf_counter() - t0:.0f} s "
        f"(norm 5/50/95%: {' / '.join(f'{v:.2f}' for v in np.percentile(norms, [5, 50, 95]))})",
        flush=True,
    )
    if args.cache.name:
        args.cache.mkdir(parents=True, exist_ok=True)
        np.savez(cache, vectors=vectors, queries=queries)
    return vectors, queries


# -- measuring --------------------------------------------------------------------------------------


@dataclass
class Row:
    family: str
    spec: str
    setting: str
    recall: float
    batch_qps: float
    single_qps: float
    build_s: float
    queries: int = 0
    threads: int = 0


def recall_at_k(found: np.ndarray, queries: np.ndarray, vectors: np.ndarray, kth: np.ndarray) -> float:
    """Share of returned items whose exact score reaches the exact K-th score (ties are not misses)."""
    valid = found >= 0
    scores = np.einsum("qd,qkd->qk", queries, vectors[np.where(valid, found, 0)])
    tolerance = 1e-5 * np.maximum(1.0, np.abs(kth))
    return float(((scores >= (kth - tolerance)[:, None]) & valid).mean())


def timed(
    index: VectorIndex, queries: np.ndarray, single: int, repeats: int, threads: int
) -> tuple[np.ndarray, float, float]:
    """Results of the batch; queries/s of the batch (``threads`` threads) and of ``single`` queries one
    at a time on one thread, as a server answering concurrent requests would (best of ``repeats``)."""
    import faiss

    search(index, queries[:8], K)  # warm-up
    batch_s, single_s = math.inf, math.inf
    for _ in range(repeats):
        faiss.omp_set_num_threads(threads)
        t0 = time.perf_counter()
        _, found = search(index, queries, K)
        batch_s = min(batch_s, time.perf_counter() - t0)
        # One query per call on 2 OpenMP threads spends most of its time waking the second thread
        # (15x slower for exact search on this shared machine): single queries run on one thread.
        faiss.omp_set_num_threads(1)
        t0 = time.perf_counter()
        for i in range(single):
            search(index, queries[i : i + 1], K)
        single_s = min(single_s, time.perf_counter() - t0)
    faiss.omp_set_num_threads(threads)
    return found, len(queries) / batch_s, single / single_s


def short(setting: str) -> str:
    """``nprobe=32,k_factor=8`` -> ``32/8``: the point labels of the plot."""
    return "/".join(v.split("=")[1] for v in setting.split(",")) if setting else ""


def plot(rows: list[Row], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter
    except ImportError:
        print("[index] matplotlib is not installed: no plot (pip install matplotlib)")
        return
    exact = rows[0]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    families = (("hnsw", "o", "ef_search"), ("ivf-flat", "s", "nprobe"), ("ivf-pq-fs+rflat", "^", "nprobe/k_factor"))
    for ax, mode in zip(axes, ("batch", "single"), strict=True):

        def qps(r: Row, mode: str = mode) -> float:
            return r.batch_qps if mode == "batch" else r.single_qps

        for family, marker, knob in families:
            fam = [r for r in rows if r.family == family]
            if fam:
                label = f"{fam[0].spec} ({knob})"
                ax.plot([qps(r) for r in fam], [r.recall for r in fam], marker=marker, label=label)
                for r in fam:
                    xy = (qps(r), r.recall)
                    ax.annotate(short(r.setting), xy, textcoords="offset points", xytext=(5, -9), fontsize=7)
        ax.plot([qps(exact)], [1.0], marker="*", markersize=14, color="black", linestyle="", label="exact (flat)")
        ax.axhline(0.95, color="grey", linestyle=":", linewidth=1, label="recall 0.95")
        ax.axvline(10 * qps(exact), color="red", linestyle=":", linewidth=1, label="10x exact's q/s")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        how = (
            f"one batch of {exact.queries}, {exact.threads} threads"
            if mode == "batch"
            else "one query a call, 1 thread"
        )
        ax.set_xlabel(f"queries/s ({how})")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(f"recall@{K} against exact")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"[index] plot written to {path}")


def report(rows: list[Row], title: str, plot_path: Path) -> None:
    """The markdown table, the fastest setting at recall >= 0.95 per mode, and the plot."""
    base = rows[0]
    print(f"\n{title}\n")
    print(f"| index | search setting | recall@{K} | batch q/s | x exact | single q/s | x exact | build s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r.spec} | {r.setting or '-'} | {r.recall:.4f} | {r.batch_qps:,.0f} | "
            f"{r.batch_qps / base.batch_qps:.1f} | {r.single_qps:,.0f} | {r.single_qps / base.single_qps:.1f} | "
            f"{r.build_s:.0f} |"
        )
    for mode in ("batch", "single"):

        def ratio(r: Row, mode: str = mode) -> float:
            return (r.batch_qps / base.batch_qps) if mode == "batch" else (r.single_qps / base.single_qps)

        best = max((r for r in rows[1:] if r.recall >= 0.95), key=ratio, default=None)
        verdict = (
            f"{best.spec} {best.setting}: recall@{K} {best.recall:.4f} at {ratio(best):.1f}x exact's q/s"
            if best
            else "none reaches recall 0.95"
        )
        print(f"[index] {mode}: fastest at recall@{K} >= 0.95: {verdict} (target >= 10x)")
    plot(rows, plot_path, title)


def track(uri: str | None, rows: list[Row], title: str, plot_path: Path) -> None:
    """Log the sweep to MLflow (experiment ``index-bench``): per-setting recall and q/s ratios as
    metrics, the .json and the plot as artifacts under ``plots/``."""
    if uri is None:
        return
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("index-bench")
    base = rows[0]
    with mlflow.start_run(run_name="index-sweep") as run:
        mlflow.set_tag("title", title)
        mlflow.log_params({"items_x_dims": title.split(" (", 1)[0], "queries": base.queries, "threads": base.threads})
        for r in rows:
            key = f"{r.spec}/{r.setting or 'exact'}".replace("=", "_").replace(",", "_")
            mlflow.log_metric(f"{key}/recall_at_{K}", r.recall)
            mlflow.log_metric(f"{key}/batch_x_exact", r.batch_qps / base.batch_qps)
            mlflow.log_metric(f"{key}/single_x_exact", r.single_qps / base.single_qps)
        for path in (plot_path, plot_path.with_suffix(".json")):
            if path.is_file():
                mlflow.log_artifact(str(path), "plots")
        print(f"[index] logged to MLflow run {run.info.run_id} (experiment index-bench) in {uri}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="indexed items (new items through the item tower)")
    p.add_argument("--dim", type=int, default=64, help="embedding dimension (tower output)")
    p.add_argument("--quick", action="store_true", help="50k items, smaller training: a smoke run")
    p.add_argument("--queries", type=int, default=2000, help="queries in the batch (recall is measured on them)")
    p.add_argument("--single", type=int, default=300, help="queries timed one at a time (exact: at most 200)")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--per-user", type=int, default=40, help="interactions per user (the last is held out)")
    p.add_argument("--train-items", type=int, default=50_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    p.add_argument("--plot", type=Path, default=Path("docs/index_bench.png"), help="the figures go beside it (.json)")
    p.add_argument("--cache", type=Path, default=Path(""), help="keep/reuse the trained vectors and queries here")
    p.add_argument("--replot", action="store_true", help="only redraw the plot and table from the .json beside it")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="also log the figures (table, .json, plot) to this MLflow store, experiment index-bench",
    )
    args = p.parse_args()
    results = args.plot.with_suffix(".json")
    if args.replot:
        saved = json.loads(results.read_text())
        report([Row(**r) for r in saved["rows"]], saved["title"], args.plot)
        track(args.tracking_uri, [Row(**r) for r in saved["rows"]], saved["title"], args.plot)
        return
    if args.quick:
        args.items, args.users, args.train_items, args.epochs = min(args.items, 50_000), 5000, 20_000, 2
        args.queries, args.single = min(args.queries, 500), min(args.single, 100)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    print(
        f"[index] faiss {faiss.__version__}, torch {torch.__version__}, {args.threads} threads, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    vectors, queries = make_vectors(args)
    ids = np.arange(args.items)
    pq = f"pq{args.dim}x4fs"  # one dimension per 4-bit code (the sphere coordinate gets one more)
    lists = auto_nlist(args.items)  # what "ivf,..." chooses: 4096 for 1M items
    grids: list[tuple[str, str, list[str]]] = [
        ("hnsw", "hnsw32", [f"ef_search={e}" for e in (16, 32, 64, 128, 256)]),
        ("ivf-flat", "ivf,flat", [f"nprobe={max(1, lists // f)}" for f in (512, 256, 128, 64, 32)]),
        (
            "ivf-pq-fs+rflat",
            f"ivf,{pq},rflat",
            [f"nprobe={max(1, lists // f)},k_factor={k}" for f, k in PQ_GRID],
        ),
    ]
    t0 = time.perf_counter()
    exact = build_index(vectors, ids, "flat")
    build_s = time.perf_counter() - t0
    found, batch_qps, single_qps = timed(exact, queries, min(args.single, 200), args.repeats, args.threads)
    kth = np.einsum("qd,qd->q", queries, vectors[found[:, K - 1]])
    recall = recall_at_k(found, queries, vectors, kth)
    rows = [Row("exact", "flat", "", recall, batch_qps, single_qps, build_s, len(queries), args.threads)]
    print(f"[index] flat: batch {batch_qps:.0f} q/s, single {single_qps:.0f} q/s", flush=True)
    del exact
    for family, spec, settings in grids:
        gc.collect()
        t0 = time.perf_counter()
        index = build_index(vectors, ids, spec, progress=True)
        build_s = time.perf_counter() - t0
        print(f"[index] built {index.spec.structure()} in {build_s:.0f} s", flush=True)
        for setting in settings:
            set_search_params(index, setting)
            found, batch_qps, single_qps = timed(index, queries, args.single, args.repeats, args.threads)
            recall = recall_at_k(found, queries, vectors, kth)
            r = Row(family, index.spec.structure(), setting, recall, batch_qps, single_qps, build_s)
            rows.append(r)
            print(
                f"[index] {r.spec:<24} {setting:<22} recall@{K} {r.recall:.4f}  batch {r.batch_qps:9.0f} q/s "
                f"({r.batch_qps / rows[0].batch_qps:6.1f}x)  single {r.single_qps:8.0f} q/s "
                f"({r.single_qps / rows[0].single_qps:6.1f}x)",
                flush=True,
            )
        del index
    title = (
        f"{args.items:,} items x {args.dim} dims (trained item tower), inner product, faiss {faiss.__version__}, "
        f"{args.threads} threads"
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"title": title, "rows": [asdict(r) for r in rows]}, indent=1) + "\n")
    report(rows, title, args.plot)
    track(args.tracking_uri, rows, title, args.plot)


if __name__ == "__main__":
    main()
