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
