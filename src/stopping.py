"""Ctrl-C and SIGTERM: a stop request, and where it may raise.

A first signal sets STOP and raises KeyboardInterrupt at once only while a trial computes
(`computing()`); while Optuna or MLflow write a trial's state (`writing()`), which must not be cut
in half, it only sets STOP, and `raise_if_stopped()` right after the write raises it. A second
signal raises wherever it lands. Python drops an exception raised inside a garbage-collector
callback (SQLAlchemy has such callbacks): STOP keeps that request too, and the hook installed by
`handling_signals` stays quiet about it.
"""
from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

STOP = threading.Event()
_computing = threading.local()


def stop_now() -> bool:
    """Whether a Ctrl-C may raise where it lands: while a trial computes (or before the study
    runs), yes; while Optuna or MLflow write a trial's state, no: STOP is checked right after."""
    return getattr(_computing, "on", True)


@contextmanager
def _section(on: bool):
    before, _computing.on = stop_now(), on
    try:
        yield
    finally:
        _computing.on = before


def computing():
    return _section(True)


def writing():
    return _section(False)


def raise_if_stopped() -> None:
    if STOP.is_set():
        raise KeyboardInterrupt("stop requested")


def on_signal(signum, frame) -> None:
    """The SIGINT/SIGTERM handler (see the module docstring)."""
    again = STOP.is_set()
    STOP.set()
    if again or stop_now():
        raise KeyboardInterrupt(f"signal {signum}")


def _quiet_stop(hook):
    """An unraisable-exception hook that stays quiet about a dropped stop (STOP has it)."""
    def quiet(info):
        if not (isinstance(info.exc_value, KeyboardInterrupt) and STOP.is_set()):
            hook(info)
    return quiet


@contextmanager
def handling_signals():
    """Ctrl-C and SIGTERM (docker stop, CI timeouts) handled as above for the block; the previous
    handlers come back after it, and a stop request belongs to this block alone."""
    STOP.clear()
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    unraisable, sys.unraisablehook = sys.unraisablehook, _quiet_stop(sys.unraisablehook)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sys.unraisablehook = unraisable
        STOP.clear()
