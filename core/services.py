"""A local HTTP service run for the length of a ``with`` block (the MLflow tracking server, ``mlflow
models serve``): started, waited for until it answers, stopped. Used by the tests and the benches."""

from __future__ import annotations

import subprocess
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def running_service(
    cmd: list[str], probe: str, log_path: Path, env: Mapping[str, str] | None = None, wait_s: float = 120.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` with its output in ``log_path`` until ``probe`` (a URL) answers, yield it, stop it.

    A service that exits before answering, or does not answer within ``wait_s``, raises RuntimeError
    with the tail of its log.
    """
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=None if env is None else dict(env))
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    with urllib.request.urlopen(probe, timeout=1):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        state = "exited" if proc.poll() is not None else f"did not answer {probe} in {wait_s:.0f} s"
                        raise RuntimeError(f"{cmd[:4]} {state}:\n{log_path.read_text()[-3000:]}") from None
                    time.sleep(0.5)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
