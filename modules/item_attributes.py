"""Items in raw values: the attributes a vector store filters on, and new items from their side features.

``item_attributes`` decodes a retrieval stage's item table (vocabulary indices, standardised dense
values) back into what the dataset's source said: a categorical feature's raw value, a multi-hot
feature's raw values, a dense feature's number. ``new_items`` goes the other way for items the run has
never seen (``recsys index --add-items``): their side features, checked against the run's schema and
vocabularies, encoded as training encoded them, and embedded by the item tower with the item id out of
vocabulary (index 0), as an unseen id always was.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from core.errors import RecsysError, require
from datamodules.schema import DatasetMetadata
from modules.funnel import FeatureTable, Stage
from modules.vector_store import ID_FIELD, AttributeKind, Attributes

MULTI_SEPARATOR = "|"
"""Between the values of a multi-hot feature in an ``--add-items`` CSV cell (``Comedy|Drama``)."""


def attribute_kinds(meta: DatasetMetadata) -> dict[str, AttributeKind]:
    """The item tower's features other than the id, by name: string, strings (multi-hot) or number."""
    kinds: dict[str, AttributeKind] = {}
    for f in meta.sparse_features:
        if f.tower == "item" and f.name != meta.item_id_feature:
            kinds[f.name] = "strings" if f.multi_hot else "string"
    for d in meta.dense_features:
        if d.tower == "item":
            kinds[d.name] = "number"
    require(ID_FIELD not in kinds, f"dataset {meta.dataset!r}: an item feature is named {ID_FIELD!r}")
    return kinds


def item_attributes(stage: Stage, vocabs: Mapping[str, Sequence[str]]) -> Attributes:
    """The raw attributes of every item of the stage's corpus, in ``modules.funnel.item_vectors``' order."""
    idx = stage.items.present[stage.items.present > 0]
    rows = torch.as_tensor(idx)
    kinds = attribute_kinds(stage.meta)
    columns: dict[str, list] = {}
    dense = {d.name: d for d in stage.meta.dense_features}
    for name, kind in kinds.items():
        if kind == "number":
            d = dense[name]
            values = stage.items.dense[name][rows].numpy() if name in stage.items.dense else np.zeros(len(idx))
            columns[name] = (values.astype(np.float64) * d.std + d.mean).tolist()
            continue
        raw = np.array(["", *vocabs.get(name, [])], dtype=object)
        values_t, lengths = stage.items.sparse(name, rows)
        values = np.clip(values_t.numpy(), 0, len(raw) - 1)
        if kind == "string":
            columns[name] = raw[values].astype(str).tolist() if len(values) == len(idx) else [""] * len(idx)
        else:
            ends = np.cumsum(lengths.numpy())
            columns[name] = [
                [str(v) for v in raw[values[e - n : e]] if v] for e, n in zip(ends, lengths.numpy(), strict=True)
            ]
    return Attributes(stage.item_raw[idx].astype(str), kinds, columns)


@dataclass
class NewItems:
    """Items read from an ``--add-items`` file: raw ids, their tower vectors and raw attributes."""

    ids: np.ndarray
    vectors: np.ndarray
    attributes: Attributes


def new_items(stage: Stage, vocabs: Mapping[str, Sequence[str]], frame: pd.DataFrame, shown: str) -> NewItems:
    """Check ``frame`` (column ``item`` + every item side feature, raw text values) against the run's
    schema and vocabularies, encode it and embed it with the item tower (the id out of vocabulary).
    Anything that does not fit (an unknown or missing column, a value the vocabulary does not hold, a
    dense value that is not a finite number, an id the run trained on or given twice) is one line."""
    meta = stage.meta
    kinds = attribute_kinds(meta)
    expected = [ID_FIELD, *kinds]
    unknown = [c for c in frame.columns if c not in expected]
    require(not unknown, f"{shown}: unknown column(s) {', '.join(map(str, unknown))} (expected {', '.join(expected)})")
    missing = [c for c in expected if c not in frame.columns]
    require(not missing, f"{shown}: missing column(s) {', '.join(missing)} (expected {', '.join(expected)})")
    require(len(frame) > 0, f"{shown}: no items")
    ids = frame[ID_FIELD].astype(str).str.strip()
    require(bool((ids != "").all()), f"{shown}: an empty item id")
    duplicated = ids[ids.duplicated()]
    require(duplicated.empty, f"{shown}: item {duplicated.iloc[0] if len(duplicated) else ''!r} given twice")
    trained = [i for i in ids if stage.item_index([i])[0] > 0]
    require(not trained, f"{shown}: item {trained[0] if trained else ''!r} is one the run trained on (not new)")
    n = len(frame)
    id_name = str(meta.item_id_feature)
    encoded: dict[str, object] = {id_name: np.arange(1, n + 1)}
    columns: dict[str, list] = {}
    dense = {d.name: d for d in meta.dense_features}
    for name, kind in kinds.items():
        cells = frame[name].astype(str).str.strip().tolist()
        if kind == "number":
            numbers = []
            for c in cells:
                try:
                    x = float(c)
                except ValueError:
                    x = math.nan
                require(math.isfinite(x), f"{shown}: {name} {c!r} is not a finite number")
                numbers.append(x)
            columns[name] = numbers
            encoded[name] = (np.asarray(numbers) - dense[name].mean) / dense[name].std
            continue
        lookup = {v: i + 1 for i, v in enumerate(vocabs.get(name, []))}
        values = [
            [v.strip() for v in c.split(MULTI_SEPARATOR) if v.strip()] if kind == "strings" else [c] for c in cells
        ]
        for row in values:
            for v in row:
                if v and v not in lookup:
                    shown_vocab = ", ".join(list(lookup)[:6])
                    raise RecsysError(f"{shown}: {name} {v!r} is not in the run's vocabulary ({shown_vocab}, ...)")
        if kind == "strings":
            columns[name] = values
            encoded[name] = [[lookup[v] for v in row] for row in values]
        else:
            columns[name] = [row[0] for row in values]
            encoded[name] = [lookup.get(row[0], 0) for row in values]
    table = FeatureTable(pd.DataFrame(encoded), meta, "item", size=n + 1)
    table.single[id_name] = torch.zeros(n + 1, dtype=torch.int64)  # every new item: the unknown id
    vectors = stage.embed("item", np.arange(1, n + 1), table=table)
    return NewItems(ids.to_numpy().astype(str), vectors, Attributes(ids.to_numpy().astype(str), kinds, columns))
