"""A process pool with a hard wall-clock limit per task: a worker that overruns is killed and
replaced, and only its task is lost (reported as a timeout).

Why not `concurrent.futures.ProcessPoolExecutor` or `multiprocessing.Pool`: neither can kill one
stuck worker (a sympy computation inside C code ignores signals and `future.cancel()`), and a
killed worker breaks the whole executor. Here each worker has its own pipe; the parent sends a
task, waits on all pipes with a deadline, and on overrun sends SIGKILL and starts a replacement.

Two limits per task:
- soft (90% of the limit, inside the worker): a SIGALRM timer raises into pure-Python work, so
  most slow checks end without losing the worker;
- hard (the limit, from the parent): SIGKILL. This one cannot be ignored, so no task outlives
  its limit by more than the parent's reaction time (milliseconds).

Workers come from a forkserver that has the task module imported already (start-up once,
replacements in milliseconds, and no fork of a parent that runs threads). Up to `depth` small
tasks are queued per worker so it never waits for the parent; a task's clock starts when the
worker is free to start it (when the previous result arrives). A large task is only sent to an
idle worker, so a send can never block behind a stuck check.
"""

from __future__ import annotations

import importlib
import multiprocessing
import os
import pickle
import signal
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

SMALL_TASK_BYTES = 16 * 1024  # well under a socket buffer: queued sends never block
STARTUP_TIMEOUT_S = 120.0  # importing sympy on a loaded machine is slow, but not this slow


@dataclass(frozen=True)
class Outcome:
    status: str  # "ok" | "timeout" | "crashed" | "error"
    value: Any  # the function's result when status == "ok"; else None (or the error text)
    seconds: float  # wall-clock time the task ran (as seen by the parent)


class _SoftTimeout(BaseException):
    """Raised by the worker's alarm; a BaseException so math-verify's `except Exception` and its
    own `except TimeoutException` handlers do not swallow it."""


def _on_alarm(signum, frame):  # pragma: no cover - runs in the worker
    raise _SoftTimeout()


def _serve(conn, function: str, warm_up: str | None, soft_timeout_s: float, memory_limit_mb: int | None) -> None:
    """Worker main loop: receive a pickled argument tuple, send back (status, value)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_limit_mb:
        try:
            import resource

            limit = memory_limit_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ImportError, ValueError, OSError):
            pass  # not on this platform; the wall-clock limit still holds
    try:
        fn = _resolve(function)
        if warm_up:
            _resolve(warm_up)()
    except Exception as error:
        conn.send_bytes(pickle.dumps(("failed", f"{type(error).__name__}: {error}")))
        return
    conn.send_bytes(pickle.dumps(("ready", None)))
    soft = hasattr(signal, "setitimer")  # not on Windows: there only the hard limit holds
    if soft:
        signal.signal(signal.SIGALRM, _on_alarm)
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            if soft:
                signal.setitimer(signal.ITIMER_REAL, soft_timeout_s)
            try:
                reply = ("ok", fn(*pickle.loads(payload)))
            finally:
                if soft:
                    signal.setitimer(signal.ITIMER_REAL, 0)
        except _SoftTimeout:
            reply = ("timeout", None)
        except Exception as error:  # a bug or bad input in one task must not end the worker
            reply = ("error", f"{type(error).__name__}: {str(error)[:200]}")
        try:
            conn.send_bytes(pickle.dumps(reply))
        except (EOFError, OSError):
            return


def _resolve(dotted: str) -> Callable:
    module, _, name = dotted.partition(":")
    return getattr(importlib.import_module(module), name)


class _Worker:
    def __init__(self, context, function: str, warm_up: str | None, soft_timeout_s: float, memory_limit_mb: int | None):
        parent, child = context.Pipe(duplex=True)
        self.process = context.Process(
            target=_serve, args=(child, function, warm_up, soft_timeout_s, memory_limit_mb), daemon=True
        )
        self.process.start()
        child.close()
        self.conn = parent
        self.ready = False  # set when the worker reports it has imported and warmed up
        self.spawned = time.monotonic()
        self.inflight: deque[int] = deque()  # task indices sent, in order; the head is running
        self.head_started = 0.0

    def stop(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class HardLimitPool:
    """Run `function(*task)` for many tasks on `workers` processes, each task under `timeout_s`.

    `function` and `warm_up` are "module:name" strings (importable in a fresh process)."""

    def __init__(
        self,
        function: str,
        workers: int,
        timeout_s: float,
        warm_up: str | None = None,
        preload: Sequence[str] = (),
        memory_limit_mb: int | None = 4096,
        depth: int = 2,
    ):
        assert workers >= 1, f"workers must be >= 1, got {workers}"
        assert timeout_s > 0, f"timeout_s must be > 0, got {timeout_s}"
        self.function, self.warm_up = function, warm_up
        self.timeout_s = timeout_s
        self.soft_timeout_s = max(0.01, 0.9 * timeout_s)
        self.memory_limit_mb = memory_limit_mb
        self.depth = max(1, depth)
        methods = multiprocessing.get_all_start_methods()
        self.context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if preload and self.context.get_start_method() == "forkserver":
            self.context.set_forkserver_preload(list(preload))
        self.restarts = 0  # workers killed and replaced (overrun or crash)
        self.workers = [self._start() for _ in range(workers)]

    def _start(self) -> _Worker:
        return _Worker(self.context, self.function, self.warm_up, self.soft_timeout_s, self.memory_limit_mb)

    def run(self, tasks: Sequence[tuple]) -> list[Outcome]:
        """One Outcome per task, in order. Returns only when every task has one."""
        outcomes: list[Outcome | None] = [None] * len(tasks)
        payloads = [pickle.dumps(tuple(task)) for task in tasks]
        queue: deque[int] = deque(range(len(tasks)))
        while queue or any(w.inflight for w in self.workers):
            self._dispatch(queue, payloads, outcomes)
            # A task's clock runs from when its worker is free to start it; a worker still
            # starting up has its own (long) clock and gets no task until it says it is ready.
            watched = [w for w in self.workers if w.inflight or not w.ready]
            deadline = min(
                w.head_started + self.timeout_s if w.ready else w.spawned + STARTUP_TIMEOUT_S for w in watched
            )
            ready = wait([w.conn for w in watched], timeout=max(0.0, deadline - time.monotonic()))
            now = time.monotonic()
            for index, worker in enumerate(list(self.workers)):
                if worker not in watched:
                    continue
                if not worker.ready:
                    self._await_start(worker, worker.conn in ready, now)
                elif worker.conn in ready:
                    self._collect(index, worker, outcomes, queue, now)
                elif now >= worker.head_started + self.timeout_s:
                    self._replace(index, worker, "timeout", outcomes, queue, now)
        return outcomes  # type: ignore[return-value]

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.workers = []

    # ----------------------------------------------------------------------------------------

    def _dispatch(self, queue: deque[int], payloads: list[bytes], outcomes: list) -> None:
        for index, worker in enumerate(list(self.workers)):
            while worker.ready and queue and len(worker.inflight) < self.depth:
                task = queue[0]
                if worker.inflight and len(payloads[task]) > SMALL_TASK_BYTES:
                    break  # a big payload waits for an idle worker (a reading one)
                try:
                    worker.conn.send_bytes(payloads[task])
                except (BrokenPipeError, ConnectionResetError, OSError):
                    # The worker died: the task it was running (if any) crashed it.
                    self._replace(index, worker, "crashed", outcomes, queue, time.monotonic())
                    break
                queue.popleft()
                if not worker.inflight:
                    worker.head_started = time.monotonic()
                worker.inflight.append(task)

    def _await_start(self, worker: _Worker, readable: bool, now: float) -> None:
        if readable:
            try:
                status, detail = pickle.loads(worker.conn.recv_bytes())
            except (EOFError, OSError):
                # It died before reporting (no Python error of ours): most often a script that
                # starts a Verifier at import time, which the worker runs again while starting.
                worker.process.join(timeout=2)
                raise RuntimeError(
                    f"a verifier worker failed to start (exit code {worker.process.exitcode}); if the script that "
                    "uses Verifier has no `if __name__ == \"__main__\":` guard, add one and call your code under it: "
                    "workers start with multiprocessing's forkserver, which runs the main script again in each "
                    "worker (its traceback is printed above)"
                ) from None
            if status == "ready":
                worker.ready = True
                return
            raise RuntimeError(f"a verifier worker failed to start ({detail})")
        if now >= worker.spawned + STARTUP_TIMEOUT_S:
            raise RuntimeError(f"a verifier worker did not start within {STARTUP_TIMEOUT_S:.0f} s")

    def _collect(self, index: int, worker: _Worker, outcomes: list, queue: deque[int], now: float) -> None:
        try:
            status, value = pickle.loads(worker.conn.recv_bytes())
        except (EOFError, OSError):
            self._replace(index, worker, "crashed", outcomes, queue, now)
            return
        task = worker.inflight.popleft()
        outcomes[task] = Outcome(status, value, now - worker.head_started)
        worker.head_started = now  # the next queued task starts now

    def _replace(self, index: int, worker: _Worker, status: str | None, outcomes: list | None, queue: deque[int], now: float) -> None:
        """Kill `worker`; its running task gets `status`, the tasks queued behind it go back."""
        worker.stop()
        self.restarts += 1
        if worker.inflight and status is not None and outcomes is not None:
            task = worker.inflight.popleft()
            outcomes[task] = Outcome(status, None, now - worker.head_started)
        queue.extendleft(reversed(worker.inflight))
        worker.inflight.clear()
        self.workers[index] = self._start()


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
