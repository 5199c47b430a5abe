"""``recsys recommend --all-users`` (issue 24): an output that records its settings in every partition
it writes (or refuses a folder it cannot prove is its own); completion judged from the files present
and valid; a bundle that does not verify assembled again; failures before any work leave nothing;
every operating-system error is one line. On the local engine (the fixes are the driver's)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_batch import CANDIDATES, PARTITIONS, K, all_users
from test_funnel import Runs, one_line, train_runs

from app.cli import main

DONE = 3
"""Partitions a killed run finished."""


@pytest.fixture(scope="module")
def runs(ml_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return train_runs(ml_dataset, tmp_path_factory.mktemp("batch24"), other=False)


@pytest.fixture(scope="module")
def finished(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete output (rerank, K, PARTITIONS partitions): what every repaired output must equal."""
    out = tmp_path_factory.mktemp("reference") / "recs"
    assert main(all_users(runs, out, partitions=PARTITIONS)) == 0
    return out


@pytest.fixture(scope="module")
def reference(finished: Path) -> pd.DataFrame:
    return rows(finished)


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out).sort_values(["user", "rank"]).reset_index(drop=True)


def same_rows(out: Path, reference: pd.DataFrame) -> None:
    """Every user's K rows, each once, equal to the reference (items, scores, sources: reranked)."""
    table = rows(out)
    assert not table.duplicated(["user", "rank"]).any()
    assert (table.groupby("user").size() == K).all()
    pd.testing.assert_frame_equal(table, reference, check_exact=False, atol=1e-6)
    assert not [n for n in os.listdir(out) if n.startswith(".") or n == "_bundle"]  # no leftovers


def killed(argv: list[str], out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run stopped (as by Ctrl-C) after DONE partitions: DIR holds them, the bundle and the manifest."""
    import app.batch

    engine = app.batch.map_partitions

    def stopped(*a: Any) -> Iterator[Any]:
        for i, result in enumerate(engine(*a), 1):
            yield result
            if i == DONE:
                raise KeyboardInterrupt  # before the engine starts the next partition

    with monkeypatch.context() as patch:
        patch.setattr(app.batch, "map_partitions", stopped)
        assert main(argv) == 130
    assert len(list(out.glob("part-*"))) == DONE and (out / "_bundle").is_dir()


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    return one_line(capsys.readouterr().err)


def test_a_folder_of_other_settings_without_its_manifest_is_refused(
    runs: Runs, reference: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """Bullet 1: a killed run of k 4 without the rerank, its manifest removed: its partitions are not
    kept by a run of k 5 with the rerank (no users of mixed k, no rows left unranked)."""
    out = tmp_path / "recs"
    argv = all_users(runs, out, partitions=PARTITIONS, k=4)
    argv[argv.index("--ranking") : argv.index("--ranking") + 2] = []  # no rerank
    killed(argv, out, monkeypatch)
    (out / "_manifest.json").unlink()
    before = {p.name: p.stat().st_ino for p in out.glob("part-*")}
    assert len(before) == DONE
    capsys.readouterr()

    assert main(all_users(runs, out, partitions=PARTITIONS)) == 2
    line = error_line(capsys)
    assert f"--out {out}: holds --all-users output of other settings" in line and "k 4 -> 5" in line, line
    assert {p.name: p.stat().st_ino for p in out.glob("part-*")} == before  # nothing touched

    assert main(all_users(runs, out, partitions=PARTITIONS, overwrite="true")) == 0  # starts over
    assert "kept" not in capsys.readouterr().out
    same_rows(out, reference)


def test_a_killed_run_of_these_settings_without_its_manifest_resumes(
    runs: Runs, reference: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """Bullet 1, the other side: part files that each record these settings prove the folder is this
    run's: they are kept (the bundle, which nothing proves, is assembled again)."""
    out = tmp_path / "recs"
    killed(all_users(runs, out, partitions=PARTITIONS), out, monkeypatch)
    (out / "_manifest.json").unlink()
    kept = {p.name: p.stat().st_ino for p in out.glob("part-*")}
    capsys.readouterr()
    assert main(all_users(runs, out, partitions=PARTITIONS)) == 0
    assert f"{DONE} kept from an earlier run" in capsys.readouterr().out
    assert {p.name: p.stat().st_ino for p in out.glob("part-*") if p.name in kept} == kept
    same_rows(out, reference)


def test_a_deleted_part_file_is_written_again(
    runs: Runs, finished: Path, reference: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bullet 2: completion is judged from the files present and valid, not from the manifest."""
    out = tmp_path / "recs"
    shutil.copytree(finished, out)
    (out / "part-00003.parquet").unlink()
    capsys.readouterr()
    assert main(all_users(runs, out, partitions=PARTITIONS)) == 0
    printed = capsys.readouterr().out
    assert "already complete" not in printed and f"{PARTITIONS - 1} kept from an earlier run" in printed
    same_rows(out, reference)
    assert main(all_users(runs, out, partitions=PARTITIONS)) == 0
    assert "already complete" in capsys.readouterr().out


def test_a_truncated_part_file_is_written_again(
    runs: Runs, reference: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """Bullet 3: a part file whose footer does not read is not counted as finished: it is redone."""
    out = tmp_path / "recs"
    killed(all_users(runs, out, partitions=PARTITIONS), out, monkeypatch)
    part = sorted(out.glob("part-*"))[0]
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    capsys.readouterr()
    assert main(all_users(runs, out, partitions=PARTITIONS)) == 0, capsys.readouterr().err
    assert f"{DONE - 1} kept from an earlier run" in capsys.readouterr().out
    same_rows(out, reference)


def test_a_part_file_of_other_rows_than_recorded_is_written_again(
    runs: Runs, finished: Path, reference: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bullet 3: a complete output's part file that lost rows (its footer readable, its row count not the
    one recorded when it was written) and another truncated: both redone, the output whole again."""
    out = tmp_path / "recs"
    shutil.copytree(finished, out)
    short = out / "part-00002.parquet"
    table = pq.read_table(short)
    pq.write_table(table.slice(0, table.num_rows - 1), short)  # its schema's metadata (the record) kept
    cut = out / "part-00005.parquet"
    cut.write_bytes(cut.read_bytes()[:-16])  # the footer's end gone: "Parquet magic bytes not found"
    capsys.readouterr()
    assert main(all_users(runs, out, partitions=PARTITIONS)) == 0, capsys.readouterr().err
    assert f"{PARTITIONS - 2} kept from an earlier run" in capsys.readouterr().out
    same_rows(out, reference)


def corrupt_bundle(out: Path) -> None:
    weights = out / "_bundle" / "retrieval" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))


def test_a_corrupted_bundle_is_assembled_again(
    runs: Runs, reference: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """Bullet 4: a bundle that fails its checksums is assembled again (the finished partitions kept)."""
    out = tmp_path / "recs"
    killed(all_users(runs, out, partitions=PARTITIONS), out, monkeypatch)
    corrupt_bundle(out)
    capsys.readouterr()
    assert main(all_users(runs, out, partitions=PARTITIONS)) == 0, capsys.readouterr().err
    assert f"{DONE} kept from an earlier run" in capsys.readouterr().out
    same_rows(out, reference)


def test_overwrite_always_assembles_the_bundle_again(
    runs: Runs, reference: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    """Bullet 4: --overwrite starts over, the bundle included, even with the same settings."""
    out = tmp_path / "recs"
    killed(all_users(runs, out, partitions=PARTITIONS), out, monkeypatch)
    corrupt_bundle(out)
    capsys.readouterr()
    assert main(all_users(runs, out, partitions=PARTITIONS, overwrite="true")) == 0, capsys.readouterr().err
    assert "kept" not in capsys.readouterr().out
    same_rows(out, reference)


def test_a_refused_run_leaves_nothing_and_the_corrected_run_passes(
    runs: Runs, reference: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bullet 5: an unknown --retrieval, a ranking model as --retrieval, a bad --index: one line each,
    nothing written (a folder the run created is gone, an existing one left empty)."""
    out, existing = tmp_path / "recs", tmp_path / "existing"
    existing.mkdir()

    def swapped(argv: list[str], flag: str, value: str) -> list[str]:
        return [*argv[: argv.index(flag) + 1], value, *argv[argv.index(flag) + 2 :]]

    for target in (out, existing):
        argv = all_users(runs, target, partitions=PARTITIONS)
        for bad, message in [
            (swapped(argv, "--retrieval", "0" * 32), "--retrieval " + "0" * 32),
            (swapped(argv, "--retrieval", runs.ranking), "cannot retrieve"),
            ([*argv, "--index", str(tmp_path / "no-index")], "no such index directory"),
        ]:
            capsys.readouterr()
            assert main(bad) == 2
            assert message in error_line(capsys)
            assert (not target.exists()) if target == out else not list(target.iterdir())
    capsys.readouterr()
    assert main(all_users(runs, out, partitions=PARTITIONS)) == 0, capsys.readouterr().err
    same_rows(out, reference)


def enospc(*_: Any, **__: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_writing_the_bundle_is_one_line_and_leaves_nothing(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bullet 6: the weights (written through safetensors: its own error type) and the manifest."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*_: Any, **__: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    out = tmp_path / "recs"
    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", full)
        assert main(all_users(runs, out, partitions=PARTITIONS)) == 2
    line = error_line(capsys)
    assert str(out) in line and "No space left on device" in line, line
    assert not out.exists()

    write_text = Path.write_text

    def manifest_full(self: Path, *a: Any, **kw: Any) -> int:
        if self.name.startswith("._manifest.") or self.name == "_manifest.json":
            enospc()
        return write_text(self, *a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", manifest_full)
        assert main(all_users(runs, out, partitions=PARTITIONS)) == 2
    line = error_line(capsys)
    assert f"--out {out}: cannot write the output (No space left on device, ENOSPC)" in line, line
    assert not out.exists()


def test_a_full_disk_while_writing_a_partition_is_one_line(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bullet 6: the part files (the work started: DIR is kept, to resume), no temporary left."""
    out = tmp_path / "recs"
    write_table = pq.write_table

    def part_full(table: Any, where: Any, *a: Any, **kw: Any) -> None:
        if Path(str(where)).name.startswith(".part-"):
            enospc()
        write_table(table, where, *a, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(pq, "write_table", part_full)
        assert main(all_users(runs, out, partitions=PARTITIONS)) == 2
    line = error_line(capsys)
    assert "--backend local: partition" in line and "No space left on device" in line, line
    assert not list(out.glob("part-*")) and not list(out.glob(".part-*"))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs (root only: skipped elsewhere), unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_tmpfs_is_one_line_and_leaves_nothing(
    runs: Runs, small_disk: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bullet 6 on a real full filesystem: DIR is the tmpfs itself (so it existed: left empty)."""
    assert main(all_users(runs, small_disk, partitions=PARTITIONS)) == 2
    line = error_line(capsys)
    assert str(small_disk) in line and "No space left on device" in line, line
    assert not list(small_disk.iterdir())


def test_an_out_on_a_pseudo_filesystem_is_one_line(runs: Runs, capsys: pytest.CaptureFixture[str]) -> None:
    """Bullet 7: /proc takes no folder: one line naming --out, no traceback."""
    assert main(all_users(runs, Path("/proc/self/x"), partitions=PARTITIONS)) == 2
    line = error_line(capsys)
    assert "--out /proc/self/x: cannot create the folder" in line, line


def test_the_settings_record_of_a_part_file(finished: Path) -> None:
    """Each part file carries the settings it was written with (its Parquet key-value metadata)."""
    import json

    from app.batch import STAMP_KEY

    meta = pq.read_metadata(finished / "part-00000.parquet")
    stamp = json.loads(meta.metadata[STAMP_KEY])
    assert stamp["settings"]["k"] == K and stamp["settings"]["candidates"] == CANDIDATES
    assert stamp["partitions"] == PARTITIONS and stamp["partition"] == 0 and stamp["rows"] == meta.num_rows


def test_a_bundle_broken_after_its_check_fails_in_the_workers_as_one_line(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bundle's weights broken after the driver verified it (a disk going bad meanwhile): the
    workers (2 processes) refuse it by its checksums, and the error comes back once, as one line."""
    import app.batch

    out = tmp_path / "recs"
    engine = app.batch.map_partitions

    def broken(*a: Any) -> Iterator[Any]:
        (out / "_bundle" / "retrieval" / "weights.safetensors").write_bytes(b"not a state dict")
        yield from engine(*a)

    with monkeypatch.context() as patch:
        patch.setattr(app.batch, "map_partitions", broken)
        assert main([*all_users(runs, out, partitions=2), "--num-workers", "2"]) == 2
    line = error_line(capsys)
    assert "--backend local: partition" in line and "weights.safetensors" in line, line
    assert not list(out.glob("part-*")) and not list(out.glob(".part-*"))


def test_worker_processes_that_cannot_start_are_one_line(
    runs: Runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every OS error is one line: the local engine's pool of spawned processes (a process limit)."""
    import multiprocessing.context

    def no_processes(*_: Any, **__: Any) -> Any:
        raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

    with monkeypatch.context() as patch:
        patch.setattr(multiprocessing.context.SpawnContext, "Pool", no_processes, raising=False)
        assert main([*all_users(runs, tmp_path / "recs", partitions=2), "--num-workers", "2"]) == 2
    line = error_line(capsys)
    assert "--num-workers 2: cannot start 2 processes (Resource temporarily unavailable, EAGAIN)" in line, line
