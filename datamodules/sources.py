"""Readers of raw interaction sources into one canonical pandas table.

The canonical table has one row per interaction with the columns ``user``, ``item`` (raw ids as
strings), ``rating`` (float, optional), ``label`` (float, optional), ``timestamp`` (int64) and one
column per side feature (``FeatureSpec.column``). Every problem with a source is raised as a one-line
``RecsysError`` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import re
import urllib.request
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from core.errors import RecsysError

SETS2019_URL = "https://files.grouplens.org/datasets/learning-from-sets-2019/learning-from-sets-2019.zip"
MOVIELENS_100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
DEFAULT_CACHE = Path.home() / ".cache" / "recsys"


@dataclass(frozen=True)
class FeatureSpec:
    """A side feature of the canonical table."""

    name: str
    kind: str
    """'sparse' (one categorical value), 'multi' (list of values) or 'dense' (float)."""
    tower: str
    """'user' or 'item'."""


@dataclass
class RawTable:
    """A source read into memory: interactions with side features joined in."""

    frame: pd.DataFrame
    features: list[FeatureSpec] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)
    truth: Any = None
    label_definition: str | None = None
    """How the source's own label column was made (None: label = rating >= threshold)."""
    """The planted ground truth of a synthetic set (None for real data)."""
    item_titles: pd.DataFrame | None = None
    """Raw item id (``item``) -> ``title``, when the source names its items (written beside the shards
    as ``item_titles.parquet``, for people reading recommendations; no model reads it)."""


# -- files inside directories and archives -------------------------------------------------------


class SourceFiles:
    """Files of a source that is a directory, a single file or a zip (a wheel is a zip too)."""

    def __init__(self, path: Path) -> None:
        if not path.is_dir():
            regular_file(path)
        self.path = path
        self.zip: zipfile.ZipFile | None = None
        if path.is_file() and path.suffix.lower() in (".zip", ".whl"):
            try:
                self.zip = zipfile.ZipFile(path)
                bad = self.zip.testzip()
            except (zipfile.BadZipFile, OSError) as e:
                raise RecsysError(f"{path}: corrupt zip archive ({e})") from None
            if bad is not None:
                raise RecsysError(f"{path}: corrupt zip archive (bad CRC in {bad})")

    def names(self) -> list[str]:
        if self.zip is not None:
            return [n for n in self.zip.namelist() if not n.endswith("/")]
        if self.path.is_dir():
            return sorted(str(p.relative_to(self.path)) for p in self.path.rglob("*") if p.is_file())
        return [self.path.name]

    def find(self, *basenames: str) -> str | None:
        """The first file whose base name is one of ``basenames`` (preference in that order)."""
        names = self.names()
        for want in basenames:
            for n in names:
                if n.rsplit("/", 1)[-1] == want and "__MACOSX" not in n:
                    return n
        return None

    def read(self, name: str) -> bytes:
        if self.zip is not None:
            return self.zip.read(name)
        if self.path.is_dir():
            return (self.path / name).read_bytes()
        return self.path.read_bytes()

    def display(self, name: str) -> str:
        if self.zip is not None:
            return f"{self.path}:{name}"
        return str(self.path / name) if self.path.is_dir() else str(self.path)


def sha256_of(path: Path) -> str:
    """Checksum of a file, or of a directory's files in name order."""
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` (atomically); a clear error when the machine is offline."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RecsysError(f"{url}: download failed ({e}); pass a local copy with --source") from None
    tmp.rename(dest)
    return dest


def regular_file(path: Path) -> Path:
    """``path`` when it is a regular file; a device, pipe or socket (``/dev/urandom``, a FIFO) would be
    read without end, so it is refused before it is opened."""
    if not path.exists():
        raise RecsysError(f"{path}: no such file or directory")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise RecsysError(f"{path}: {kind}; expected a data file")
    return path


# -- CSV parsing with clear errors ------------------------------------------------------------------


def read_delimited(
    data: bytes,
    where: str,
    *,
    sep: str = ",",
    header: bool = True,
    names: list[str] | None = None,
    encoding: str = "utf-8",
) -> pd.DataFrame:
    """Parse delimited text as strings; empty or unparsable input is a RecsysError naming ``where``."""
    if not data.strip():
        raise RecsysError(f"{where}: file is empty")
    try:
        df = pd.read_csv(
            io.BytesIO(data),
            sep=sep,
            header=0 if header else None,
            names=names,
            dtype=str,
            encoding=encoding,
            keep_default_na=False,
            engine="c" if len(sep) == 1 else "python",
        )
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise RecsysError(f"{where}: cannot parse ({str(e).splitlines()[0]})") from None
    if len(df) == 0:
        raise RecsysError(f"{where}: no data rows")
    return df


def pick_column(
    columns: Sequence[str], where: str, role: str, aliases: tuple[str, ...], required: bool = True
) -> str | None:
    """The name of the column playing ``role`` (first alias present, case-insensitive)."""
    lower = {str(c).strip().lower(): c for c in columns}
    for a in aliases:
        if a.lower() in lower:
            return str(lower[a.lower()])
    if required:
        found = ", ".join(map(str, columns))
        raise RecsysError(f"{where}: missing {role} column (expected one of {', '.join(aliases)}; found {found})")
    return None


def interaction_columns(
    columns: Sequence[str], where: str, need_rating: bool = True, need_timestamp: bool = False
) -> tuple[str, str, str | None, str | None, str | None]:
    """(user, item, label, rating, timestamp) column names of an interaction table, for every engine;
    user and item are required, a rating unless there is a label, and a timestamp for ``--split
    temporal`` (``need_timestamp``: without one every row would get time 0, and the split be random)."""
    user = str(pick_column(columns, where, "user id", USER_ALIASES))
    item = str(pick_column(columns, where, "item id", ITEM_ALIASES))
    label = pick_column(columns, where, "label", LABEL_ALIASES, required=False)
    rating = pick_column(columns, where, "rating", RATING_ALIASES, required=need_rating and label is None)
    ts = pick_column(columns, where, "timestamp", TS_ALIASES, required=False)
    if need_timestamp and ts is None:
        raise RecsysError(
            f"{where}: --split temporal needs a timestamp column (one of {', '.join(TS_ALIASES)}; found "
            f"{', '.join(map(str, columns))}); use --split random or add the column"
        )
    return user, item, label, rating, ts


NAN_WORDS = ("nan", "+nan", "-nan")


def numeric(series: pd.Series, where: str, column: str, offset: int | None = 2) -> pd.Series:
    """Convert a string column to float; the first value that is not a finite number (text, empty,
    NaN, inf) is reported with its line (``offset``: line of the first row; None: no line)."""
    values = pd.to_numeric(series.str.strip() if series.dtype == object else series, errors="coerce")
    values = values.astype(np.float64)
    bad = ~np.isfinite(values.to_numpy())
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raw = series.iloc[i]
        raw = "" if raw is None else raw
        unparsed = np.isnan(values.iloc[i]) and str(raw).strip().lower() not in NAN_WORDS
        kind = "a non-numeric value" if unparsed else "a value that is not a finite number,"
        raise RecsysError(f"{where}: column {column!r} has {kind} {raw!r}{at_line(i, offset)}")
    return values


def at_line(i: int, offset: int | None) -> str:
    return "" if offset is None else f" at line {i + offset}"


USER_ALIASES = ("userId", "user_id", "user", "user_id:token")
ITEM_ALIASES = ("movieId", "movie_id", "itemId", "item_id", "item", "item_id:token")
RATING_ALIASES = ("rating", "rating:float", "score")
LABEL_ALIASES = ("label", "clicked", "click")
TS_ALIASES = ("timestamp", "ts", "time", "timestamp:float")


FLOAT_TYPES = ("float", "double", "halffloat", "float16", "float32", "float64")


def check_id_types(where: str, types: dict[str, str]) -> None:
    """Refuse id columns stored as floating-point numbers (``types``: column -> type name, as Arrow or
    Spark spell it): their text would be ``69.0``, not the id ``69``, and a null among integers is what
    turns an integer column into floats."""
    for column, kind in types.items():
        if kind.lower() in FLOAT_TYPES:
            raise RecsysError(
                f"{where}: column {column!r} holds floating-point numbers ({kind}); ids must be integers or strings"
            )


def ids(series: pd.Series, where: str, column: str, offset: int | None) -> pd.Series:
    """A raw id column as stripped strings; a missing or empty id is refused with its line."""
    text = series.where(series.notna(), "").astype(str).str.strip()
    empty = (text == "").to_numpy()
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise RecsysError(f"{where}: column {column!r} has an empty or missing id{at_line(i, offset)}")
    return text


def canonical_interactions(
    df: pd.DataFrame, where: str, *, need_rating: bool = True, need_timestamp: bool = False, offset: int | None = 2
) -> pd.DataFrame:
    """Map a parsed interaction file onto the canonical columns, validating every value: the one set of
    rules of both preparation engines (the Spark engine runs this function over its partitions).

    Ids must be present; ratings and timestamps finite numbers; labels 0 or 1 (graded feedback is a
    rating, labelled by ``--label-threshold``). ``offset``: the line of the first row (None: no line);
    ``need_timestamp``: the source must have a timestamp column (``--split temporal``), else every row's
    ``timestamp`` is 0.
    """
    user, item, label, rating, ts = interaction_columns(list(df.columns), where, need_rating, need_timestamp)
    out = pd.DataFrame({"user": ids(df[user], where, user, offset), "item": ids(df[item], where, item, offset)})
    if rating is not None:
        out["rating"] = numeric(df[rating], where, str(rating), offset)
    if label is not None:
        out["label"] = labels(df[label], where, str(label), offset)
    out["timestamp"] = numeric(df[ts], where, str(ts), offset).astype(np.int64) if ts is not None else np.int64(0)
    return out


def labels(series: pd.Series, where: str, column: str, offset: int | None) -> pd.Series:
    """A label column: numbers that are 0 or 1 (a label rate above 1 would be reported otherwise)."""
    values = numeric(series, where, column, offset)
    bad = ~np.isin(values.to_numpy(), (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RecsysError(
            f"{where}: column {column!r} has the value {series.iloc[i]!r}{at_line(i, offset)}; labels must be 0 or 1 "
            "(put graded feedback in a rating column and choose --label-threshold)"
        )
    return values


# -- sets2019 ---------------------------------------------------------------------------------------


def locate_sets2019(source: str | None) -> tuple[Path, SourceFiles, str]:
    """The sets2019 source (zip, directory, csv or URL), its files and the name of item_ratings.csv."""
    path = _local_or_download(source or SETS2019_URL, "learning-from-sets-2019.zip")
    files = SourceFiles(path)
    name = files.find("item_ratings.csv") if files.zip is not None or path.is_dir() else path.name
    if name is None:
        raise RecsysError(f"{path}: no item_ratings.csv inside")
    return path, files, name


def read_sets2019(source: str | None, rows: int | None, need_timestamp: bool = False) -> RawTable:
    """GroupLens "Learning from Sets of Items" (2019): ``item_ratings.csv`` from a zip, csv or URL."""
    path, files, name = locate_sets2019(source)
    where = files.display(name)
    df = read_delimited(files.read(name), where)
    if rows is not None:
        df = df.iloc[:rows]
    table = canonical_interactions(df, where, need_timestamp=need_timestamp)
    return RawTable(table, [], {"path": str(path), "sha256": sha256_of(path)})


def interactions_path(source: str | None) -> Path:
    """The user's interaction file named by --source."""
    if source is None:
        raise RecsysError("--source is required for --dataset interactions (a .csv or .parquet file)")
    return regular_file(Path(source))


def read_interactions(source: str | None, rows: int | None, need_timestamp: bool = False) -> RawTable:
    """The user's own interactions: CSV or Parquet with user/item ids, rating or label, timestamp."""
    path = interactions_path(source)
    where = str(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        df = read_parquet_as_text(path)
        offset: int | None = None  # Parquet has no lines
    else:
        df, offset = read_delimited(path.read_bytes(), where), 2
    if rows is not None:
        df = df.iloc[:rows]
    table = canonical_interactions(df, where, need_timestamp=need_timestamp, offset=offset)
    return RawTable(table, [], {"path": str(path), "sha256": sha256_of(path)})


def read_parquet_as_text(path: Path) -> pd.DataFrame:
    """Every column of a Parquet file as text, as Arrow writes it (an int64 id 69 stays ``"69"``; a
    missing value stays missing, for the checks to name), id columns of floating-point type refused."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for damaged files
        raise RecsysError(f"{path}: cannot read Parquet ({str(e).splitlines()[0]})") from None
    if table.num_rows == 0:
        raise RecsysError(f"{path}: no data rows")
    return arrow_as_text(table, str(path))


def arrow_as_text(table: Any, where: str, *, check_types: bool = True) -> pd.DataFrame:
    """``read_parquet_as_text`` for an Arrow table already read (the chunked engine calls it per chunk,
    ``check_types=False`` where it checked the id types for the whole file)."""
    import pyarrow as pa

    names = [str(n) for n in table.column_names]
    user, item, *_ = interaction_columns(names, where, need_rating=False)
    if check_types:
        # a missing id is named by the canonical checks (it is also what made an integer column float)
        whole = [c for c in (user, item) if table.column(c).null_count == 0]
        check_id_types(where, {c: str(table.schema.field(c).type) for c in whole})
    columns = {}
    for name, column in zip(names, table.columns, strict=True):
        if pa.types.is_nested(column.type) or pa.types.is_binary(column.type):
            continue  # no canonical column is a list or raw bytes
        columns[name] = column.cast(pa.string()).to_pandas()
    return pd.DataFrame(columns)


# -- MovieLens 100K ---------------------------------------------------------------------------------

ML_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
MOVIELENS_FEATURES = [
    FeatureSpec("user_gender", "sparse", "user"),
    FeatureSpec("user_occupation", "sparse", "user"),
    FeatureSpec("user_zip", "sparse", "user"),
    FeatureSpec("item_genres", "multi", "item"),
    FeatureSpec("user_age", "dense", "user"),
    FeatureSpec("item_year", "dense", "item"),
]


def default_movielens_dir() -> Path:
    return DEFAULT_CACHE / "datasets" / "movielens-100k"


def read_movielens_100k(source: str | None, rows: int | None, need_timestamp: bool = False) -> RawTable:
    """MovieLens-100K from the GroupLens layout (u.data/u.user/u.item) or RecBole atomic files."""
    path = Path(source) if source else default_movielens_dir()
    if source is None and not path.exists():
        raise RecsysError(
            f"{path}: MovieLens-100K not found; run `recsys data download movielens-100k` or pass --source"
        )
    files = SourceFiles(path)
    if (data := files.find("u.data")) is not None:
        inter, users, items = _ml100k_grouplens(files, data)
    elif (data := files.find("ml-100k.inter")) is not None:
        inter, users, items = _ml100k_recbole(files, data, need_timestamp)
    else:
        raise RecsysError(f"{path}: neither u.data (GroupLens ml-100k) nor ml-100k.inter (RecBole) inside")
    if rows is not None:
        inter = inter.iloc[:rows]
    titles = pd.DataFrame({"item": items["item"], "title": items.pop("title").astype(str).str.strip()})
    frame = inter.merge(users, on="user", how="left").merge(items, on="item", how="left")
    frame["item_genres"] = frame["item_genres"].apply(lambda g: g if isinstance(g, list) else [])
    origin = {"path": str(path), "sha256": sha256_of(path)}
    return RawTable(frame, list(MOVIELENS_FEATURES), origin, item_titles=titles.drop_duplicates("item"))


def _ml100k_grouplens(files: SourceFiles, data: str) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    prefix = data[: -len("u.data")]
    where = files.display(data)
    raw = read_delimited(files.read(data), where, sep="\t", header=False, names=["user", "item", "rating", "timestamp"])
    inter = canonical_interactions(raw, where, offset=1)
    uname, iname = prefix + "u.user", prefix + "u.item"
    for n in (uname, iname):
        if n not in files.names():
            raise RecsysError(f"{files.display(n)}: missing (needed for side features)")
    u = read_delimited(
        files.read(uname),
        files.display(uname),
        sep="|",
        header=False,
        names=["user", "age", "gender", "occupation", "zip"],
    )
    users = pd.DataFrame(
        {
            "user": u["user"].str.strip(),
            "user_age": numeric(u["age"], files.display(uname), "age", offset=1),
            "user_gender": u["gender"],
            "user_occupation": u["occupation"],
            "user_zip": u["zip"].str[:2],
        }
    )
    it = read_delimited(
        files.read(iname),
        files.display(iname),
        sep="|",
        header=False,
        encoding="latin-1",
        names=["item", "title", "release", "video", "url", *ML_GENRES],
    )
    flags = it[ML_GENRES].to_numpy() == "1"
    items = pd.DataFrame(
        {
            "item": it["item"].str.strip(),
            "title": it["title"],
            "item_year": pd.to_numeric(it["release"].str[-4:], errors="coerce"),
            "item_genres": [[g for g, f in zip(ML_GENRES, row, strict=True) if f] for row in flags],
        }
    )
    return inter, users, items


def _ml100k_recbole(
    files: SourceFiles, data: str, need_timestamp: bool
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    prefix = data[: -len("ml-100k.inter")]
    where = files.display(data)
    raw = read_delimited(files.read(data), where, sep="\t")
    inter = canonical_interactions(raw, where, need_timestamp=need_timestamp)
    uname, iname = prefix + "ml-100k.user", prefix + "ml-100k.item"
    for n in (uname, iname):
        if n not in files.names():
            raise RecsysError(f"{files.display(n)}: missing (needed for side features)")
    u = read_delimited(files.read(uname), files.display(uname), sep="\t")
    u.columns = [c.split(":")[0] for c in u.columns]
    users = pd.DataFrame(
        {
            "user": u["user_id"].str.strip(),
            "user_age": numeric(u["age"], files.display(uname), "age"),
            "user_gender": u["gender"],
            "user_occupation": u["occupation"],
            "user_zip": u["zip_code"].str[:2],
        }
    )
    it = read_delimited(files.read(iname), files.display(iname), sep="\t")
    it.columns = [c.split(":")[0] for c in it.columns]
    items = pd.DataFrame(
        {
            "item": it["item_id"].str.strip(),
            "title": it["movie_title"] if "movie_title" in it.columns else "",
            "item_year": pd.to_numeric(it["release_year"], errors="coerce"),
            "item_genres": [[g for g in s.split() if g] for s in it["class"]],
        }
    )
    return inter, users, items


def _local_or_download(source: str, filename: str) -> Path:
    if re.match(r"^https?://", source):
        return download(source, DEFAULT_CACHE / "downloads" / filename)
    return Path(source)


class Reader(Protocol):
    """A reader of a dataset's source: (--source, --rows cap, whether a timestamp column is required)."""

    def __call__(self, source: str | None, rows: int | None, need_timestamp: bool = False) -> RawTable: ...


READERS: dict[str, Reader] = {
    "sets2019": read_sets2019,
    "movielens-100k": read_movielens_100k,
    "interactions": read_interactions,
}
