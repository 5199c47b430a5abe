"""bench/funnel.py reuses a --work directory's runs only when they were made for the same data, split
seed, settings and code (issue 22); otherwise it stops with one line, or starts over with --rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import funnel
from datamodules.schema import read_metadata


def test_runs_of_other_data_settings_or_code_are_refused_in_one_line(ml_dataset: Path, tmp_path: Path) -> None:
    meta = read_metadata(ml_dataset)
    fingerprint = funnel.work_fingerprint(ml_dataset, meta, 100, 0.3)
    assert fingerprint == funnel.work_fingerprint(ml_dataset, meta, 100, 0.3)  # stable
    assert fingerprint != funnel.work_fingerprint(ml_dataset, meta, 50, 0.3)
    work = tmp_path / "work"
    work.mkdir()
    runs = {"fingerprint": fingerprint, "data": str(ml_dataset.resolve()), "retrieval": "r", "ranking": "k"}
    (work / "runs.json").write_text(json.dumps(runs))
    data, _, reused = funnel.setup(work, ml_dataset, 100, 0.3)  # the same: reused, nothing trained
    assert reused["retrieval"] == "r" and data == ml_dataset
    with pytest.raises(SystemExit) as e:
        funnel.setup(work, ml_dataset, 50, 0.3)
    assert "differ: candidates" in str(e.value) and "--rebuild" in str(e.value) and "\n" not in str(e.value)
    # code that changed since: the source digest is part of the fingerprint
    parts = json.loads(fingerprint.split("|", 1)[1])
    runs["fingerprint"] = "x|" + json.dumps({**parts, "code": "0" * 64})
    (work / "runs.json").write_text(json.dumps(runs))
    with pytest.raises(SystemExit, match="differ: code"):
        funnel.setup(work, ml_dataset, 100, 0.3)
    # a cache of an older bench (no fingerprint), even for the same data path
    (work / "runs.json").write_text(json.dumps({"data": str(ml_dataset.resolve()), "retrieval": "r"}))
    with pytest.raises(SystemExit, match="made by an older bench"):
        funnel.setup(work, ml_dataset, 100, 0.3)
