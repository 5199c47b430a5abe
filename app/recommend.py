"""From trained runs to recommendations: ``recsys index`` and ``recsys recommend``.

    recsys index --run-id RUN [--index flat] [--out DIR]
    recsys recommend --retrieval RUN [--ranking RUN] --user 196 [--k 10] [--candidates 200]
    recsys recommend --retrieval RUN --users users.txt --out recs.parquet
    recsys recommend --retrieval RUN --history 50,181,100

The commands over runs: ``index`` builds a run's item index (``app.bundle.build_item_index``) and logs
it to the run, or publishes the vectors to a vector database (``--store``: ``app.publish``);
``recommend`` assembles a bundle (``app.bundle``) from the runs and asks its Recommender. Outputs
(``index --out``, ``recommend --out``) follow ``core.output``'s rule.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from app.bundle import DEFAULT_SPEC, INDEX_ARTIFACT, assemble_bundle, build_item_index, load_bundle
from app.stages import (
    check_retrieves,
    fetch_stage,
    os_errors,
    run_client,
    temporary,
)
from core.errors import RecsysError, printable, require
from core.output import PARQUET_FILE, atomic_output, check_output, os_reason

if TYPE_CHECKING:
    from modules.vector_store import StoreConfig

log = logging.getLogger(__name__)


# -- recsys index -----------------------------------------------------------------------------------


def index_run(
    run_id: str,
    spec: str = DEFAULT_SPEC,
    out: str | None = None,
    tracking_uri: str | None = None,
    overwrite: bool = False,
) -> str:
    """``recsys index``: build the run's item index in a private temporary directory, log that directory
    (and nothing else) to the run as ``index/``, and install a copy at ``out`` if given (``core.output``'s
    rule: a new path, or an index replaced with ``overwrite``); returns a one-line summary."""
    from modules.index import INDEX_OUTPUT, parse_spec

    parse_spec(spec)  # a bad spec or --out fails before any download
    if out:
        check_output(out, INDEX_OUTPUT, overwrite)
    client = run_client(run_id, tracking_uri, "--run-id")
    with os_errors(f"--run-id {run_id}", tempfile.gettempdir()), temporary() as tmp:
        stage_dir = fetch_stage(run_id, tracking_uri, tmp / "stage", "--run-id", with_pairs=False)
        check_retrieves(stage_dir, "--run-id")
        built = tmp / INDEX_ARTIFACT
        index = build_item_index(stage_dir, spec, built)
        if out:
            with atomic_output(out, INDEX_OUTPUT, overwrite) as target:
                for f in built.iterdir():
                    shutil.copy(f, target / f.name)
                log_index(client, run_id, built)
        else:
            log_index(client, run_id, built)
    where = f" -> {out}" if out else ""
    summary = f"indexed {index.count} items ({index.spec}, {index.similarity}, dim {index.dim}){where}"
    return f"{summary}; logged to run {run_id} as {INDEX_ARTIFACT}/"


def log_index(client: Any, run_id: str, built: Path) -> None:
    """Log an index directory to the run as ``index/`` (one line if the artifact store refuses it)."""
    from mlflow.exceptions import MlflowException

    try:
        client.log_artifacts(run_id, str(built), INDEX_ARTIFACT)
    except (OSError, MlflowException) as e:
        reason = os_reason(e) if isinstance(e, OSError) else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RecsysError(f"--run-id {run_id}: cannot log the index to the run ({reason})") from None


# -- recsys recommend -------------------------------------------------------------------------------


def read_users_file(path: str) -> list[str]:
    """Raw user ids from a text file (one a line), a CSV or a Parquet file.

    Parquet: column ``user``, else the first. CSV: a first row is a header only when one of its cells
    is exactly ``user`` (that column is read); otherwise every row is data and the ids are the first
    column, so a file of bare ids loses none (a header-guessing reader would take the first id for a
    column name). Ids are read as text, as written ("007" stays "007", "NA" is an id).
    """
    p = Path(path)
    require(p.is_file(), f"--users {path}: no such file")
    try:
        if p.suffix == ".parquet":
            frame = pd.read_parquet(p)
            require(len(frame.columns) > 0, f"--users {path}: no columns")
            column = "user" if "user" in frame.columns else frame.columns[0]
            return [str(u) for u in frame[column].dropna().tolist()]
        if p.suffix == ".csv":
            frame = pd.read_csv(p, dtype=str, header=None, keep_default_na=False, skip_blank_lines=True)
            if len(frame) == 0:
                return []
            header = [str(v).strip() for v in frame.iloc[0].tolist()]
            column = header.index("user") if "user" in header else 0
            values = frame.iloc[1 if "user" in header else 0 :, column]
            return [u.strip() for u in values.tolist() if u.strip()]
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    except pd.errors.EmptyDataError:
        return []
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise RecsysError(f"--users {path}: unreadable ({str(e).splitlines()[0]})") from None


def recommend(
    retrieval: str,
    ranking: str | None,
    users: list[str] | None,
    users_file: str | None,
    history: str | None,
    k: int = 10,
    candidates: int = 200,
    out: str | None = None,
    index_dir: str | None = None,
    tracking_uri: str | None = None,
    overwrite: bool = False,
    store: StoreConfig | None = None,
    filter: str | None = None,
) -> str:
    """``recsys recommend``: what the command prints (a table, or where the Parquet file went: ``out``
    follows ``core.output``'s rule, a new file or, with ``overwrite``, a Parquet file replaced). A query
    left with no recommendation (every item the index holds excluded as seen) is said so, never an
    empty table; ids are printed with their control characters escaped. ``store``: retrieve from that
    vector database instead of the run's index; ``filter``: only items that expression accepts."""
    from modules.funnel import check_sizes, describe

    given = [name for name, v in (("--user", users), ("--users", users_file), ("--history", history)) if v is not None]
    require(len(given) == 1, "recommend: pass exactly one of --user, --users FILE or --history ITEM,ITEM,...")
    check_sizes(k, candidates)
    items = [] if history is None else [i.strip() for i in history.split(",") if i.strip()]
    require(
        history is None or len(items) > 0,
        f"--history {repr(history)[:40]}: names no item (raw item ids, comma-separated, e.g. --history 50,181,100)",
    )
    if out:
        check_output(out, PARQUET_FILE, overwrite)  # before any download or model
    with os_errors("recommend", tempfile.gettempdir()), temporary() as tmp:
        loaded = load_bundle(assemble_bundle(retrieval, ranking, tmp / "bundle", tracking_uri, index_dir, store))
    rec = loaded.recommender
    if filter is not None:
        require(filter.strip() != "", "--filter: empty (a boolean expression, e.g. 'item_year >= 1995')")
        rec.source.check_filter(filter)
    if history is not None:
        queries = ["history"]
        results = rec.recommend_histories([items], k, candidates, filter=filter)
        left = [("--history", rec.nothing_left(history=items))] if not results[0].items else []
    else:
        queries = users if users is not None else read_users_file(str(users_file))
        require(len(queries) > 0, f"{given[0]}: no user ids given")
        results = rec.recommend_users(
            queries, k, candidates, progress=out is not None and len(queries) > 1, filter=filter
        )
        left = [(f"user {q}", rec.nothing_left(user=q)) for q, r in zip(queries, results, strict=True) if not r.items]
    rows = [{"user": q, **row} for q, r in zip(queries, results, strict=True) for row in describe(r, loaded.titles)]
    table = pd.DataFrame(
        rows, columns=["user", "rank", "item", "score", "source", *(["title"] if loaded.titles else [])]
    )
    if not out and table.empty:
        return printable("\n".join(f"no recommendations for {who}: {why}" for who, why in left))
    for who, why in left[:5]:
        log.warning("no recommendations for %s: %s", printable(who), why)
    if len(left) > 5:
        log.warning("... and %d more queries without recommendations", len(left) - 5)
    if out:
        with atomic_output(out, PARQUET_FILE, overwrite) as tmp_file:
            write_parquet(table, tmp_file, f"--out {out}")
        return f"{len(queries)} quer{'y' if len(queries) == 1 else 'ies'}, {len(table)} recommendations -> {out}"
    return printable(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))


def write_parquet(table: pd.DataFrame, path: Path, shown: str) -> None:
    """``table`` as a Parquet file; pyarrow's own (non-OS) errors as one line (an OSError, e.g. no space,
    is ``atomic_output``'s to report)."""
    import pyarrow as pa

    try:
        table.to_parquet(path, index=False)
    except pa.ArrowException as e:
        if isinstance(e, OSError):
            raise
        raise RecsysError(
            f"{shown}: cannot write the Parquet file ({(str(e).strip().splitlines() or [''])[0]})"
        ) from None
