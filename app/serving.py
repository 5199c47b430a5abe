"""The recommender as an MLflow pyfunc: ``recsys package`` and the model ``mlflow models serve`` runs.

    recsys package --retrieval RUN [--ranking RUN] [--register NAME]
    mlflow models serve -m models:/NAME/VERSION --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' -d \\
      '{"dataframe_records": [{"user": "196", "k": 10}, {"history": "50,181,100"}], "params": {"candidates": 200}}'

Input: a DataFrame with a ``user`` column (raw user id) or a ``history`` column (raw item ids,
comma-separated) per row, and optionally ``k`` (default 10); the ``candidates`` parameter (200) sets
how many items the retrieval stage hands to the ranking stage. Output: one row per input row with
``items`` (raw item ids, best first), ``scores`` and ``source`` (``model``, or ``popular`` for the
fallback).

Requests are checked row by row before any work (``parse_requests``): exactly one of ``user`` and
``history`` per row, ``k`` a whole number from 1 to ``MAX_K``, no other field, at most ``MAX_ROWS``
rows, ``candidates`` from 1 to ``MAX_CANDIDATES``. A bad one is answered 400 with a one-line reason
(``{"error_code": ..., "message": ...}``, no stack trace); a request still running at
``DEADLINE_SHARE`` of the server's ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` stops between two blocks of
rows and is answered 504, so it does not keep a core busy after the client has gone. A body the scoring
server cannot read (empty, not JSON) is answered 400 with one short line too (``guard_request_parsing``),
not with MLflow's message that quotes the whole body. ``--register`` names are checked before any work.

Nothing pickled is loaded: the model is logged as code (``app/pyfunc_model.py``, MLflow's "models from
code"), both models travel as safetensors weights and are rebuilt in ``load_context`` from their config
and dataset metadata through the model-kind registry, next to the index, the vocabularies and the
feature tables (the bundle of ``app.bundle``, every file checked against its SHA-256) and this
project's code (``code_paths``).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow.pyfunc  # this module is imported only to package or serve a model
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from app.bundle import assemble_bundle, load_bundle
from app.stages import os_errors, temporary
from app.tracking import existing_store
from core.errors import RecsysError, printable
from core.output import os_reason

log = logging.getLogger(__name__)

MODEL_NAME = "recommender"
DEFAULT_K = 10
DEFAULT_CANDIDATES = 200
FIELDS = ("user", "history", "k")
MAX_ROWS = 10_000
"""Rows of one request."""
MAX_CANDIDATES = 2_000
"""The ``candidates`` parameter's ceiling (items each row's ranking stage scores)."""
MAX_K = MAX_CANDIDATES
MAX_HISTORY = 10_000
"""Items of one history."""
BLOCK_ROWS = 256
DEADLINE_SHARE = 0.9
"""A request stops at this share of MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (60 s by default)."""
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
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
    "safetensors",
    "psutil",
    "pymilvus",
    "milvus-lite",
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


class RequestError(RecsysError):
    """A bad request: answered 400 with this one-line reason."""


class DeadlineExceeded(RecsysError):
    """A request that ran past its deadline: answered 504, its computation stopped."""


@dataclass
class Requests:
    """The validated rows of one request: (row, raw user id), (row, history items), k of every row."""

    users: list[tuple[int, str]]
    histories: list[tuple[int, list[str]]]
    ks: list[int]


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _integer(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (JSON 10, or 10.0 from a column pandas widened
    because another row left it out), else None; never a bool or a string."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, np.generic) else repr(value.item())
    return text if len(text) <= 40 else text[:37] + "..."


def _raw_id(value: Any, row: int, field: str) -> str:
    if isinstance(value, str):
        return value.strip()
    whole = _integer(value)
    if whole is None or isinstance(value, float | np.floating):
        raise RequestError(f'row {row}: {field} must be a raw id as a string (e.g. "196"), got {_shown(value)}')
    return str(whole)


def as_frame(model_input: Any) -> pd.DataFrame:
    """The request as a DataFrame (MLflow hands over one for ``dataframe_records``/``dataframe_split``;
    ``instances``/``inputs`` may arrive as records or columns)."""
    if isinstance(model_input, pd.DataFrame):
        return model_input
    try:
        return pd.DataFrame(model_input)
    except (ValueError, TypeError) as e:
        raise RequestError(f"the input is not a table of rows ({(str(e).splitlines() or [''])[0]})") from None


def parse_requests(frame: pd.DataFrame) -> Requests:
    """Validate every row: exactly one of ``user`` (a raw id) or ``history`` (raw item ids, a
    comma-separated string or a list; "" is an empty history), and ``k`` (a whole number from 1 to
    ``MAX_K``, default ``DEFAULT_K``); no other field; at most ``MAX_ROWS`` rows."""
    unknown = [str(c) for c in frame.columns if c not in FIELDS]
    if unknown:
        raise RequestError(f"unknown field(s) {', '.join(map(repr, unknown[:5]))}; a row has {', '.join(FIELDS)}")
    if len(frame) > MAX_ROWS:
        raise RequestError(f"{len(frame)} rows in one request; at most {MAX_ROWS} (split it)")
    out = Requests([], [], [])
    columns = {c: frame[c].tolist() if c in frame.columns else [None] * len(frame) for c in FIELDS}
    for i, (user, history, k) in enumerate(zip(columns["user"], columns["history"], columns["k"], strict=True)):
        if _missing(k):
            out.ks.append(DEFAULT_K)
        else:
            whole = _integer(k)
            if whole is None or not 1 <= whole <= MAX_K:
                raise RequestError(f"row {i}: k must be a whole number from 1 to {MAX_K}, got {_shown(k)}")
            out.ks.append(whole)
        if not _missing(user) and not _missing(history):
            raise RequestError(f"row {i}: give a user or a history, not both")
        if not _missing(user):
            raw = _raw_id(user, i, "user")
            if raw == "":
                raise RequestError(f"row {i}: user is empty")
            out.users.append((i, raw))
        elif not _missing(history):
            items = history.split(",") if isinstance(history, str) else history
            if not isinstance(items, list | tuple | np.ndarray):
                raise RequestError(
                    f"row {i}: history must be raw item ids, comma-separated or a list, got {_shown(history)}"
                )
            if len(items) > MAX_HISTORY:
                raise RequestError(f"row {i}: {len(items)} history items; at most {MAX_HISTORY}")
            out.histories.append((i, [x for x in (_raw_id(v, i, "history item") for v in items) if x]))
        else:
            raise RequestError(f"row {i}: needs a user or a history")
    return out


def check_candidates(candidates: Any) -> int:
    """The ``candidates`` parameter: a whole number from 1 to ``MAX_CANDIDATES``."""
    whole = _integer(candidates)
    if whole is None or not 1 <= whole <= MAX_CANDIDATES:
        raise RequestError(f"candidates must be a whole number from 1 to {MAX_CANDIDATES}, got {_shown(candidates)}")
    return whole


def block_rows(recommender: Any, candidates: int) -> int:
    """Rows answered between two deadline checks: at most ``BLOCK_ROWS`` (most of a row's cost is
    per-row work, about a millisecond), fewer when their candidates fill more than one ranking
    forward pass."""
    from modules.funnel import RERANK_ROWS

    scored = max(1, min(candidates, recommender.index.count))
    return max(1, min(BLOCK_ROWS, RERANK_ROWS // scored))


def predict_frame(
    recommender: Any, frame: Any, candidates: Any = DEFAULT_CANDIDATES, deadline: float | None = None
) -> pd.DataFrame:
    """The pyfunc's answer for an input table (also the in-process reference of the tests): every
    row validated first (``RequestError``), then answered block by block; past ``deadline`` (a
    ``time.monotonic()`` value) the work stops with ``DeadlineExceeded`` instead of running on."""
    frame = as_frame(frame)
    requests = parse_requests(frame)
    candidates = check_candidates(candidates)
    out: list[Any] = [None] * len(frame)
    block = block_rows(recommender, candidates)

    def check_deadline(done: int) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"the request ran past its deadline after {done} of {len(frame)} rows; "
                "send fewer rows or candidates per request"
            )

    done = 0
    for lo in range(0, len(requests.users), block):
        check_deadline(done)
        part = requests.users[lo : lo + block]
        top = max(requests.ks[i] for i, _ in part)
        for (i, _), rec in zip(part, recommender.recommend_users([u for _, u in part], top, candidates), strict=True):
            out[i] = rec
        done += len(part)
    for lo in range(0, len(requests.histories), block):
        check_deadline(done)
        hpart = requests.histories[lo : lo + block]
        top = max(requests.ks[i] for i, _ in hpart)
        for (i, _), rec in zip(
            hpart, recommender.recommend_histories([h for _, h in hpart], top, candidates), strict=True
        ):
            out[i] = rec
        done += len(hpart)
    return pd.DataFrame(
        {
            "items": [r.items[:k] for r, k in zip(out, requests.ks, strict=True)],
            "scores": [r.scores[:k] for r, k in zip(out, requests.ks, strict=True)],
            "source": [r.source for r in out],
        }
    )


class ServingError(MlflowException):
    """What the scoring server answers for a refused request: the status of ``error_code`` and a body
    ``{"error_code": ..., "message": REASON}`` with no stack trace.

    MLflow's scoring server rewrites the message of an MlflowException raised by ``predict`` to
    ``Failed to predict data '<the whole input table>'. \\nError: ...`` (scoring_server.invocations),
    which is neither one line nor small; this exception keeps the reason it was raised with.
    """

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_reason"):
            self._reason = value


BODY_FORMATS = ("dataframe_records", "dataframe_split", "instances", "inputs")
"""The top-level fields of a JSON request MLflow's scoring server reads (exactly one of them)."""
BODY_EXAMPLE = '{"dataframe_records": [{"user": "196", "k": 10}]}'


def body_problem(data: Any) -> str | None:
    """What is wrong with a JSON request body the scoring server could not read, in a few words (never the
    body itself), or None when this code sees nothing wrong with it."""
    text = data
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            return f"the request body is not UTF-8 text (byte {e.start})"
    if not isinstance(text, str):
        return None
    if text.strip() == "":
        return "the request body is empty"
    try:
        body = json.loads(text)
    except json.JSONDecodeError as e:
        return f"the request body is not JSON ({e.msg}: line {e.lineno} column {e.colno})"
    if not isinstance(body, dict):
        return f"the request body is a JSON {type(body).__name__}, not an object"
    found = [k for k in body if k in BODY_FORMATS]
    if len(found) != 1:
        keys = _shown(list(body)[:5])
        return f"the request body needs exactly one of {', '.join(BODY_FORMATS)} (its fields: {keys})"
    return None


def params_problem(params: Any) -> None:
    """Refuse (400, one line) the ``params`` MLflow's own check would refuse inside ``predict``, where the
    scoring server rewrites the refusal to ``Failed to predict data '<the whole input table>'...``: not an
    object, or a ``candidates`` that is not a JSON integer (MLflow converts nothing to its ``long``)."""
    from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE

    if params is None:
        return
    if not isinstance(params, dict):
        raise ServingError(f'params must be an object such as {{"candidates": 200}}, got {_shown(params)}', BAD_REQUEST)
    value = params.get("candidates")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        message = f"candidates must be a whole number from 1 to {MAX_CANDIDATES}, got {_shown(value)}"
        raise ServingError(message, INVALID_PARAMETER_VALUE)


def guard_request_parsing() -> bool:
    """Answer a request body the scoring server cannot read (empty, not JSON, not UTF-8, without a
    ``dataframe_records``-like field) with a 400 of one short line, instead of MLflow's message, which
    spans lines and quotes the whole body (a 3 MB body came back whole). Returns whether the guard is on.

    MLflow reads the body before the model sees anything (``scoring_server.invocations`` ->
    ``_parse_json_data`` -> ``_decode_json_input``), and neither ``mlflow models serve`` nor the pyfunc
    flavor has a hook for that step; ``scoring_server.app`` builds its FastAPI app from the loaded model
    with no room for a middleware. So, in the server process only (where ``scoring_server`` is imported
    before the model loads), ``_parse_json_data`` is wrapped: it still does all the work, and only its
    refusals are rewritten. With an MLflow that lacks the function the server answers as before;
    ``tests/test_issue24_inference.py`` checks the guard against the MLflow this project pins."""
    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    parse = getattr(server, "_parse_json_data", None)
    if server is None or parse is None:
        return False
    if getattr(parse, "recsys_guard", False):
        return True
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    def guarded(data: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            parsed = parse(data, *args, **kwargs)
        except MlflowException as e:
            problem = body_problem(data) or " ".join(str(e.message).split())[:200]
            raise ServingError(f"{problem}; send JSON such as {BODY_EXAMPLE}", BAD_REQUEST) from None
        params_problem(getattr(parsed, "params", None))
        return parsed

    guarded.recsys_guard = True  # type: ignore[attr-defined]
    server._parse_json_data = guarded  # type: ignore[attr-defined]
    return True


class RecommenderModel(mlflow.pyfunc.PythonModel):  # type: ignore[misc,name-defined]
    """Raw user ids or item histories -> ranked raw item ids and scores (state in ``load_context``).

    Logged as code (``app/pyfunc_model.py``), never pickled: loading it imports this source."""

    def load_context(self, context: Any) -> None:
        import torch
        from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT

        # One request is a few small ops (200 candidates): intra-op threads only contend with each
        # other and with the server's (bench/serve.py: 10 ms vs 218 ms per user on 2 busy cores);
        # scale out with server workers instead.
        torch.set_num_threads(1)
        guard_request_parsing()
        self.loaded = load_bundle(context.artifacts["bundle"])
        # The server answers 504 at its timeout but cannot stop the thread running predict: stop it
        # ourselves, a little earlier, so the client gets our reason and the CPU is free again.
        self.budget_s = DEADLINE_SHARE * float(MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get())

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> Any:
        from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED, INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        deadline = time.monotonic() + self.budget_s
        try:
            candidates = (params or {}).get("candidates", DEFAULT_CANDIDATES)
            return predict_frame(self.loaded.recommender, model_input, candidates, deadline)
        except DeadlineExceeded as e:
            log.warning("recommender: %s", e)
            raise ServingError(str(e), DEADLINE_EXCEEDED) from None
        except RecsysError as e:
            raise ServingError(str(e), INVALID_PARAMETER_VALUE) from None
        except Exception as e:  # logged here, in full; the client gets one line and no stack trace
            log.exception("recommender: request failed")
            raise ServingError(f"internal error ({type(e).__name__}); see the server log", INTERNAL_ERROR) from None


def signature() -> Any:
    """Output: items, scores, source; param: candidates. No input schema: MLflow would enforce one
    before ``predict`` sees the rows, dropping unknown fields silently, truncating k 2.5 to 2 and
    refusing a row that leaves k out with a message quoting the whole input; ``parse_requests``
    checks the rows instead (the input example shows them)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema

    outputs = Schema(
        [ColSpec(Array("string"), "items"), ColSpec(Array("double"), "scores"), ColSpec("string", "source")]
    )
    return ModelSignature(None, outputs, ParamSchema([ParamSpec("candidates", "long", DEFAULT_CANDIDATES)]))


REGISTERED_NAME_MAX = 256
"""Characters of a registered model's name (the registry's database column)."""


def check_model_name(name: str) -> str:
    """``--register``'s name, refused with one line before any work unless the Model Registry takes it:
    MLflow's rules (not blank; no ``/``, ``:``, ``\\`` or ``%``; nothing a path would turn into another
    name, such as ``..`` or ``./x``), at most ``REGISTERED_NAME_MAX`` characters, no control characters."""
    shown = f"--register {printable(repr(name))}"
    if name.strip() == "":
        raise RecsysError(f"{shown}: empty; name the registered model, e.g. --register movielens-recommender")
    bad = sorted({c for c in name if c in "/:\\%"})
    if bad:
        raise RecsysError(f"{shown}: a registered model name cannot contain {' or '.join(map(repr, bad))}")
    if not name.isprintable():
        raise RecsysError(f"{shown}: a registered model name cannot contain control characters")
    if name in (".", "..") or name != name.strip():
        raise RecsysError(f"{shown}: not a usable registered model name (a dot name, or spaces around it)")
    if len(name) > REGISTERED_NAME_MAX:
        raise RecsysError(f"{shown[:60]}...: {len(name)} characters, at most {REGISTERED_NAME_MAX}")
    from mlflow.utils.validation import _validate_model_name  # the registry's own rule, whatever else it adds

    try:
        _validate_model_name(name)
    except MlflowException as e:
        raise RecsysError(f"{shown}: {(str(e).strip().splitlines() or ['refused'])[0]}") from None
    return name


def package(
    retrieval: str,
    ranking: str | None = None,
    index_dir: str | None = None,
    register: str | None = None,
    tracking_uri: str | None = None,
    store: Any = None,
) -> str:
    """``recsys package``: log the recommender as a pyfunc in a new run of the retrieval run's
    experiment (and register it as ``register``); returns what to serve. ``store``
    (``modules.vector_store.StoreConfig``): the served model retrieves from that vector database (the
    URI and alias travel in the bundle, the token never: the server reads ``RECSYS_MILVUS_TOKEN``)."""
    import mlflow

    if register is not None:
        check_model_name(register)  # the registry refuses it only after the model was logged
    uri = existing_store(tracking_uri)
    root = Path(__file__).resolve().parent.parent
    with os_errors("package", tempfile.gettempdir()), temporary() as tmp:
        bundle = assemble_bundle(retrieval, ranking, tmp / "bundle", uri, index_dir, store)
        loaded = load_bundle(bundle)
        first_user = loaded.recommender.retrieval.user_vocab[0]
        first_item = loaded.recommender.retrieval.item_vocab[0]
        example = pd.DataFrame({"user": [first_user, None], "history": [None, first_item], "k": [DEFAULT_K, 5]})
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_run(retrieval).info.experiment_id
        with mlflow.start_run(experiment_id=experiment, run_name=f"recommender-{retrieval[:8]}") as run:
            mlflow.log_params({"retrieval_run": retrieval, "ranking_run": ranking or ""})
            if store is not None:  # where it retrieves from, without secrets (the bundle's record)
                mlflow.log_params({"store": loaded.runs["store"]["uri"], "store_alias": store.alias})
            try:
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME,
                    python_model=str(MODEL_CODE),  # models from code: the source is stored, nothing pickled
                    artifacts={"bundle": str(bundle)},
                    code_paths=[str(root / p) for p in CODE_PACKAGES],
                    pip_requirements=pip_requirements(),
                    signature=signature(),
                    input_example=example,
                    registered_model_name=register,
                )
            except OSError as e:
                raise RecsysError(f"package: cannot log the model to run {run.info.run_id} ({os_reason(e)})") from None
            except MlflowException as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise RecsysError(f"package: cannot log the model to run {run.info.run_id} ({first})") from None
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
