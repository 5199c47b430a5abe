"""From trained runs to recommendations: the item index against brute force, `recsys recommend` with
its exclusions, raw ids and fallbacks, and the refusals (one line each)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import shrink

from app.bundle import assemble_bundle, load_bundle
from app.cli import main
from app.stages import fetch_stage, load_stage
from app.train import run_training
from modules.funnel import MODEL, POPULAR
from modules.index import load_index, read_manifest, search

K = 5


@dataclasses.dataclass
class Runs:
    tracking: str
    retrieval: str
    ranking: str
    other: str
    """A second two-tower run (other seed): its index must not serve ``retrieval``."""
    data: Path
    work: Path


def train_runs(data: Path, work: Path, other: bool = True) -> Runs:
    """A tiny two-tower (twice, two seeds, unless not ``other``) and a tiny DLRM trained on ``data``, tracked."""
    uri = f"sqlite:///{work}/mlflow.db"

    def train(preset: str, *flags: str) -> str:
        cfg = shrink(preset, data, work, *flags, tracking=True)
        return str(run_training(cfg)["run_id"])

    retrieval, ranking = train("two-tower-movielens"), train("dlrm-movielens")
    return Runs(uri, retrieval, ranking, train("two-tower-movielens", "--seed=7") if other else "", data, work)


@pytest.fixture(scope="module")
def runs(ml_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return train_runs(ml_dataset, tmp_path_factory.mktemp("funnel"))


def cli(capsys: pytest.CaptureFixture[str], runs: Runs, *args: str) -> tuple[int, str, str]:
    code = main([*args, "--tracking-uri", runs.tracking])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("recsys: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_exact_index_equals_brute_force_with_the_model(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "index"
    code, out, err = cli(capsys, runs, "index", "--run-id", runs.retrieval, "--index", "flat", "--out", str(out_dir))
    assert code == 0, err
    assert "indexed" in out and read_manifest(out_dir)["spec"] == "flat"
    stage_dir = fetch_stage(runs.retrieval, runs.tracking, tmp_path / "stage", "--run-id", with_pairs=False)
    stage = load_stage(stage_dir)
    from app.stages import stage_fingerprint

    index = load_index(out_dir, stage_fingerprint(stage_dir))
    vectors = pd.read_parquet(out_dir / "vectors.parquet")
    assert len(vectors) == index.count == len(stage.items.present)
    assert set(vectors["item"]) == set(stage.item_vocab)  # raw ids, not vocabulary indices

    # brute force: the model's own tower outputs (its forward pass), every user against every item
    from datamodules.corpus import tower_inputs

    users = pd.read_parquet(stage_dir / "users.parquet")
    items = pd.read_parquet(stage_dir / "items.parquet")
    with torch.no_grad():
        u = stage.model(*tower_inputs(users, stage.meta))[0].numpy()
        v = stage.model(*tower_inputs(items, stage.meta))[1].numpy()
    scores = u @ v.T
    raw_items = np.array(stage.item_vocab)[items["item_id"].to_numpy() - 1]
    top = np.argsort(-scores, axis=1, kind="stable")[:, : K + 1]
    found_scores, found = search(index, u, K)
    np.testing.assert_allclose(found_scores, np.take_along_axis(scores, top[:, :K], 1), rtol=1e-4, atol=1e-5)
    gap = np.take_along_axis(scores, top[:, K - 1 : K], 1) - np.take_along_axis(scores, top[:, K : K + 1], 1)
    untied = gap[:, 0] > 1e-5
    assert untied.mean() > 0.9
    assert (found[untied] == raw_items[top[untied, :K]]).all()

    client_paths = {
        a.path
        for a in __import__("mlflow").tracking.MlflowClient(runs.tracking).list_artifacts(runs.retrieval, "index")
    }
    assert {"index/manifest.json", "index/index.faiss", "index/vectors.parquet"} <= client_paths


@pytest.fixture(scope="module")
def bundle(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_bundle(assemble_bundle(runs.retrieval, runs.ranking, tmp_path_factory.mktemp("bundle"), runs.tracking))


def train_items(runs: Runs, bundle: Any) -> dict[str, set[str]]:
    """raw user id -> raw ids of the user's train items, from the dataset itself."""
    stage = bundle.recommender.retrieval
    pairs = pd.read_parquet(runs.data / "pairs" / "train.parquet")
    out: dict[str, set[str]] = {}
    for u, i in zip(pairs.user_id, pairs.item_id, strict=True):
        out.setdefault(stage.user_vocab[u - 1], set()).add(stage.item_vocab[i - 1])
    return out


def test_recommend_excludes_seen_items_and_returns_raw_ids(runs: Runs, bundle: Any) -> None:
    rec = bundle.recommender
    seen = train_items(runs, bundle)
    users = sorted(seen)[:20]
    for ranking in (None, rec.ranking):
        rec.ranking = ranking
        results = rec.recommend_users(users, k=K, candidates=30)
        for user, r in zip(users, results, strict=True):
            assert r.source == MODEL and len(r.items) == K and len(set(r.items)) == K
            assert not set(r.items) & seen[user], user
            assert set(r.items) <= set(rec.retrieval.item_vocab)
            assert r.scores == sorted(r.scores, reverse=True)
    rec.ranking = bundle.recommender.ranking


def test_bundle_keeps_train_pairs_and_histories_as_memory_mapped_arrays_equal_to_the_dataset(
    runs: Runs, tmp_path: Path
) -> None:
    """The bundle's train pairs and histories are CSR arrays streamed from the dataset's Parquet files
    and memory-mapped on load (workers of one machine share them): the same pairs, labels, positives
    per item and histories as the tables read whole."""
    from datamodules.histories import UserHistories
    from modules.funnel import TrainPairs

    root = assemble_bundle(runs.retrieval, None, tmp_path / "bundle", runs.tracking)
    rec = load_bundle(root).recommender
    meta = rec.retrieval.meta
    n_users, n_items = meta.feature("user_id").cardinality, meta.feature("item_id").cardinality
    table = pd.read_parquet(runs.data / "pairs" / "train.parquet")
    whole = TrainPairs.from_frame(table, n_users, n_items)
    served = rec.seen
    assert isinstance(served.items, np.memmap) and isinstance(served.indptr, np.memmap)
    np.testing.assert_array_equal(served.indptr, whole.indptr)
    for u in range(n_users):  # the same (item, label) multiset per user
        lo, hi = int(whole.indptr[u]), int(whole.indptr[u + 1])
        mine = sorted(zip(served.items[lo:hi].tolist(), rec_positive(root)[lo:hi].tolist(), strict=True))
        assert mine == sorted(zip(whole.items[lo:hi].tolist(), whole.positive[lo:hi].tolist(), strict=True))
    np.testing.assert_array_equal(np.load(root / "retrieval" / "train" / "item_positives.npy"), whole.item_positives)
    if meta.history:
        stored = UserHistories.from_table(pd.read_parquet(runs.data / "histories.parquet"), n_users)
        loaded = rec.retrieval.histories
        assert loaded is not None
        assert torch.equal(loaded.offsets, stored.offsets) and torch.equal(loaded.values.long(), stored.values)


def rec_positive(root: Path) -> np.ndarray:
    return np.load(root / "retrieval" / "train" / "pairs.positive.npy")


def test_crafted_bundle_arrays_are_refused_in_one_line(runs: Runs, tmp_path: Path) -> None:
    """A bundle whose arrays are pickled objects, truncated or out of range is refused in one line
    naming the file, even when its bundle.json lists their hashes; nothing in them runs."""
    import shutil

    from core.checksums import checksums
    from core.errors import RecsysError

    base = assemble_bundle(runs.retrieval, None, tmp_path / "base", runs.tracking)
    marker = tmp_path / "PWNED"
    train = Path("retrieval") / "train"
    cases = {
        "pickled objects": (train / "pairs.items.npy", np.array([Payload(marker)], dtype=object), "unreadable"),
        "ids past the vocabulary": (train / "pairs.items.npy", None, "item ids outside"),
        "offsets cut short": (train / "pairs.indptr.npy", np.zeros(3, np.int64), "do not index"),
        "flags of another length": (train / "pairs.positive.npy", np.zeros(2, np.bool_), "flags for"),
        "a matrix": (train / "item_positives.npy", np.zeros((2, 2), np.int64), "not a flat array"),
    }
    for i, (case, (name, array, message)) in enumerate(cases.items()):
        root = tmp_path / f"case{i}"
        shutil.copytree(base, root)
        if array is None:
            array = np.load(root / name).copy()
            array[-1] = 10**6
        np.save(root / name, array, allow_pickle=True)
        manifest = json.loads((root / "bundle.json").read_text())
        manifest["files"] = checksums(root, exclude=["bundle.json"])
        (root / "bundle.json").write_text(json.dumps(manifest))
        with pytest.raises(RecsysError) as e:
            load_bundle(root)
        assert message in str(e.value) and name.name in str(e.value) and "\n" not in str(e.value), (case, e.value)
        assert not marker.exists(), case


def test_rerank_orders_the_candidates_by_retrieval_logit_plus_log_ranking_probability(bundle: Any) -> None:
    rec = bundle.recommender
    user = rec.retrieval.user_vocab[0]
    ranked = rec.recommend_users([user], k=K, candidates=20)[0]
    query = rec.retrieval.embed("user", rec.retrieval.user_index([user]))
    found = rec.candidates(query, [rec.seen[1]], 20)
    assert set(ranked.items) <= set(found.ids[0].tolist())  # the top K come from the candidates
    probabilities = rec.rank([user], found)
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    joint = found.scores / rec.retrieval.arch.temperature + np.log(probabilities)
    want = [found.ids[0][j] for j in np.argsort(-joint[0], kind="stable")[:K]]
    assert ranked.items == want
    assert ranked.scores == pytest.approx(sorted(joint[0], reverse=True)[:K], rel=1e-5)


def test_unknown_user_gets_the_most_popular_items_marked(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = pd.read_parquet(runs.data / "pairs" / "train.parquet")
    code, out, err = cli(capsys, runs, "recommend", "--retrieval", runs.retrieval, "--user", "no-such-user", "--k", "3")
    assert code == 0, err
    assert "unknown user" in err and "most popular" in err
    lines = out.splitlines()[1:]
    assert len(lines) == 3 and all(POPULAR in line for line in lines)
    counts = pairs[pairs.label > 0.5].item_id.value_counts()
    assert float(lines[0].split()[3]) == pytest.approx(counts.max() / counts.sum(), abs=1e-4)


def test_history_skips_unknown_items_and_an_empty_history_is_popular(
    bundle: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rec = bundle.recommender
    liked = rec.retrieval.item_vocab[:3]
    with caplog.at_level("WARNING"):
        known, mixed, empty, unknown = rec.recommend_histories(
            [liked, [*liked, "no-such-item"], [], ["no-such-item"]], k=K, candidates=30
        )
    assert "skipping 1 unknown item id(s): no-such-item" in caplog.text
    assert known.source == MODEL and not set(known.items) & set(liked)
    assert mixed.items == known.items  # the unknown id changed nothing
    assert empty.source == unknown.source == POPULAR and empty.items == rec.most_popular(K).items


def test_recommend_cli_batch_mode_writes_parquet(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    users = tmp_path / "users.txt"
    users.write_text("1\n2\nnobody\n")
    out = tmp_path / "recs.parquet"
    code, printed, err = cli(
        capsys,
        runs,
        "recommend",
        "--retrieval",
        runs.retrieval,
        "--ranking",
        runs.ranking,
        "--users",
        str(users),
        "--k",
        "4",
        "--out",
        str(out),
    )
    assert code == 0, err
    table = pd.read_parquet(out)
    assert str(out) in printed
    assert list(table.columns[:5]) == ["user", "rank", "item", "score", "source"]
    assert table.groupby("user").size().to_dict() == {"1": 4, "2": 4, "nobody": 4}
    assert set(table[table.user == "nobody"].source) == {POPULAR}


def test_history_cli(runs: Runs, bundle: Any, capsys: pytest.CaptureFixture[str]) -> None:
    liked = ",".join(bundle.recommender.retrieval.item_vocab[:2])
    code, out, err = cli(capsys, runs, "recommend", "--retrieval", runs.retrieval, "--history", liked + ",zzz")
    assert code == 0, err
    assert "skipping 1 unknown item id(s): zzz" in err
    assert len(out.splitlines()) == 1 + 10
    assert out.splitlines()[0].split()[-1] == "title" and "Movie " in out  # titles from item_titles.parquet


def test_refusals_are_one_line(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other_index = tmp_path / "other"
    assert cli(capsys, runs, "index", "--run-id", runs.other, "--out", str(other_index))[0] == 0
    code, _, err = cli(
        capsys, runs, "recommend", "--retrieval", runs.retrieval, "--user", "1", "--index", str(other_index)
    )
    assert code == 2 and "rebuild it for this model" in one_line(err)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs.tracking)
    empty = client.create_run(client.get_run(runs.retrieval).info.experiment_id).info.run_id  # no weights logged
    cases = [
        (["recommend", "--retrieval", empty, "--user", "1"], "the run has no model_state/state_dict.pt"),
        (["recommend", "--retrieval", runs.retrieval], "exactly one of --user"),
        (["recommend", "--retrieval", runs.retrieval, "--user", "1", "--history", "1"], "exactly one of --user"),
        (["recommend", "--retrieval", runs.retrieval, "--user", "1", "--k", "0"], "--k: must be at least 1"),
        (["recommend", "--retrieval", runs.ranking, "--user", "1"], "cannot retrieve"),
        (["recommend", "--retrieval", "0" * 32, "--user", "1"], "--retrieval " + "0" * 32),
        (["index", "--run-id", runs.ranking], "cannot retrieve"),
        (["index", "--run-id", runs.retrieval, "--index", "hnsw"], "hnsw needs its M"),
        (["recommend", "--retrieval", runs.retrieval, "--users", str(tmp_path / "nope.txt")], "no such file"),
    ]
    for args, message in cases:
        code, _, err = cli(capsys, runs, *args)
        assert code == 2 and message in one_line(err), (args, err)


def test_index_is_bound_to_the_vocabularies_too(runs: Runs, tmp_path: Path) -> None:
    stage_dir = fetch_stage(runs.retrieval, runs.tracking, tmp_path / "stage", "--run-id", with_pairs=False)
    from app.bundle import build_item_index
    from app.stages import stage_fingerprint

    build_item_index(stage_dir, "flat", tmp_path / "index", progress=False)
    vocab = stage_dir / "vocab" / "item_id.json"
    vocab.write_text(json.dumps(list(reversed(json.loads(vocab.read_text())))))
    from core.errors import RecsysError

    with pytest.raises(RecsysError, match="rebuild it for this model"):
        load_index(tmp_path / "index", stage_fingerprint(stage_dir))


def test_prepare_keeps_item_titles_beside_the_shards(ml_dataset: Path) -> None:
    titles = pd.read_parquet(ml_dataset / "item_titles.parquet")
    assert list(titles.columns) == ["item", "title"] and titles.item.is_unique
    assert titles.set_index("item").title["3"] == "Movie 3 (1990)"
    meta = json.loads((ml_dataset / "metadata.json").read_text())
    assert "item_titles" not in json.dumps(meta)  # no model reads it: not part of the schema


# -- a ranking stage trained on the retrieval stage's own candidates (issue 17) ---------------------------

CANDIDATES = 8


@dataclasses.dataclass
class FunnelRuns:
    """Ranking data built from ``runs.retrieval``'s candidates, and a DCN reading the history trained on it."""

    data: Path
    ranking: str


def candidate_ranker(runs: Runs, out: Path) -> FunnelRuns:
    """``recsys data candidates`` on the tiny set, then the shipped funnel ranking preset, shrunk."""
    from app.candidate_data import CandidatesConfig, build_candidates

    cfg = CandidatesConfig(
        retrieval=runs.retrieval,
        data=str(runs.data),
        out=str(out),
        candidates=CANDIDATES,
        val_users=0.3,
        tracking_uri=runs.tracking,
    )
    build_candidates(cfg)
    train = shrink("funnel-ranking", out, runs.work, "--batch-size=32", tracking=True)
    return FunnelRuns(out, str(run_training(train)["run_id"]))


@pytest.fixture(scope="module")
def funnel(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> FunnelRuns:
    return candidate_ranker(runs, tmp_path_factory.mktemp("candidates") / "data")


def raw_rows(path: Path, split: str) -> pd.DataFrame:
    """(user, item, label) of a split's pairs in raw ids (through the dataset's own vocabularies)."""
    users = ["", *json.loads((path / "vocab" / "user_id.json").read_text())]
    items = ["", *json.loads((path / "vocab" / "item_id.json").read_text())]
    pairs = pd.read_parquet(path / "pairs" / f"{split}.parquet")
    return pd.DataFrame(
        {
            "user": [users[u] for u in pairs.user_id],
            "item": [items[i] for i in pairs.item_id],
            "label": pairs.label.to_numpy(),
        }
    )


def test_candidate_labels_never_come_from_pairs_the_retriever_trained_on(runs: Runs, funnel: FunnelRuns) -> None:
    meta = json.loads((funnel.data / "metadata.json").read_text())
    spec = meta["candidates"]
    assert spec["retrieval_run"] == spec["serving_run"] == runs.retrieval and spec["candidates"] == CANDIDATES
    rows = pd.concat([raw_rows(funnel.data, "train"), raw_rows(funnel.data, "val")])
    train, val, test = (raw_rows(runs.data, s) for s in ("train", "val", "test"))
    pairs = set(zip(rows.user, rows.item, strict=True))
    assert not pairs & set(zip(train.user, train.item, strict=True))  # never a pair the retriever trained on
    liked_val = set(zip(val.user[val.label > 0.5], val.item[val.label > 0.5], strict=True))
    positives = set(zip(rows.user[rows.label > 0.5], rows.item[rows.label > 0.5], strict=True))
    assert positives and positives == pairs & liked_val  # every label is "liked in val", nothing else
    liked_test = set(zip(test.user[test.label > 0.5], test.item[test.label > 0.5], strict=True))
    assert not positives & liked_test
    assert set(raw_rows(funnel.data, "train").user).isdisjoint(raw_rows(funnel.data, "val").user)  # split by user
    assert rows.groupby("user").size().eq(CANDIDATES).all()
    assert meta["splits"]["test"]["rows"] == 0
    assert [d["name"] for d in meta["dense_features"] if d["tower"] == "candidate"] == spec["features"]


def test_a_serving_run_that_trained_on_test_pairs_is_refused_and_one_that_did_not_passes(
    runs: Runs, bundle: Any
) -> None:
    """``recsys data candidates --serving-retrieval``'s leak check, on the run's own train pairs (no test
    pair: passes) and on those pairs with some of --data's test pairs planted (refused, counted)."""
    from app.candidate_data import refuse_test_leak
    from core.errors import RecsysError
    from datamodules.schema import read_metadata
    from modules.funnel import TrainPairs

    stage = bundle.recommender.retrieval
    meta = read_metadata(runs.data)
    n_users, n_items = len(stage.user_vocab) + 1, len(stage.item_raw)
    own = pd.read_parquet(runs.data / "pairs" / "train.parquet")[["user_id", "item_id", "label"]]
    refuse_test_leak(stage, TrainPairs.from_frame(own, n_users, n_items), stage, runs.data, meta)  # disjoint
    test = pd.read_parquet(runs.data / "pairs" / "test.parquet").head(3)
    planted = pd.concat([own, test[["user_id", "item_id", "label"]]], ignore_index=True)
    leaky = TrainPairs.from_frame(planted, n_users, n_items)
    with pytest.raises(RecsysError, match=r"--serving-retrieval: its run trained on 3 test interaction\(s\)"):
        refuse_test_leak(stage, leaky, stage, runs.data, meta)


def dataset_contents(path: Path) -> dict[str, Any]:
    """What a prepared dataset holds, comparable across runs: each split's digest (its shards' names,
    sizes and hashes), its pairs file's rows and the metadata's statistics and splits."""
    from datamodules.integrity import read_split_index, split_digest

    meta = json.loads((path / "metadata.json").read_text())
    splits = ("train", "val")
    return {
        "digests": {split: split_digest(read_split_index(str(path), split)) for split in splits},
        "pairs": {split: pd.read_parquet(path / "pairs" / f"{split}.parquet").to_dict("list") for split in splits},
        "dense": meta["dense_features"],
        "splits": meta["splits"],
    }


@pytest.mark.cluster
def test_candidates_on_every_engine_write_the_same_dataset(runs: Runs, funnel: FunnelRuns, tmp_path: Path) -> None:
    """``recsys data candidates --block-users 5 --backend ray|spark --num-workers 2`` as a user types
    it: byte for byte the dataset one process writes in blocks of 5 users; and, whatever the block size,
    the same lists and labels as the fixture's one block (its statistics, sums over blocks, to rounding)."""
    import subprocess
    import sys

    base = [sys.executable, "-m", "app.cli", "data", "candidates", "--retrieval", runs.retrieval]
    base += ["--data", str(runs.data), "--candidates", str(CANDIDATES), "--val-users", "0.3"]
    base += ["--tracking-uri", runs.tracking, "--block-users", "5"]
    root = Path(__file__).parent.parent
    contents = {}
    for backend, workers in (("local", 1), ("ray", 2), ("spark", 2)):  # spawned local workers: test_batch.py
        out = tmp_path / f"{backend}{workers}"
        args = [*base, "--out", str(out), "--backend", backend, "--num-workers", str(workers)]
        done = subprocess.run(args, cwd=root, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        contents[f"{backend}:{workers}"] = dataset_contents(out)
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".candidates")]  # spill and bundle gone
    one = contents.pop("local:1")
    for engine, got in contents.items():
        assert got == one, engine
    whole = dataset_contents(funnel.data)
    assert one["pairs"] == whole["pairs"]
    for mine, theirs in zip(one["dense"], whole["dense"], strict=True):
        assert mine["name"] == theirs["name"]
        assert np.isclose(mine["mean"], theirs["mean"], rtol=1e-9) and np.isclose(mine["std"], theirs["std"], rtol=1e-9)


def test_the_rankers_run_links_the_runs_and_dataset_its_candidates_came_from(runs: Runs, funnel: FunnelRuns) -> None:
    """MLflow (issue 25): the ranker trained on candidates data is tagged with the retrieval runs they came
    from, and lists the dataset they were drawn from (its train split: the digest the retrieval run
    trained on, so one search by digest finds both runs)."""
    from mlflow.tracking import MlflowClient

    from datamodules.integrity import read_split_index, split_digest

    client = MlflowClient(runs.tracking)
    ranker = client.get_run(funnel.ranking)
    tags = ranker.data.tags
    assert tags["recsys.dataset_kind"] == "candidates"
    assert tags["recsys.candidates.retrieval_run"] == tags["recsys.candidates.serving_run"] == runs.retrieval
    assert tags["recsys.candidates.data"] == str(runs.data.resolve())
    assert ranker.inputs is not None
    contexts = {
        next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in ranker.inputs.dataset_inputs
    }
    assert set(contexts) == {"training", "validation", "candidates-source"}  # candidates data has no test split
    digest = split_digest(read_split_index(str(runs.data), "train"))
    assert contexts["candidates-source"].digest == digest
    both = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"dataset.digest = '{digest}'"
    )
    assert {funnel.ranking, runs.retrieval} <= {r.info.run_id for r in both}


def test_served_rows_are_the_rows_the_ranker_trained_on(runs: Runs, funnel: FunnelRuns, tmp_path: Path) -> None:
    """The funnel computes a candidate's inputs as the ranking data stored them (offline = served)."""
    from datamodules.config import DataConfig
    from datamodules.streaming import StreamingDataModule
    from modules.funnel import Candidates, model_inputs

    rec = load_bundle(assemble_bundle(runs.retrieval, funnel.ranking, tmp_path / "bundle", runs.tracking)).recommender
    assert rec.ranking.arch.history and rec.features is not None
    dm = StreamingDataModule(DataConfig(path=str(funnel.data), batch_size=8, shuffle=False, cache_dir=str(tmp_path)))
    stored: dict[tuple[int, int], np.ndarray] = {}
    for batch in dm.val_dataloader():
        users, items = (batch.sparse_features[k].values().tolist() for k in ("user_id", "item_id"))
        for r, key in enumerate(zip(users, items, strict=True)):
            stored[key] = batch.dense_features[r].numpy()
    dm.teardown()
    stage = rec.ranking
    user_idx = sorted({u for u, _ in stored})
    users = [stage.user_vocab[u - 1] for u in user_idx]
    query = rec.retrieval.embed("user", rec.retrieval.user_index(users))
    found = rec.candidates(query, [rec.seen[int(i)] for i in rec.retrieval.user_index(users)], CANDIDATES)
    u, i, candidate, bags = rec.ranking_rows(users, Candidates(found.ids, found.scores))
    dense, _ = model_inputs(
        stage.meta, len(u), [(stage.users, torch.as_tensor(u)), (stage.items, torch.as_tensor(i))], candidate
    )
    assert set(zip(u.tolist(), i.tolist(), strict=True)) == set(stored)
    for r, key in enumerate(zip(u.tolist(), i.tolist(), strict=True)):
        np.testing.assert_allclose(dense[r].numpy(), stored[key], rtol=1e-5, atol=1e-5)
    # every row reads its user's whole train history, as the ranker's training rows of val users did
    from datamodules.histories import UserHistories

    stored_histories = UserHistories.from_table(
        pd.read_parquet(funnel.data / "histories.parquet"), stage.meta.feature("user_id").cardinality
    )
    assert bags is not None and (bags[1] > 0).all()
    ends = np.cumsum(bags[1])
    for r, user in enumerate(u.tolist()):
        assert bags[0][ends[r] - bags[1][r] : ends[r]].tolist() == stored_histories.of(user)


def test_a_funnel_bundle_holds_the_item_item_model_and_refuses_a_crafted_one(
    runs: Runs, funnel: FunnelRuns, tmp_path: Path
) -> None:
    """Issue 22: the bundle of a ranker trained on candidates holds its item-item model (low-rank EASE^R,
    the spec the ranking data records), fitted once when assembled and memory-mapped at load; arrays
    crafted in it, with bundle.json and the model's manifest resealed, are refused in one line."""
    import shutil

    from core.checksums import checksums, sha256_file
    from core.errors import RecsysError

    root = assemble_bundle(runs.retrieval, funnel.ranking, tmp_path / "bundle", runs.tracking)
    model = json.loads((root / "item_item" / "item_item.json").read_text())
    candidates = json.loads((funnel.data / "metadata.json").read_text())["candidates"]
    assert model["spec"] == candidates["item_item"] == {"model": "low-rank-ease", "rank": 256, "lambda": 400.0}
    rec = load_bundle(root).recommender
    assert rec.features is not None and rec.features.item_item is not None
    assert isinstance(rec.features.item_item.liked.vectors, np.memmap)
    cases = {
        "a negative diagonal": ("liked.diag.npy", lambda a: -np.abs(a), "a value that is not positive"),
        "vectors of other items": ("touched.vectors.npy", lambda a: a[:-1], "rows for"),
        "an infinite factor": ("liked.vectors.npy", lambda a: np.where(a == a.max(), np.inf, a), "not finite"),
    }
    for i, (case, (name, change, message)) in enumerate(cases.items()):
        crafted = tmp_path / f"crafted{i}"
        shutil.copytree(root, crafted)
        target = crafted / "item_item" / name
        np.save(target, change(np.load(target)).astype(np.float32))
        inner = json.loads((crafted / "item_item" / "item_item.json").read_text())
        inner["files"][name] = sha256_file(target)
        (crafted / "item_item" / "item_item.json").write_text(json.dumps(inner))
        manifest = json.loads((crafted / "bundle.json").read_text())
        manifest["files"] = checksums(crafted, exclude=["bundle.json"])
        (crafted / "bundle.json").write_text(json.dumps(manifest))
        with pytest.raises(RecsysError) as e:
            load_bundle(crafted)
        assert message in str(e.value) and name.split(".")[0] in str(e.value) and "\n" not in str(e.value), case


def test_candidate_ranker_orders_by_its_probability_and_history_requests_work(
    runs: Runs, funnel: FunnelRuns, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rec = load_bundle(assemble_bundle(runs.retrieval, funnel.ranking, tmp_path / "bundle", runs.tracking)).recommender
    user = rec.retrieval.user_vocab[0]
    ranked = rec.recommend_users([user], k=K, candidates=CANDIDATES)[0]
    found = rec.candidates(rec.retrieval.embed("user", rec.retrieval.user_index([user])), [rec.seen[1]], CANDIDATES)
    probabilities = rec.rank([user], found)[0]
    order = np.argsort(-probabilities, kind="stable")[:K]
    assert ranked.items == found.ids[0][order].tolist()
    assert ranked.scores == pytest.approx(probabilities[order].tolist(), rel=1e-5)
    code, out, err = cli(
        capsys, runs, "recommend", "--retrieval", runs.retrieval, "--ranking", funnel.ranking, "--user", user,
        "--k", str(K), "--candidates", str(CANDIDATES),
    )  # fmt: skip
    assert code == 0, err
    assert [line.split()[2] for line in out.splitlines()[1:]] == ranked.items  # the CLI's list is the same
    liked = rec.retrieval.item_vocab[:3]
    (answer,) = rec.recommend_histories([liked], k=K, candidates=CANDIDATES)
    assert answer.source == MODEL and len(answer.items) == K and not set(answer.items) & set(liked)


def test_candidate_ranker_refuses_another_retrieval_run_or_dataset(
    runs: Runs, funnel: FunnelRuns, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from app.candidate_data import CandidatesConfig, build_candidates
    from core.errors import RecsysError
    from modules.funnel import check_candidates

    code, _, err = cli(capsys, runs, "recommend", "--retrieval", runs.other, "--ranking", funnel.ranking, "--user", "1")
    assert code == 2 and f"trained on the candidates of retrieval run {runs.retrieval}" in one_line(err)
    stage = load_bundle(assemble_bundle(runs.retrieval, None, tmp_path / "bundle", runs.tracking)).recommender.retrieval
    meta = load_stage(fetch_stage(funnel.ranking, runs.tracking, tmp_path / "ranking", "--ranking", False)).meta
    other = dataclasses.replace(
        meta, candidates={**meta.candidates, "serving_dataset": "0" * 64, "retrieval_dataset": "0" * 64}
    )
    with pytest.raises(RecsysError, match="another dataset than the retrieval stage's"):
        check_candidates(other, stage, runs.retrieval)
    # the data step itself: a run trained on another dataset, a bad flag
    from conftest import ratings_frame, tiny_prepare, write_ml100k

    from datamodules.prepare import prepare

    src = write_ml100k(tmp_path / "src", ratings_frame(n_users=60, n_items=50, per_user=16))
    prepare(tiny_prepare(tmp_path / "reseeded", "movielens-100k", source=str(src), block_rows=16, seed=3))
    with pytest.raises(RecsysError, match="trained on another dataset than --data"):
        build_candidates(
            CandidatesConfig(
                runs.retrieval, str(tmp_path / "reseeded"), str(tmp_path / "c"), tracking_uri=runs.tracking
            )
        )
    code, _, err = cli(
        capsys, runs, "data", "candidates", "--retrieval", runs.retrieval, "--data", str(runs.data),
        "--out", str(tmp_path / "c2"), "--candidates", "0",
    )  # fmt: skip
    assert code == 2 and "--candidates: must be at least 1" in one_line(err)


def test_all_users_batch_serves_the_candidate_ranker_as_recommend_does(
    runs: Runs, funnel: FunnelRuns, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`recommend --all-users` goes through the same Recommender: the candidate ranker (features and
    history) gives the lists `recommend --users` gives (one local process; the engines: test_batch.py)."""
    from app.batch import AllUsersConfig, recommend_all_users

    users = [str(u) for u in json.loads((runs.data / "vocab" / "user_id.json").read_text())]
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    base = ["recommend", "--retrieval", runs.retrieval, "--ranking", funnel.ranking, "--k", str(K)]
    base += ["--candidates", str(CANDIDATES)]
    code, _, err = cli(
        capsys, runs, *base, "--users", str(tmp_path / "users.txt"), "--out", str(tmp_path / "one.parquet")
    )
    assert code == 0, err
    single = pd.read_parquet(tmp_path / "one.parquet")
    cfg = AllUsersConfig(
        retrieval=runs.retrieval,
        ranking=funnel.ranking,
        out=str(tmp_path / "all"),
        k=K,
        candidates=CANDIDATES,
        partitions=2,
        tracking_uri=runs.tracking,
        progress=False,
    )
    recommend_all_users(cfg)
    table = pd.read_parquet(tmp_path / "all")
    both = single.merge(table, on=["user", "rank"], suffixes=("_one", "_all"), validate="one_to_one")
    assert len(both) == len(single) == len(table) and set(table.user) == set(users)
    assert (both.item_one == both.item_all).all() and (both.score_one - both.score_all).abs().max() <= 1e-6


def test_history_two_tower_indexes_and_recommends(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    """A retrieval model whose user tower reads the history is served too: the bundle carries the histories."""
    cfg = shrink("two-tower-history-movielens", runs.data, runs.work, tracking=True)
    run = str(run_training(cfg)["run_id"])
    code, out, err = cli(capsys, runs, "recommend", "--retrieval", run, "--user", "1", "--k", "3")
    assert code == 0, err
    items = [line.split()[2] for line in out.splitlines()[1:]]
    pairs = pd.read_parquet(runs.data / "pairs" / "train.parquet")
    vocab = json.loads((runs.data / "vocab" / "item_id.json").read_text())
    user = json.loads((runs.data / "vocab" / "user_id.json").read_text()).index("1") + 1
    assert len(items) == 3 and not set(items) & {vocab[i - 1] for i in pairs.item_id[pairs.user_id == user]}


# -- outputs, integrity and crafted artifacts (issue 18) ---------------------------------------------


def artifact_files(client: Any, run_id: str, path: str | None = None) -> list[str]:
    """Every file a run holds, recursively."""
    out: list[str] = []
    for a in client.list_artifacts(run_id, path):
        out += artifact_files(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_index_out_logs_only_the_index_and_refuses_what_it_must_not_write(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`index --out .` uploaded the whole working directory to the run and `--out ~` sent .ssh/id_rsa:
    --out follows the output rule, and the run receives only the three index files."""
    from mlflow.tracking import MlflowClient

    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("PRIVATE KEY")
    (tmp_path / "notes.txt").write_text("precious")
    monkeypatch.chdir(home)
    cases = [
        (".", "is the current directory or one of its parents"),
        (str(home), "is the current directory or one of its parents"),
        (str(home / ".ssh"), "is a folder (no manifest.json), not a vector index"),
        (str(tmp_path / "notes.txt"), "is a file, not a vector index"),
        ("/dev/null", "is a character device, not a vector index"),
        ("/proc/recsys-index", "cannot write in /proc"),
        ("/proc/no-such-dir/index", "its parent folder /proc/no-such-dir does not exist"),
        (str(tmp_path / "missing" / "index"), "does not exist; create it first"),
    ]
    for out, message in cases:
        for extra in ([], ["--overwrite"]):
            code, _, err = cli(capsys, runs, "index", "--run-id", runs.retrieval, "--out", out, *extra)
            assert code == 2 and message in one_line(err), (out, extra, err)
    assert (home / ".ssh" / "id_rsa").read_text() == "PRIVATE KEY" and (
        tmp_path / "notes.txt"
    ).read_text() == "precious"
    target = tmp_path / "index"
    assert cli(capsys, runs, "index", "--run-id", runs.retrieval, "--out", str(target))[0] == 0
    code, _, err = cli(capsys, runs, "index", "--run-id", runs.retrieval, "--out", str(target))
    assert code == 2 and "already exists (pass --overwrite" in one_line(err)
    assert cli(capsys, runs, "index", "--run-id", runs.retrieval, "--out", str(target), "--overwrite")[0] == 0
    assert sorted(p.name for p in target.iterdir()) == ["index.faiss", "manifest.json", "vectors.parquet"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "index", "notes.txt"]  # no temporaries left
    logged = artifact_files(MlflowClient(runs.tracking), runs.retrieval)
    assert sorted(p for p in logged if p.startswith("index/")) == [
        "index/index.faiss",
        "index/manifest.json",
        "index/vectors.parquet",
    ]
    assert not [p for p in logged if "id_rsa" in p or "notes" in p or "mlflow.db" in p], logged


def test_recommend_out_follows_the_output_rule(runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("precious")
    base = ["recommend", "--retrieval", runs.retrieval, "--user", "1", "--k", "2"]
    cases = [
        (str(tmp_path / "missing" / "recs.parquet"), "does not exist; create it first"),
        (str(tmp_path), "is a folder, not a Parquet file"),
        (str(tmp_path / "notes.txt"), "is a file (other content), not a Parquet file"),
        ("/dev/null", "is a character device, not a Parquet file"),
        ("/proc/recs.parquet", "cannot write in /proc"),
    ]
    for out, message in cases:
        code, _, err = cli(capsys, runs, *base, "--out", out, "--overwrite")
        assert code == 2 and message in one_line(err), (out, err)
    assert (tmp_path / "notes.txt").read_text() == "precious"
    recs = tmp_path / "recs.parquet"
    assert cli(capsys, runs, *base, "--out", str(recs))[0] == 0
    code, _, err = cli(capsys, runs, *base, "--out", str(recs))
    assert code == 2 and "already exists (pass --overwrite" in one_line(err)
    code, _, err = cli(capsys, runs, *base[:-1], "3", "--out", str(recs), "--overwrite")
    assert code == 0, err
    assert len(pd.read_parquet(recs)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "recs.parquet"]  # no temporaries left


def test_users_csv_without_a_header_keeps_its_first_user(tmp_path: Path) -> None:
    """A headerless CSV lost its first id to pandas' header guess."""
    from app.recommend import read_users_file

    files = {
        "bare.csv": ("1\n2\nnobody\n", ["1", "2", "nobody"]),
        "header.csv": ("user\n1\n2\n", ["1", "2"]),
        "columns.csv": ("item,user\n7,1\n8,NA\n", ["1", "NA"]),
        "two-columns-no-header.csv": ("007,x\n2,y\n", ["007", "2"]),
        "empty.csv": ("", []),
    }
    for name, (text, want) in files.items():
        (tmp_path / name).write_text(text)
        assert read_users_file(str(tmp_path / name)) == want, name


@pytest.fixture(scope="module")
def foreign_ranking(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny DLRM trained on another dataset (other ratings in the same MovieLens layout and ids)."""
    from conftest import ratings_frame, tiny_prepare, write_ml100k

    from datamodules.prepare import prepare

    base = tmp_path_factory.mktemp("foreign")
    src = write_ml100k(base / "src", ratings_frame(n_users=60, n_items=50, per_user=16, seed=5))
    prepare(tiny_prepare(base / "data", "movielens-100k", source=str(src), block_rows=16))
    cfg = shrink("dlrm-movielens", base / "data", runs.work, "--max-epochs=1", tracking=True)
    return str(run_training(cfg)["run_id"])


def test_a_ranking_run_of_another_dataset_is_refused(
    runs: Runs, foreign_ranking: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = cli(
        capsys, runs, "recommend", "--retrieval", runs.retrieval, "--ranking", foreign_ranking, "--user", "1"
    )
    line = one_line(err)
    assert code == 2 and f"--ranking {foreign_ranking}: trained on another dataset" in line and "sha256" in line, line


def test_a_differently_prepared_copy_of_the_source_is_the_same_source(ml_dataset: Path, tmp_path: Path) -> None:
    """The documented feature that the source check must keep: another split seed, row cap or split
    rule of the same source file is the same data."""
    from conftest import tiny_prepare

    from app.bundle import source_identity
    from datamodules.prepare import prepare
    from datamodules.schema import read_metadata

    copy = prepare(
        tiny_prepare(
            tmp_path / "copy", "movielens-100k", source=str(ml_dataset.parent / "src"), seed=3, split="temporal"
        )
    )
    assert source_identity(copy) == source_identity(read_metadata(ml_dataset))


def log_crafted_run(runs: Runs, tmp_path: Path, state: bytes | None = None, config: str | None = None) -> str:
    """A run holding the retrieval run's artifacts with its state dict or config.yaml replaced."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(runs.tracking)
    src = Path(client.download_artifacts(runs.retrieval, "", str(tmp_path / "src")))
    run_id = client.create_run(client.get_run(runs.retrieval).info.experiment_id).info.run_id
    if state is not None:
        (src / "model_state" / "state_dict.pt").write_bytes(state)
    if config is not None:
        (src / "config.yaml").write_text(config)
    for part in ("config.yaml", "model_state", "dataset"):
        path = src / part
        if path.is_dir():
            client.log_artifacts(run_id, str(path), part)
        else:
            client.log_artifact(run_id, str(path))
    return run_id


class Payload:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_crafted_run_artifacts_are_refused_in_one_line(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A state dict or config.yaml that names code was refused, but as a traceback advising
    weights_only=False; now one line, and nothing runs."""
    import io

    marker = tmp_path / "PWNED"
    payload = io.BytesIO()
    torch.save({"weight": Payload(marker)}, payload)
    cases = {
        "pickle payload in state_dict.pt": (dict(state=payload.getvalue()), "state_dict.pt: refused to load"),
        "garbage state_dict.pt": (dict(state=b"\x00not a checkpoint" * 9), "not a readable checkpoint file"),
        "a list, not a state dict": (dict(state=_saved([torch.zeros(1)])), "not a state dict"),
        "python tag in config.yaml": (
            dict(config=f"!!python/object/apply:os.system ['touch {marker}']\n"),
            "config.yaml: not a plain YAML run config",
        ),
        "config.yaml that is no run config": (dict(config="- 1\n- 2\n"), "config.yaml: not a recsys run config"),
        "config.yaml that is no YAML": (dict(config="model: [\n"), "config.yaml: not a plain YAML run config"),
    }
    for i, (case, (craft, message)) in enumerate(cases.items()):
        run_id = log_crafted_run(runs, tmp_path / str(i), **craft)  # type: ignore[arg-type]
        capsys.readouterr()
        for args in (["recommend", "--retrieval", run_id, "--user", "1"], ["index", "--run-id", run_id]):
            code, _, err = cli(capsys, runs, *args)
            line = one_line(err)
            assert code == 2 and message in line and "weights_only=False" not in err, (case, err)
            assert not marker.exists(), f"{case}: the artifact ran code"


def _saved(obj: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
