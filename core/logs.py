"""One logging setup per process (the CLI and every training worker).

Every line is printed once, by one handler on the root logger (libraries that install their own, such
as Lightning or fbgemm_gpu at import, are folded into it); on multi-process runs each line carries its
rank. The project's own loggers (``app``, ``cluster``, ``core``, ``datamodules``, ``modules``) speak at
INFO; the libraries' info lines and Python warnings (planner notes, deprecations, Lightning's tips)
are shown only with ``--verbose``, where they appear once per place in the code.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from core.errors import printable

PROJECT_LOGGERS = ("app", "cluster", "core", "datamodules", "modules", "bench")
# Loggers that attach handlers of their own or turn propagation off: routed through the root handler.
LIBRARY_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning.fabric",
    "pytorch_lightning",
    "torchrec",
    "fbgemm_gpu",
    "mlflow",
)


class LineFormatter(logging.Formatter):
    """``[rank N] message`` for the project's lines, ``[rank N] LEVEL logger: message`` for the rest."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        message = printable(record.getMessage())  # ids from a user's data: no raw control characters
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        ours = record.name.split(".", 1)[0] in PROJECT_LOGGERS and record.levelno == logging.INFO
        head = "" if ours else f"{record.levelname} {record.name}: "
        return "\n".join(
            f"{self.prefix}{head}{line}" if i == 0 else f"{self.prefix}  {line}"
            for i, line in enumerate(message.splitlines() or [""])
        )


class CutByTheSignal(logging.Filter):
    """While a stop signal unwinds the command, an error about a connection that signal cut is its
    consequence, not news: a terminal's hang-up or Ctrl-C reaches Spark's JVM too (its process group),
    and py4j then logs each command it could not send with a traceback. Dropped then; shown otherwise."""

    def filter(self, record: logging.LogRecord) -> bool:
        from core.signals import stopping

        if record.levelno < logging.ERROR or not stopping():
            return True
        error = record.exc_info[1] if record.exc_info else None
        names = {cls.__name__ for cls in type(error).__mro__} if error is not None else set()
        return not (names & {"Py4JNetworkError", "ConnectionError"} or record.name.startswith("py4j"))


def setup_logging(verbose: bool = False, rank: int = 0, world_size: int = 1) -> None:
    """Configure this process's logging (idempotent: a second call replaces the first)."""
    # MLflow gives its loggers a handler of their own when imported (later than this, usually).
    os.environ["MLFLOW_CONFIGURE_LOGGING"] = "false"
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LineFormatter(prefix))
    handler.addFilter(CutByTheSignal())
    root.addHandler(handler)
    root.setLevel(logging.INFO if verbose else logging.ERROR)
    for name in PROJECT_LOGGERS:  # with --verbose also the project's debug lines (a failed worker's trace)
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        for h in list(lib.handlers):
            lib.removeHandler(h)
        lib.propagate = True
        lib.setLevel(logging.NOTSET)
    logging.captureWarnings(verbose)
    warnings.resetwarnings()
    warnings.simplefilter("default" if verbose else "ignore")
