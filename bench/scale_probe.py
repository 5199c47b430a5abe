"""``recsys train`` in this process with probes, for ``bench/scale.py``:

    python -m bench.scale_probe RESULT.json train --config ... --data ... --max-steps 300

It runs the real command (``app.cli.main``) after patching two things, and writes RESULT.json:

  steps         a Lightning callback appended to the Trainer's (``app.train.build_trainer`` wrapped): the
                wall time of the training steps after the first ``WARMUP`` (start-up, first-touch of the
                tables and the data cache are excluded), hence samples/s over steady steps, and the peak
                RSS while training (the kernel's high-water mark, reset when training starts)
  evaluation    ``RetrievalTask.retrieval_metrics`` wrapped: its wall time, the process's RSS when it
                starts (the model, data module and corpus loaded: "the model") and its peak RSS during it
                (the high-water mark reset at its start, ``/proc/self/clear_refs``), so the memory the
                evaluation itself adds; the users it averaged over

Only for a one-process run (``--num-workers 1``, the default): patches do not reach spawned workers.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

WARMUP = int(os.environ.get("SCALE_PROBE_WARMUP", "20"))
"""Training steps left out of the rate (``SCALE_PROBE_WARMUP``, ``bench.scale --warmup``): at 100M rows
the first few hundred steps also decompress every shard of the split (the shuffle spans all of them),
a one-off cost per epoch that a steady rate leaves out."""


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident set (``VmRSS``) or its high-water mark since the last reset (``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    """Set the high-water mark (VmHWM) back to the current RSS (Linux: ``echo 5 > clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def main(argv: list[str]) -> int:
    import lightning as L

    import app.train
    from app.cli import main as cli_main
    from modules.tasks import RetrievalTask

    result_path = Path(argv[0])
    out: dict[str, Any] = {"evaluations": []}

    class StepTimer(L.Callback):
        def __init__(self) -> None:
            self.steps = 0
            self.samples = 0
            self.start = self.end = self.cpu_start = self.cpu_end = 0.0

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            reset_peak()
            out["rss_train_start"] = rss_bytes()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.steps == WARMUP:
                self.start = time.perf_counter()
                self.cpu_start = time.process_time()

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.steps += 1
            if self.steps > WARMUP:
                labels = getattr(batch, "labels", None)
                self.samples += len(labels) if labels is not None else trainer.train_dataloader.batch_size
                self.end = time.perf_counter()
                self.cpu_end = time.process_time()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            out["rss_train_peak"] = rss_bytes("VmHWM")
            out["steps"] = self.steps
            out["timed_steps"] = max(0, self.steps - WARMUP)
            out["warmup_steps"] = WARMUP
            out["timed_samples"] = self.samples
            out["timed_seconds"] = self.end - self.start
            out["timed_cpu_seconds"] = self.cpu_end - self.cpu_start
            out["samples_per_s"] = self.samples / (self.end - self.start) if self.end > self.start else None
            cpu = self.cpu_end - self.cpu_start
            out["samples_per_cpu_s"] = self.samples / cpu if cpu > 0 else None  # every thread's CPU time

    build_trainer = app.train.build_trainer

    def with_timer(cfg: Any, runtime: Any, tracker: Any) -> Any:
        runtime.callbacks.append(StepTimer())
        out["batch_size"] = cfg.data.batch_size
        return build_trainer(cfg, runtime, tracker)

    metrics_of = RetrievalTask.retrieval_metrics

    def probed(self: Any, split: str) -> dict[str, float]:
        before = rss_bytes()
        reset_peak()
        started = time.perf_counter()
        metrics = metrics_of(self, split)
        seconds = time.perf_counter() - started
        peak = rss_bytes("VmHWM")
        out["evaluations"].append(
            {
                "split": split,
                "seconds": seconds,
                "rss_before": before,
                "rss_peak": peak,
                "above_model": peak - before,
                "users": metrics.get(f"{split}/eval_users"),
                "users_total": metrics.get(f"{split}/eval_users_total"),
                "items": len(self.corpus.items) if self.corpus is not None else None,
                "block_bytes": self.eval_block_bytes,
                f"recall_at_{self.k}": metrics.get(f"{split}/recall_at_{self.k}"),
            }
        )
        return metrics

    run_training = app.train.run_training

    def keep_metrics(cfg: Any) -> dict[str, Any]:
        metrics = run_training(cfg)
        out["run_id"] = metrics.get("run_id")
        return metrics

    app.train.build_trainer = with_timer  # type: ignore[assignment]
    RetrievalTask.retrieval_metrics = probed  # type: ignore[method-assign]
    app.train.run_training = keep_metrics  # type: ignore[assignment]
    try:
        code = cli_main(argv[1:])
    finally:
        out["rss_process_peak"] = rss_bytes("VmHWM")  # since the last reset only
        result_path.write_text(json.dumps(out, indent=2))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
