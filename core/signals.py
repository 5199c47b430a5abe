"""One signal policy for every command: SIGINT, SIGTERM and SIGHUP stop the work the same way.

The CLI runs each command under ``stop_signals()``: a stop signal raises ``Interrupted`` in the main
thread, wherever it is, so that every ``finally`` on the way out runs (child processes and workers
stopped, temporary outputs removed, the MLflow run ended KILLED), and ``recsys`` exits with status
128 + the signal's number and one line, ``recsys: interrupted (SIGTERM)``. Further signals while that
unwinding runs are ignored (the cleanup is bounded; SIGKILL remains for the impatient).

An exception raised by a signal handler can be lost: when the signal lands while the interpreter runs
a weakref callback, a ``__del__`` or a garbage collection, Python prints "Exception ignored in ..." and
carries on. The policy watches for that (``sys.unraisablehook``) and delivers the signal again, so a
stopped process does not train on.

``Interrupted`` is a ``KeyboardInterrupt``, the one exception libraries expect from a signal handler:
Ray's ``get`` returns at once for it (any other exception raised there leaves it waiting for the task,
then fails with a SystemError), asyncio stops its loop for it. Some turn it into something else on the
way out (Ray raises a fresh ``KeyboardInterrupt``, Lightning calls ``sys.exit(1)``): ``interruption()``
recognises whatever comes out while a stop signal is being handled. Libraries that put their own
handler in place (``ray.init`` turns SIGTERM into ``sys.exit``, Lightning takes SIGTERM for the length
of a fit to end it as a success) are overruled with ``reinstall()``.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
REDELIVER_S = 0.05
"""Delay before a lost stop signal is delivered again (long enough to leave the callback that lost it)."""


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by ``signum``: unwind, clean up, exit 128 + signum."""

    def __init__(self, signum: int, note: str = "") -> None:
        self.signum = signum
        self.note = note
        super().__init__(f"interrupted ({signal.Signals(signum).name}){'; ' + note if note else ''}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_state: dict[str, Any] = {"active": False, "raised": None}


def _stop(signum: int, frame: FrameType | None) -> None:
    if _state["raised"] is not None:
        return  # the first signal's unwinding is running: let it finish
    _state["raised"] = signum
    raise Interrupted(signum)


def _unraisable(hook: Any) -> Any:
    """A ``sys.unraisablehook`` that delivers a lost stop signal again (silently); others go to ``hook``."""

    def handle(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, Interrupted) and _state["active"]:
            signum = _state["raised"]
            _state["raised"] = None
            # not from here: the handler would run at once, inside this hook, and be lost again
            timer = threading.Timer(REDELIVER_S, _thread.interrupt_main, args=(signum,))
            timer.daemon = True
            timer.start()
            return
        hook(unraisable)

    return handle


def stopping() -> bool:
    """Whether a stop signal is being handled now (the command is unwinding)."""
    return _state["raised"] is not None


def interruption(error: BaseException) -> Interrupted | None:
    """The stop signal behind ``error``: itself when it is ``Interrupted``, else the one being handled
    (a library may turn the exception into one of its own on the way out); None when no stop signal is
    being handled (call it inside ``stop_signals()``)."""
    if isinstance(error, Interrupted):
        return error
    if _state["raised"] is not None:
        return Interrupted(_state["raised"])
    if isinstance(error, KeyboardInterrupt):  # SIGINT while a library's own handler was in place
        return Interrupted(signal.SIGINT)
    return None


def reinstall() -> None:
    """Put the policy back after a library replaced a handler (no-op outside ``stop_signals()`` or off
    the main thread, where Python cannot set handlers). Always set again, even when Python reports
    ours: native code may have replaced the process's handler behind Python's back (Ray's core worker
    installs one for SIGTERM that dumps a stack trace and aborts)."""
    if _state["active"] and threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, _stop)


def _late(signum: int, frame: FrameType | None) -> None:
    """A stop signal after the command's work, while the interpreter shuts down: the same exit status and
    line as during it (the default action would end the process without a word, status -signum)."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os.write(2, f"recsys: interrupted ({signal.Signals(signum).name})\n".encode())
    os._exit(128 + signum)


@contextlib.contextmanager
def stop_signals(whole_process: bool = False) -> Iterator[None]:
    """Run the body under the policy; the previous handlers are restored afterwards (a command run in
    a test process leaves pytest's own as they were); ``whole_process``: the body is the process's work
    (the ``recsys`` script), and a stop signal after it, while the interpreter shuts down, still exits
    128 + signum with the line. multiprocessing's resource tracker is started first, deaf to the stop
    signals (``start_resource_tracker``)."""
    if threading.current_thread() is not threading.main_thread() or _state["active"]:
        yield
        return
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    saved_hook = sys.unraisablehook
    _state.update(active=True, raised=None)
    sys.unraisablehook = _unraisable(saved_hook)
    try:
        reinstall()
        start_resource_tracker()
        yield
    finally:
        _state.update(active=False, raised=None)
        sys.unraisablehook = saved_hook
        for signum, handler in saved.items():
            if whole_process:  # the ``recsys`` process itself: a signal until it exits is still one line
                signal.signal(signum, _late)
            else:
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def detach_worker() -> None:
    """Call first in a worker process the launcher spawned: leave the terminal's process group, so that
    a hang-up or Ctrl-C of the terminal (sent to the whole group) reaches the launcher alone, which then
    stops its workers in order (SIGTERM, a grace period, SIGKILL) instead of every process unwinding at
    once over shared resources; and die with the launcher (Linux ``PR_SET_PDEATHSIG``), so that a launcher
    killed without warning leaves no worker behind."""
    os.setsid()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (the process that unlinks shared memory and semaphores
    its users leave) with the stop signals blocked: it ignores SIGINT and SIGTERM by itself but not a
    hang-up, and once gone its users' unregistering fails with a traceback each."""
    from multiprocessing import resource_tracker

    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        resource_tracker.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
