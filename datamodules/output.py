"""Where ``recsys data prepare`` writes: ``core.output``'s rule for a prepared dataset (a directory
holding ``metadata.json``), plus the shard hashes recorded before the dataset is moved into place.

``--overwrite`` replaces only a prepared dataset, never the current directory or one of its parents,
never a directory holding the ``--source``; the output is built in a temporary sibling and renamed
when complete (``core.output`` says how, and what happens to concurrent or killed prepares). A
command never writes over one of its own inputs (``refuse_inputs``): ``--out`` is not, does not
contain and does not lie inside any of them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from core.errors import RecsysError
from core.output import OutputKind, has_file
from core.output import atomic_output as _atomic_output
from core.output import check_output as _check_output
from datamodules.schema import METADATA_FILE

DATASET = OutputKind("a prepared dataset", is_dir=True, problem=has_file(METADATA_FILE))


def check_output(out: Path, overwrite: bool, source: str | None = None) -> Path:
    """Refuse an ``--out`` that prepare must not write (``source``: the input, which replacing ``out``
    must not delete); returns it as an absolute path."""
    return _check_output(out, DATASET, overwrite, keep=source)


@contextlib.contextmanager
def atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; move it to ``out`` only when the body succeeds."""
    from datamodules.integrity import record_shard_hashes

    with _atomic_output(out, DATASET, overwrite) as tmp:
        yield tmp
        record_shard_hashes(tmp)  # every engine's shards, checked when the dataset is opened


def refuse_inputs(out: str | Path, inputs: Iterable[tuple[str, str | None]], flag: str = "--out") -> None:
    """Refuse, with one line, an ``out`` that is, contains or lies inside one of the command's inputs
    (``inputs``: (how the message names it, its path); remote URIs and absent inputs are skipped):
    a command never writes over what it reads, even with ``--overwrite``."""
    target = Path(os.path.abspath(out))
    outs = {target, target.resolve()}
    for name, path in inputs:
        if not path or "://" in path:
            continue
        source = Path(os.path.abspath(path))
        for t in outs:
            for s in {source, source.resolve()}:
                if t == s:
                    relation = "is"
                elif s in t.parents:
                    relation = "lies inside"
                elif t in s.parents:
                    relation = "contains"
                else:
                    continue
                raise RecsysError(
                    f"{flag} {out}: {relation} {name}, an input of this command (a command never writes over "
                    f"its own inputs); choose another {flag}"
                )
