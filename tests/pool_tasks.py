"""Tasks for the hard-limit pool tests, in their own light module: pool workers import it."""

from __future__ import annotations

import os
import signal
import time


def stubborn_sleep(seconds: float) -> float:
    """Stands in for C code that never returns to the interpreter: the soft SIGALRM is blocked."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    try:
        time.sleep(seconds)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    return seconds


def exit_now(code: int) -> None:
    os._exit(code)  # a worker that dies mid-check (a segfault looks the same to the pool)


def slow_once(reference: str, marker: str, *options) -> tuple[bool, str]:
    """Stands in for a check that overran once under load: the first call per marker file (the
    answer is its path) hangs, blocking the soft alarm like C code; every later one answers."""
    from pathlib import Path

    path = Path(marker)
    if not path.exists():
        path.touch()
        stubborn_sleep(30.0)
    return True, "correct"


def always_slow(reference: str, answer: str, *options) -> tuple[bool, str]:
    stubborn_sleep(30.0)
    return True, "correct"
