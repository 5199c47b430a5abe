"""The candidate features of the funnel's ranking stage: what a ranker trained on the retrieval stage's
own candidates (``recsys data candidates``) reads beside the user's and item's features.

One implementation computes them for the ranking data and at serving time, from the same inputs: the
retrieval stage's answer (item indices and similarities, best first) and what the funnel *knows*
about users, i.e. the interactions of the retrieval stage's train split (the items a user touched and
the ones they liked). When the ranking data is built, that is the split the retriever trained on and
the labels come from interactions it did not see; when the funnel serves, it is the retrieval run's
own train split. Scores are made comparable across retrievers by gaps and ranks beside the raw values.

Features (raw values; a dataset stores them standardised with its train statistics, see
``DenseFeature``):

  retrieval_score           the retrieval stage's similarity
  retrieval_gap             the similarity minus the query's best candidate's (<= 0)
  retrieval_rank            log(1 + position) in the retrieval order
  item_popularity           log of the item's share of the known likes (+1 smoothing)
  item_like_rate            the item's share of liked among its known interactions, shrunk to the mean
  user_activity             log(1 + the number of items the user is known to have touched)
  history_similarity_mean   mean similarity of the candidate to the user's known items (retrieval vectors)
  history_similarity_max    the largest of those similarities
  item_item_score           EASE^R score of the candidate from the user's known likes (the low-rank
                            closed form below)
  item_item_gap             that score minus the best one among the query's candidates (<= 0)
  item_item_rank            log(1 + position) of the candidate among the query's by that score
  popularity_rank           log(1 + position) of the candidate among the query's by popularity
  touched_item_item_score   the same score from every item the user touched (liked or not), with a
                            model fitted on every known interaction: what the user will rate, beside
                            what they will like
  user_like_rate            the user's share of liked among their known interactions, shrunk to the mean

The ranks and gaps place a candidate within its list (what a listwise reranker compares); they assume
the ranker is served the number of candidates it learned from.

Everything is arrays: what is known about users is a CSR of the train pairs by user index (the
bundle's ``TrainPairs``, memory-mapped), and the features are computed for a block of queries at once.

The item-item model (``LowRankEase``) is EASE^R (Steck 2019) with its Gram matrix truncated to its top
``rank`` eigenpairs, found by a randomized range finder that applies the Gram block of users by block of
users (``gram_eigenpairs``): the closed form then needs only items x rank factors, so its memory grows
with the catalogue times the rank and its build time with the interactions, never with items^2 or users
x rank, and one code path serves MovieLens and a million items. On MovieLens-100K's validation it scores
as the dense EASE^R it replaced (NDCG@10 0.2595 at rank 256 against 0.2598), where ``implicit``'s sparse
item neighbourhoods (BM25, cosine, TF-IDF) reached at most 0.2337 (docs/FUNNEL.md, "The item-item
signal"; ``bench/item_item.py``). It is fitted once (``recsys data candidates`` for the ranking data,
the bundle's assembly for serving), stored as checksummed ``.npy`` arrays and memory-mapped at load,
never refitted. The dense EASE^R stays a baseline in bench/.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.checksums import sha256_file
from core.errors import RecsysError, require

CANDIDATE_TOWER = "candidate"
"""``DenseFeature.tower`` of the features computed per (query, candidate) by the funnel."""
FEATURES = (
    "retrieval_score",
    "retrieval_gap",
    "retrieval_rank",
    "item_popularity",
    "item_like_rate",
    "user_activity",
    "history_similarity_mean",
    "history_similarity_max",
    "item_item_score",
    "item_item_gap",
    "item_item_rank",
    "popularity_rank",
    "touched_item_item_score",
    "user_like_rate",
)
ITEM_ITEM_FEATURES = ("item_item_score", "item_item_gap", "item_item_rank", "touched_item_item_score")
LIKE_RATE_PRIOR = 5.0
"""Pseudo-interactions at the global like rate added to each item's own (shrinks rare items' rates)."""
DEFAULT_RANK = 256
DEFAULT_LAMBDA = 400.0
"""The item-item model's rank and lambda, chosen on validation (docs/FUNNEL.md, "The item-item signal")."""
PRODUCT_BUDGET = 4_000_000
"""Most entries one sub-block's gathered candidate factors or padded similarity tensor holds."""


# -- the item-item model -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemItemSpec:
    """The item-item model: EASE^R's closed form on the rank-``rank`` truncation of the Gram matrix,
    regularised by ``lam``."""

    rank: int
    lam: float

    def text(self) -> str:
        return f"low-rank EASE^R, rank {self.rank}, lambda {self.lam:g}"

    def record(self) -> dict[str, Any]:
        return {"model": "low-rank-ease", "rank": self.rank, "lambda": self.lam}


def item_item_spec(rank: int, lam: float) -> ItemItemSpec | None:
    """The spec of ``--item-item-rank`` / ``--item-item-lambda`` (rank 0: no item-item model)."""
    require(rank >= 0, f"--item-item-rank: must be >= 0 (0 leaves the item-item features out), got {rank}")
    if rank == 0:
        return None
    require(math.isfinite(lam) and lam > 0, f"--item-item-lambda: must be > 0, got {lam}")
    return ItemItemSpec(int(rank), float(lam))


def spec_from_record(record: Any, shown: str) -> ItemItemSpec:
    """The spec a dataset or bundle recorded (``ItemItemSpec.record``), one line if it is not one."""
    try:
        require(record["model"] == "low-rank-ease", f"{shown}: unknown item-item model {record['model']!r}")
        spec = item_item_spec(int(record["rank"]), float(record["lambda"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RecsysError(f"{shown}: not an item-item model record ({e})") from None
    require(spec is not None, f"{shown}: records no item-item model")
    assert spec is not None
    return spec


@dataclass
class LowRankEase:
    """EASE^R (Steck 2019: B = I - P diag(1/diag P), P = (G + lam I)^-1, G = X^T X) with the Gram
    replaced by its top-``r`` eigenpairs G ~ V diag(e) V^T. Then P = V diag(coef) V^T + I / lam with
    coef = 1/(e + lam) - 1/lam, so a user's score of item c from their items x is
    x_c - ((x V) diag(coef) V_c + x_c / lam) / diag_c: ``vectors`` V (items x r), ``coef`` and the
    diagonal of P (``diag``) are all it needs. Memory grows with items x r, never items^2; with r at the
    Gram's rank it is EASE^R exactly."""

    vectors: np.ndarray
    coef: np.ndarray
    diag: np.ndarray
    lam: float

    @property
    def size(self) -> int:
        return len(self.diag)


def user_item_matrix(indptr: np.ndarray, items: np.ndarray, keep: np.ndarray | None, n_items: int) -> Any:
    """Users x items binary CSR of a CSR of pairs (``keep``: which pairs count; duplicates once)."""
    import scipy.sparse as sp

    items = np.asarray(items, np.int64)
    indptr = np.asarray(indptr, np.int64)
    if keep is not None:
        keep = np.asarray(keep, bool)
        row_of = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        counts = np.bincount(row_of[keep], minlength=len(indptr) - 1)
        indptr = np.r_[0, np.cumsum(counts)].astype(np.int64)
        items = items[keep]
    x = sp.csr_matrix(
        (np.ones(len(items), np.float32), items, indptr), shape=(len(indptr) - 1, n_items), dtype=np.float32
    )
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


GRAM_BLOCK_FLOATS = 16_000_000
"""Floats of one block's products in ``gram_product`` (at most interactions x (rank + 10)): 64 MB."""


def gram_product(x: Any, q: np.ndarray, block_nnz: int | None = None) -> np.ndarray:
    """X^T (X q) for a users x items binary CSR ``x`` and an items x l ``q``, summed over blocks of users
    with scipy's sparse-dense products: a block's X_b q (block users x l), then X_b^T of it restricted to
    the items the block touched (touched x l), added into those rows. Nothing users x l or a second
    items x l is ever held."""
    from scipy import sparse

    dense = np.ascontiguousarray(q)
    out = np.zeros_like(dense)
    indptr = np.asarray(x.indptr, np.int64)
    block_nnz = block_nnz if block_nnz is not None else max(1, GRAM_BLOCK_FLOATS // dense.shape[1])
    for lo, hi in user_blocks(indptr, block_nnz):
        start, end = indptr[lo], indptr[hi]
        touched, local = np.unique(np.asarray(x.indices[start:end]), return_inverse=True)
        block = sparse.csr_matrix(
            (np.ones(end - start, dense.dtype), local.reshape(-1), indptr[lo : hi + 1] - start),
            shape=(hi - lo, len(touched)),
        )
        out[touched] += block.T @ (block @ dense[touched])
    return out


def user_blocks(indptr: np.ndarray, block_nnz: int) -> Iterator[tuple[int, int]]:
    """Consecutive user ranges holding about ``block_nnz`` interactions (and at most as many users) each,
    at least one user."""
    n = len(indptr) - 1
    lo = 0
    while lo < n:
        hi = int(np.searchsorted(indptr, indptr[lo] + block_nnz, side="right")) - 1
        hi = min(max(hi, lo + 1), n, lo + block_nnz)
        yield lo, hi
        lo = hi


def gram_eigenpairs(
    x: Any, rank: int, n_iter: int = 5, oversamples: int = 10, seed: int = 0, block_nnz: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The top-``rank`` eigenvalues (descending) and eigenvectors (items x rank, float32) of the Gram
    G = X^T X of a users x items CSR, by the randomized range finder with power iterations and a
    Rayleigh-Ritz step (Halko, Martinsson & Tropp 2011, algorithms 4.4 and 5.3).

    Why not scikit-learn's ``randomized_svd`` (what this replaced): it factors X itself, so its working
    matrices are users x (rank + 10) in float64 (5 GB each at 2.5M users) beside the items x (rank + 10)
    ones; scipy's ``eigsh`` on a LinearOperator (ARPACK) keeps 2 x rank float64 Lanczos vectors and
    multiplies one vector at a time. Here G is only ever applied through ``gram_product`` (blocks of
    users), so the memory is a few items x (rank + 10) float32 matrices, and the time grows with the
    interactions. Five power iterations (G^5, one more than scikit-learn's default on X, whose four give
    X (X^T X)^4) reach its accuracy; tests check it against scikit-learn's randomized SVD and a dense
    eigendecomposition."""
    n_items = x.shape[1]
    width = max(1, min(rank + oversamples, n_items))
    generator = torch.Generator().manual_seed(seed)
    q = orthonormal(torch.randn(n_items, width, generator=generator).numpy())
    for _ in range(n_iter):
        y = gram_product(x, q, block_nnz)
        del q  # at most three items x width matrices at once: y, the factorisation's copy and its Q
        q = orthonormal(y)
        del y
    ritz = (q.T @ gram_product(x, q, block_nnz)).astype(np.float64)
    values, vectors = np.linalg.eigh((ritz + ritz.T) / 2)
    top = np.argsort(-values, kind="stable")[: min(rank, width)]
    return np.clip(values[top], 0, None), q @ vectors[:, top].astype(np.float32)


def orthonormal(y: np.ndarray) -> np.ndarray:
    """An orthonormal basis of ``y``'s columns (Householder QR, torch's LAPACK), C-contiguous float32."""
    return np.ascontiguousarray(torch.linalg.qr(torch.from_numpy(y)).Q.numpy())


def fit_low_rank_ease(user_items: Any, spec: ItemItemSpec, seed: int = 0) -> LowRankEase:
    """``LowRankEase`` of a users x items CSR from the top eigenpairs of its Gram (``gram_eigenpairs``:
    memory a few items x (rank + 10) floats, never users x rank)."""
    x = user_items.tocsr()
    rank = max(1, min(spec.rank, min(x.shape) - 1))
    eigenvalues, vectors = gram_eigenpairs(x, rank, seed=seed)
    coef = 1.0 / (eigenvalues.astype(np.float64) + spec.lam) - 1.0 / spec.lam
    diag = (
        np.concatenate(  # by blocks of items: no items x rank float64 copy
            [(vectors[lo : lo + 65536].astype(np.float64) ** 2) @ coef for lo in range(0, len(vectors), 65536)]
        )
        + 1.0 / spec.lam
    )
    return LowRankEase(vectors.astype(np.float32), coef.astype(np.float32), diag.astype(np.float32), spec.lam)


@dataclass
class ItemItem:
    """The item-item models behind ``ITEM_ITEM_FEATURES``: one fitted on the known likes (``liked``), one
    on every known interaction (``touched``)."""

    spec: ItemItemSpec
    liked: LowRankEase
    touched: LowRankEase


def fit_item_item(known: Known, n_items: int, spec: ItemItemSpec) -> ItemItem:
    """Both models from the known interactions (a CSR by user index, items in ``[0, n_items)``)."""
    liked = fit_low_rank_ease(user_item_matrix(known.indptr, known.items, known.positive, n_items), spec)
    touched = fit_low_rank_ease(user_item_matrix(known.indptr, known.items, None, n_items), spec)
    return ItemItem(spec, liked, touched)


ARRAYS = ("vectors", "coef", "diag")
MANIFEST = "item_item.json"


class _Writes:
    """A file seen only through its ``write``: numpy then writes ``.npy`` data with Python's writes, which
    report a full disk as ENOSPC, where its fast path (``ndarray.tofile``) raises an OSError without an
    errno ("N requested and M written") that no caller can name."""

    def __init__(self, f: Any) -> None:
        self.write = f.write


def write_npy(path: Path, array: np.ndarray) -> None:
    """``np.save`` of ``array`` to ``path`` (in chunks; a full disk is an OSError with errno ENOSPC)."""
    with open(path, "wb") as f:
        np.lib.format.write_array(_Writes(f), np.asarray(array), allow_pickle=False)


def save_item_item(model: ItemItem, directory: Path, dataset: str) -> None:
    """Write ``model`` as ``.npy`` arrays with a manifest of their SHA-256s, its spec and ``dataset`` (the
    fingerprint of the retrieval stage's dataset whose item indices it uses)."""
    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for part in ("liked", "touched"):
        for name in ARRAYS:
            path = directory / f"{part}.{name}.npy"
            write_npy(path, getattr(getattr(model, part), name))
            files[path.name] = sha256_file(path)
    manifest = {"spec": model.spec.record(), "items": model.liked.size, "dataset": dataset, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def load_item_item(directory: Path, dataset: str, n_items: int, shown: str, mmap: bool = True) -> ItemItem:
    """The item-item models written by ``save_item_item``, memory-mapped (``mmap``; else read), after
    checking (one line each)
    that every file is there with its recorded SHA-256, that they belong to ``dataset`` and hold
    ``n_items`` items, and that the arrays are well formed (a crafted array never reaches a product)."""
    path = directory / MANIFEST
    require(path.is_file(), f"{shown}: no {MANIFEST} (the item-item model is missing; assemble the bundle again)")
    try:
        manifest = json.loads(path.read_text())
        record, files = manifest["spec"], dict(manifest["files"])
        recorded_dataset, items = str(manifest["dataset"]), int(manifest["items"])
    except (ValueError, KeyError, TypeError) as e:
        raise RecsysError(f"{shown}/{MANIFEST}: not a readable item-item manifest ({e})") from None
    spec = spec_from_record(record, f"{shown}/{MANIFEST}")
    require(
        recorded_dataset == dataset,
        f"{shown}: its item-item model was fitted on another dataset ({recorded_dataset}, not {dataset})",
    )
    require(items == n_items, f"{shown}: its item-item model holds {items} items, the retrieval stage {n_items}")
    parts = {}
    for part in ("liked", "touched"):
        arrays = {}
        for name in ARRAYS:
            file = directory / f"{part}.{name}.npy"
            require(file.is_file(), f"{shown}/{file.name}: missing")
            recorded = files.get(file.name)
            require(recorded == sha256_file(file), f"{shown}/{file.name}: its SHA-256 is not the recorded one")
            try:
                arrays[name] = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (ValueError, OSError) as e:
                raise RecsysError(f"{shown}/{file.name}: not a readable .npy array ({e})") from None
        parts[part] = check_model(LowRankEase(lam=spec.lam, **arrays), n_items, spec, f"{shown}/{part}")
    return ItemItem(spec, parts["liked"], parts["touched"])


def check_model(model: LowRankEase, n_items: int, spec: ItemItemSpec, shown: str) -> LowRankEase:
    """``model`` if its arrays fit together and ``spec``, else one line naming what is wrong."""
    v, coef, diag = model.vectors, model.coef, model.diag
    require(v.ndim == 2 and v.dtype == np.float32, f"{shown}.vectors: a 2-d float32 array expected")
    require(coef.ndim == 1 and coef.dtype == np.float32, f"{shown}.coef: a 1-d float32 array expected")
    require(diag.ndim == 1 and diag.dtype == np.float32, f"{shown}.diag: a 1-d float32 array expected")
    require(v.shape[0] == n_items, f"{shown}.vectors: {v.shape[0]} rows for {n_items} items")
    require(len(diag) == n_items, f"{shown}.diag: {len(diag)} entries for {n_items} items")
    require(v.shape[1] == len(coef) <= spec.rank, f"{shown}: rank {v.shape[1]} vectors, {len(coef)} coefficients")
    require(bool(np.isfinite(coef).all()) and bool((coef <= 0).all()), f"{shown}.coef: not EASE^R coefficients")
    require(bool(np.isfinite(diag).all()) and bool((diag > 0).all()), f"{shown}.diag: a value that is not positive")
    require(bool(np.isfinite(v).all()), f"{shown}.vectors: a value that is not finite")
    return model


# -- what is known about users -------------------------------------------------------------------------


def csr_order(rows: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The CSR row pointer of pairs by ``rows`` (in ``[0, n_rows)``) and the stable order that groups
    them: the one CSR build of pairs by user (``Known``, ``modules.funnel.TrainPairs``)."""
    rows = np.asarray(rows, np.int64)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows)[:n_rows], out=indptr[1:])
    return indptr, np.argsort(rows, kind="stable")


@dataclass
class Known:
    """Known interactions as a CSR by row (a user, or a query): row ``r``'s items (retrieval item
    indices) are ``items[indptr[r]:indptr[r + 1]]``, ``positive`` whether each was liked."""

    indptr: np.ndarray
    items: np.ndarray
    positive: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.indptr) - 1

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, label: np.ndarray, n_users: int) -> Known:
        """From (user index, item index, label) rows, users in ``[0, n_users)``."""
        indptr, order = csr_order(users, n_users)
        return cls(indptr, np.asarray(items, np.int64)[order], (np.asarray(label, np.float64) > 0.5)[order])

    @classmethod
    def from_lists(cls, lists: list[np.ndarray]) -> Known:
        """Anonymous queries: each a list of item indices, all liked."""
        lengths = np.array([len(x) for x in lists], np.int64)
        items = np.concatenate(lists).astype(np.int64) if lists else np.zeros(0, np.int64)
        return cls(np.r_[0, np.cumsum(lengths)].astype(np.int64), items, np.ones(len(items), bool))

    def take(self, rows: np.ndarray) -> Known:
        """The CSR of ``rows`` (in that order; a row out of range is empty)."""
        rows = np.asarray(rows, np.int64)
        inside = (rows >= 0) & (rows < self.rows)
        safe = np.where(inside, rows, 0)
        starts = np.where(inside, self.indptr[safe], 0)
        lengths = np.where(inside, self.indptr[safe + 1] - self.indptr[safe], 0)
        indptr = np.r_[0, np.cumsum(lengths)].astype(np.int64)
        flat = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
        return Known(indptr, np.asarray(self.items)[flat].astype(np.int64), np.asarray(self.positive)[flat])

    def only(self, keep: np.ndarray) -> Known:
        """The same rows with only the pairs where ``keep``."""
        counts = np.zeros(self.rows, np.int64)
        row_of = np.repeat(np.arange(self.rows), np.diff(self.indptr))
        np.add.at(counts, row_of[keep], 1)
        return Known(np.r_[0, np.cumsum(counts)].astype(np.int64), self.items[keep], self.positive[keep])


# -- the features --------------------------------------------------------------------------------------


def list_rank(values: np.ndarray) -> np.ndarray:
    """log(1 + position) of each entry within its row, largest first (ties: the earlier entry first)."""
    order = np.argsort(-values, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(values.shape[1])[None, :].repeat(len(values), 0), axis=1)
    return np.log1p(rank.astype(np.float32))


def row_chunks(lengths: np.ndarray, width: int, budget: int = PRODUCT_BUDGET) -> Iterator[slice]:
    """Consecutive row ranges whose total ``lengths`` x ``width`` stays within ``budget`` (a row alone
    may exceed it)."""
    cost = np.cumsum(np.asarray(lengths, np.int64) * max(width, 1))
    lo, m = 0, len(lengths)
    while lo < m:
        base = cost[lo - 1] if lo else 0
        hi = int(np.searchsorted(cost, base + budget, side="right"))
        hi = max(hi, lo + 1)
        yield slice(lo, min(hi, m))
        lo = hi


def item_item_scores(rows: Known, keep: np.ndarray | None, model: LowRankEase, cand: np.ndarray) -> np.ndarray:
    """(m, n) EASE^R scores (``LowRankEase``) of each row's candidates ``cand`` from its items (those where
    ``keep``; an item twice counts once), in sub-blocks of rows whose gathered candidate factors stay
    within ``PRODUCT_BUDGET``. Plain arrays and torch's index_add/bmm, no sparse matrix: one user's
    request costs tens of microseconds here, where building a scipy matrix alone took hundreds."""

    m, n = cand.shape
    size = np.int64(model.size)
    row_of = np.repeat(np.arange(m, dtype=np.int64), np.diff(rows.indptr))
    items = np.asarray(rows.items, np.int64)
    if keep is not None:
        row_of, items = row_of[keep], items[keep]
    keys = np.unique(row_of * size + items)  # sorted: a row's items, each once
    vectors = np.asarray(model.vectors)
    rank = vectors.shape[1]
    summed = torch.zeros((m, rank), dtype=torch.float32)
    summed.index_add_(0, torch.from_numpy(keys // size), torch.from_numpy(vectors[keys % size]))
    xv = summed * torch.tensor(np.asarray(model.coef))[None, :]  # (m, r): x V diag(coef)
    inside = np.zeros((m, n), np.float32)
    if len(keys):
        wanted = np.arange(m, dtype=np.int64)[:, None] * size + cand
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        inside = (keys[at] == wanted).astype(np.float32)
    out = np.zeros((m, n), np.float32)
    diag = np.asarray(model.diag)
    for part in row_chunks(np.full(m, n), rank):
        factors = torch.from_numpy(vectors[cand[part]])  # (c, n, r)
        low_rank = torch.bmm(factors, xv[part][:, :, None])[:, :, 0].numpy()
        out[part] = inside[part] - (low_rank + inside[part] / model.lam) / diag[cand[part]]
    return out


def history_similarities(
    rows: Known, vectors: np.ndarray, has_vector: np.ndarray, cand: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(m, n) mean and max similarity of each candidate to the row's items that have a vector (0 for a
    row without any). The mean is the candidate's similarity to the sum of the row's vectors over their
    count; the max comes from batched products of padded histories (rows of similar length together,
    torch's bmm: numpy's batched matmul of small matrices is several times slower)."""

    m, n = cand.shape
    keep = has_vector[rows.items]
    rows = rows.only(keep)
    lengths = np.diff(rows.indptr)
    dim = vectors.shape[1]
    mean = np.zeros((m, n), np.float32)
    best = np.zeros((m, n), np.float32)
    cand_vectors = torch.from_numpy(np.ascontiguousarray(vectors[cand]))  # (m, n, d)
    row_of = np.repeat(np.arange(m), lengths)
    sums = torch.zeros((m, dim), dtype=torch.float32)
    sums.index_add_(0, torch.from_numpy(row_of), torch.from_numpy(np.ascontiguousarray(vectors[rows.items])))
    has = lengths > 0
    mean[has] = (
        (torch.bmm(cand_vectors[has], sums[torch.from_numpy(has)][:, :, None])[:, :, 0]).numpy() / lengths[has][:, None]
    )
    order = np.argsort(lengths, kind="stable")
    order = order[lengths[order] > 0]
    for part in row_chunks(lengths[order], n):
        q = order[part]
        width = int(lengths[q].max())
        offsets = np.arange(width)[None, :]
        valid = offsets < lengths[q][:, None]
        at = np.where(valid, rows.indptr[q][:, None] + offsets, 0)
        history = torch.from_numpy(np.ascontiguousarray(vectors[rows.items[at]]))  # (c, L, d)
        sims = torch.bmm(history, cand_vectors[q].transpose(1, 2))  # (c, L, n)
        sims.masked_fill_(torch.from_numpy(~valid)[:, :, None], -torch.inf)
        best[q] = sims.amax(dim=1).numpy()
    return mean, best


class CandidateFeatures:
    """Computes ``FEATURES`` for candidates given as retrieval item indices, for a block of queries.

    ``known``: the known interactions by user index (CSR, retrieval item indices); ``n_items``: the
    retrieval stage's vocabulary size + 1; ``index_items``: the item indices the index holds, in its
    order, with their ``vectors`` (what similarity the index searches by); ``item_item``: the fitted
    item-item models (None: those features are zero).
    """

    def __init__(
        self,
        known: Known,
        n_items: int,
        index_items: np.ndarray,
        vectors: np.ndarray,
        item_item: ItemItem | None = None,
    ) -> None:
        self.known = known
        index_items = np.asarray(index_items, np.int64)
        require(
            len(index_items) == 0 or (index_items.min() > 0 and index_items.max() < n_items),
            "candidate features: an indexed item is outside the retrieval stage's vocabulary",
        )
        dim = vectors.shape[1] if vectors.ndim == 2 else 0
        self.vectors = np.zeros((n_items, dim), np.float32)
        self.vectors[index_items] = vectors
        self.in_index = np.zeros(n_items, bool)
        self.in_index[index_items] = True
        if item_item is not None:
            require(
                item_item.liked.size == n_items and item_item.touched.size == n_items,
                f"candidate features: the item-item model holds {item_item.liked.size} items, "
                f"the retrieval stage {n_items}",
            )
        self.item_item = item_item
        items = np.asarray(known.items, np.int64)
        liked = np.asarray(known.positive, bool)
        counted = self.in_index[items]
        positives = np.bincount(items[liked & counted], minlength=n_items).astype(np.float64)
        counts = np.bincount(items[counted], minlength=n_items).astype(np.float64)
        rate = float(liked[counted].mean()) if counted.any() else 0.5
        indexed = max(int(self.in_index.sum()), 1)
        self.popularity = np.log((positives + 1.0) / (positives.sum() + indexed)).astype(np.float32)
        self.like_rate = ((positives + LIKE_RATE_PRIOR * rate) / (counts + LIKE_RATE_PRIOR)).astype(np.float32)
        self.prior_like_rate = rate

    def rows_of(self, users: np.ndarray) -> Known:
        """What is known about user indices (0 or unknown: nothing), items outside the index left out."""
        rows = self.known.take(np.asarray(users, np.int64))
        return rows.only(self.in_index[rows.items])

    def rows_of_histories(self, histories: list[np.ndarray]) -> Known:
        """Anonymous queries' items (item indices; 0 and items outside the index left out), all liked."""
        return Known.from_lists([h[self.in_index[np.asarray(h, np.int64)]] for h in histories])

    def compute(
        self, cand: np.ndarray, scores: np.ndarray, rows: Known, anonymous: bool = False
    ) -> dict[str, np.ndarray]:
        """(queries, N) float32 arrays of every feature for candidates ``cand`` (item indices, 0 where the
        index had no more) with similarities ``scores``, best first; ``rows``: each query's known items
        (``rows_of`` / ``rows_of_histories``); ``anonymous``: queries with no user (like rate: the prior)."""
        m, n = cand.shape
        cand = np.asarray(cand, np.int64)
        valid = cand > 0
        if not self.in_index[cand[valid]].all():
            raise RecsysError("candidate features: a candidate is not in the retrieval index")
        finite = np.where(valid, scores, 0.0).astype(np.float32)
        touched = np.diff(rows.indptr)
        row_of = np.repeat(np.arange(m), touched)
        if anonymous:
            user_rate = np.full(m, self.prior_like_rate, np.float32)
        else:
            likes = np.bincount(row_of[rows.positive], minlength=m).astype(np.float64)
            user_rate = ((likes + LIKE_RATE_PRIOR * self.prior_like_rate) / (touched + LIKE_RATE_PRIOR)).astype(
                np.float32
            )
        sim_mean, sim_max = history_similarities(rows, self.vectors, self.in_index, cand)
        out = {
            "retrieval_score": finite,
            "retrieval_gap": finite - finite[:, :1],
            "retrieval_rank": np.broadcast_to(np.log1p(np.arange(n, dtype=np.float32)), (m, n)).copy(),
            "item_popularity": self.popularity[cand],
            "item_like_rate": self.like_rate[cand],
            "user_activity": np.repeat(np.log1p(touched).astype(np.float32)[:, None], n, 1),
            "user_like_rate": np.repeat(user_rate[:, None], n, 1),
            "history_similarity_mean": sim_mean,
            "history_similarity_max": sim_max,
        }
        item_item = np.zeros((m, n), np.float32)
        touched_item_item = np.zeros((m, n), np.float32)
        if self.item_item is not None:
            item_item = item_item_scores(rows, rows.positive, self.item_item.liked, cand)
            touched_item_item = item_item_scores(rows, None, self.item_item.touched, cand)
        best = np.where(valid, item_item, -np.inf).max(axis=1, keepdims=True)
        out.update(
            item_item_score=item_item,
            item_item_gap=np.where(np.isfinite(best), item_item - best, 0.0).astype(np.float32),
            item_item_rank=list_rank(np.where(valid, item_item, -np.inf)),
            popularity_rank=list_rank(np.where(valid, out["item_popularity"], -np.inf)),
            touched_item_item_score=touched_item_item,
        )
        return {name: np.where(valid, value, 0.0).astype(np.float32) for name, value in out.items()}
