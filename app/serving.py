"""The recommender as an MLflow pyfunc: ``recsys package`` and the model ``mlflow models serve`` runs.

    recsys package --retrieval RUN [--ranking RUN] [--register NAME]
    mlflow models serve -m models:/NAME/VERSION --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
         -d '{"dataframe_records": [{"user": "196", "k": 10}, {"history": "50,181,100"}]}'

Input: a DataFrame with a ``user`` column (raw user id) or a ``history`` column (raw item ids,
comma-separated) per row, and optionally ``k`` (default 10); the ``candidates`` parameter (200) sets
how many items the retrieval stage hands to the ranking stage. Output: one row per input row with
``items`` (raw item ids, best first), ``scores`` and ``source`` (``model``, or ``popular`` for the
fallback). The package holds no pickled module: both models travel as state dicts and are rebuilt in
``load_context`` from their config and dataset metadata through the model-kind registry, next to the
index, the vocabularies and the feature tables (the bundle of ``app.recommend``) and this project's
code (``code_paths``).
"""

from __future__ import annotations

import importlib.metadata
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc  # this module is imported only to package or serve a model
import pandas as pd

from app.recommend import assemble_bundle, load_bundle
from app.tracking import resolve_tracking_uri
from core.errors import RecsysError, require

log = logging.getLogger(__name__)

MODEL_NAME = "recommender"
DEFAULT_K = 10
DEFAULT_CANDIDATES = 200
CODE_PACKAGES = ("app", "cluster", "modules", "datamodules", "core")
RUNTIME_PACKAGES = (
    "torch",
    "torchrec",
    "faiss-cpu",
    "numpy",
    "pandas",
    "pyarrow",
    "pyyaml",
    "tqdm",
    "tensordict",
    "pyre-extensions",
    "iopath",
    "torchmetrics",
    "mlflow",
)


def pip_requirements() -> list[str]:
    """The serving environment, pinned to this one's versions: the CPU or CUDA build of FBGEMM,
    whichever is installed here (fbgemm-gpu-cpu on a CPU host; never left for pip to choose)."""
    fbgemm = "fbgemm-gpu"
    try:
        importlib.metadata.version("fbgemm-gpu-cpu")
        fbgemm = "fbgemm-gpu-cpu"
    except importlib.metadata.PackageNotFoundError:
        pass
    out = []
    for name in (*RUNTIME_PACKAGES[:2], fbgemm, *RUNTIME_PACKAGES[2:]):
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def requests_of(frame: pd.DataFrame) -> tuple[list[tuple[int, str]], list[tuple[int, list[str]]], list[int]]:
    """Split the input rows into user requests, history requests and their k values."""
    require(
        "user" in frame.columns or "history" in frame.columns,
        "recommender input: expected a 'user' or a 'history' column",
    )
    users: list[tuple[int, str]] = []
    histories: list[tuple[int, list[str]]] = []
    ks: list[int] = []
    for i, row in enumerate(frame.to_dict("records")):
        user, history, k = row.get("user"), row.get("history"), row.get("k")
        ks.append(DEFAULT_K if k is None or pd.isna(k) else int(k))
        require(ks[-1] >= 1, f"recommender input row {i}: k must be at least 1, got {ks[-1]}")
        if user is not None and not (isinstance(user, float) and pd.isna(user)) and str(user) != "":
            users.append((i, str(user)))
        elif history is not None and not (isinstance(history, float) and pd.isna(history)):
            items = history if isinstance(history, list) else str(history).split(",")
            histories.append((i, [str(x) for x in items]))
        else:
            histories.append((i, []))  # neither: an empty history, i.e. the most popular items
    return users, histories, ks


def predict_frame(recommender: Any, frame: pd.DataFrame, candidates: int = DEFAULT_CANDIDATES) -> pd.DataFrame:
    """The pyfunc's answer for an input DataFrame (also the in-process reference of the tests)."""
    users, histories, ks = requests_of(frame)
    out: list[Any] = [None] * len(frame)
    top = max(ks, default=DEFAULT_K)
    if users:
        for (i, _), rec in zip(users, recommender.recommend_users([u for _, u in users], top, candidates), strict=True):
            out[i] = rec
    if histories:
        answers = recommender.recommend_histories([h for _, h in histories], top, candidates)
        for (i, _), rec in zip(histories, answers, strict=True):
            out[i] = rec
    return pd.DataFrame(
        {
            "items": [r.items[:k] for r, k in zip(out, ks, strict=True)],
            "scores": [r.scores[:k] for r, k in zip(out, ks, strict=True)],
            "source": [r.source for r in out],
        }
    )


class RecommenderModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    """Raw user ids or item histories -> ranked raw item ids and scores (state in ``load_context``)."""

    def load_context(self, context: Any) -> None:
        import torch

        # One request is a few small ops (200 candidates): intra-op threads only contend with each
        # other and with the server's (bench/serve.py: 10 ms vs 218 ms per user on 2 busy cores);
        # scale out with server workers instead.
        torch.set_num_threads(1)
        self.loaded = load_bundle(context.artifacts["bundle"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        candidates = int((params or {}).get("candidates", DEFAULT_CANDIDATES))
        return predict_frame(self.loaded.recommender, pd.DataFrame(model_input), candidates)


def signature() -> Any:
    """Input: user or history (optional each) and k; output: items, scores, source; param: candidates."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec("string", "user", required=False),
            ColSpec("string", "history", required=False),
            ColSpec("long", "k", required=False),
        ]
    )
    outputs = Schema(
        [ColSpec(Array("string"), "items"), ColSpec(Array("double"), "scores"), ColSpec("string", "source")]
    )
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("candidates", "long", DEFAULT_CANDIDATES)]))


def package(
    retrieval: str,
    ranking: str | None = None,
    index_dir: str | None = None,
    register: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """``recsys package``: log the recommender as a pyfunc in a new run of the retrieval run's
    experiment (and register it as ``register``); returns what to serve."""
    import mlflow

    uri = resolve_tracking_uri(tracking_uri)
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as tmp:
        bundle = assemble_bundle(retrieval, ranking, Path(tmp) / "bundle", uri, index_dir)
        loaded = load_bundle(bundle)
        first_user = loaded.recommender.retrieval.user_vocab[0]
        example = pd.DataFrame({"user": [first_user], "k": [DEFAULT_K]})
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_run(retrieval).info.experiment_id
        with mlflow.start_run(experiment_id=experiment, run_name=f"recommender-{retrieval[:8]}") as run:
            mlflow.log_params({"retrieval_run": retrieval, "ranking_run": ranking or ""})
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=RecommenderModel(),
                artifacts={"bundle": str(bundle)},
                code_paths=[str(root / p) for p in CODE_PACKAGES],
                pip_requirements=pip_requirements(),
                signature=signature(),
                input_example=example,
                registered_model_name=register,
            )
    if register:
        version = info.registered_model_version
        if version is None:
            raise RecsysError(f"--register {register}: the model registry did not return a version")
        target = f"models:/{register}/{version}"
    else:
        target = info.model_uri
    return (
        f"recommender logged to run {run.info.run_id} ({target}); serve it with:\n"
        f"  PATH={Path(sys.executable).parent}:$PATH mlflow models serve -m {target} --env-manager local"
        " -h 127.0.0.1 -p 5001"
    )
