"""Batch reward evaluation with a per-sample timeout, in a small persistent pool of worker processes.

    with RewardRunner(get_reward("math_verify"), timeout_s=5.0, workers=2) as runner:
        rewards, stats = runner.score(responses, records)   # list[float], {"reward/errors": ..., ...}

A reward that raises, returns a non-number, kills its process or runs past `timeout_s` scores 0.0;
it is counted in the stats ("reward/errors", "reward/timeouts") and summarised in a warning (at most
one every 30 s); `score` never raises for it. Why processes: a hung sympy call cannot be stopped from
another thread, and math-verify's own timeouts use `signal.alarm`, which works only in a main thread.

Each worker is a fresh interpreter (`python -m megatron_sapo.rewards.worker`), not a fork of the
trainer: no torch threads or process groups are inherited and the trainer's `__main__` is not
re-imported. It runs a call under a `setitimer` alarm (the soft timeout, the worker survives it); a
call that does not return `timeout_s + 1` s after it started (code that never gets back to the
interpreter) has its worker killed and replaced. The reward function must therefore pickle by name: a
module-level function, or a `functools.partial` of one.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path

from megatron_sapo.data.datasets import PromptRecord

logger = logging.getLogger(__name__)

RewardFn = Callable[[str, PromptRecord], float]
HARD_GRACE_S = 1.0
"""Seconds past timeout_s before a worker whose call has not returned is killed."""
WARN_INTERVAL_S = 30.0
"""At most one reward-failure warning per this many seconds."""
START_TIMEOUT_S = 120.0
"""Longest wait for a worker to import the reward function."""
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class _Worker:
    proc: subprocess.Popen
    inbox: Connection
    outbox: Connection
    ready: bool = False
    task: int | None = None
    deadline: float = 0.0


class RewardRunner:
    """Scores (response, record) pairs with `fn` in `workers` processes, `timeout_s` per sample."""

    def __init__(self, fn: RewardFn, *, timeout_s: float, workers: int = 2) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        try:
            self._fn_bytes = pickle.dumps(fn)
        except Exception as e:
            raise TypeError(
                f"reward function {fn!r} cannot be sent to a worker process ({e}); use a module-level "
                "function or a functools.partial of one"
            ) from e
        self.timeout_s = float(timeout_s)
        self.total_errors = 0
        self.total_timeouts = 0
        self._last_warn = -float("inf")
        self._suppressed = 0
        self._workers = [self._spawn() for _ in range(workers)]
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        self._wait_ready()

    def score(
        self, responses: Sequence[str], records: Sequence[PromptRecord]
    ) -> tuple[list[float], dict[str, float]]:
        """One reward per response, in order, and stats: reward/errors, reward/timeouts, reward/time_s."""
        if len(responses) != len(records):
            raise ValueError(f"{len(responses)} responses but {len(records)} records")
        start = time.monotonic()
        rewards = [0.0] * len(responses)
        counts = {"error": 0, "timeout": 0}
        first: list[str] = []

        def fail(kind: str, index: int, message: str) -> None:
            counts[kind] += 1
            if not first:
                first.append(f"{records[index].where()}: {message}")

        todo = deque(range(len(responses)))
        while todo or any(w.task is not None for w in self._workers):
            for w in self._workers:
                if w.ready and w.task is None and todo:
                    index = todo[0]
                    try:
                        w.inbox.send((index, responses[index], records[index]))
                    except OSError:  # it died while idle: the task stays queued for the replacement
                        logger.warning("an idle reward worker died; starting a new one")
                        self._replace(w)
                        continue
                    todo.popleft()
                    w.task, w.deadline = index, time.monotonic() + self.timeout_s + HARD_GRACE_S
            deadlines = [w.deadline for w in self._workers if w.task is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else START_TIMEOUT_S
            ready = wait([w.outbox for w in self._workers], timeout=timeout)
            if not ready and not deadlines:
                raise RuntimeError(f"no reward worker became ready within {START_TIMEOUT_S:g} s")
            for conn in ready:
                w, msg = self._receive(conn)
                msg = msg or ("died", f"worker process died (exit code {w.proc.wait()})")
                if msg[0] in ("ready", "init_error", "died") and w.task is None:
                    self._on_idle_message(w, msg)
                elif msg[0] == "died":
                    fail("error", w.task, msg[1])
                    self._replace(w)
                else:
                    index, kind, value = msg
                    w.task = None
                    if kind == "ok":
                        rewards[index] = value
                    else:
                        fail(kind, index, value)
            now = time.monotonic()
            for w in self._workers:
                if w.task is not None and now > w.deadline:
                    fail(
                        "timeout",
                        w.task,
                        f"did not return in {self.timeout_s + HARD_GRACE_S:g} s; worker killed",
                    )
                    self._replace(w)
        self._report(counts, first, len(responses))
        stats = {
            "reward/errors": counts["error"],
            "reward/timeouts": counts["timeout"],
            "reward/time_s": time.monotonic() - start,
        }
        return rewards, stats

    def close(self) -> None:
        """Stop the workers (also done at garbage collection and interpreter exit)."""
        self._finalizer()

    def __enter__(self) -> RewardRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _spawn(self) -> _Worker:
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_sapo.rewards.worker", str(to_child_r), str(from_child_w)],
            pass_fds=(to_child_r, from_child_w),
            stdin=subprocess.DEVNULL,
            env=env,
        )
        os.close(to_child_r)
        os.close(from_child_w)
        worker = _Worker(
            proc, Connection(to_child_w, readable=False), Connection(from_child_r, writable=False)
        )
        # sys.path travels at run time so that modules the trainer made importable are importable there.
        worker.inbox.send(("init", list(sys.path), self._fn_bytes, self.timeout_s))
        return worker

    def _receive(self, conn: Connection) -> tuple[_Worker, tuple | None]:
        """The worker whose pipe `conn` is ready, and its message (None: its process is gone)."""
        w = next(w for w in self._workers if w.outbox is conn)
        try:
            return w, conn.recv()
        except (EOFError, OSError):
            return w, None

    def _on_idle_message(self, w: _Worker, msg: tuple) -> None:
        """A worker without a task said it is ready, could not start, or died."""
        if msg[0] == "ready":
            w.ready = True
        elif msg[0] == "died" and w.ready:
            logger.warning("an idle reward worker died (%s); starting a new one", msg[1])
            self._replace(w)
        else:  # a replacement failed to start: the environment is broken, not a reward
            raise RuntimeError(f"a reward worker failed to start: {msg[1]}")

    def _replace(self, w: _Worker) -> None:
        _stop(w, grace_s=0.0)
        fresh = self._spawn()
        w.proc, w.inbox, w.outbox, w.ready, w.task = fresh.proc, fresh.inbox, fresh.outbox, False, None

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(w.ready for w in self._workers):
            pending = [w.outbox for w in self._workers if not w.ready]
            ready = wait(pending, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close()
                raise RuntimeError(f"reward workers did not start within {START_TIMEOUT_S:g} s")
            for conn in ready:
                w, msg = self._receive(conn)
                msg = msg or ("init_error", f"worker exited with code {w.proc.wait()} (see its stderr)")
                if msg[0] == "init_error":
                    self.close()
                    raise RuntimeError(f"reward worker could not load the reward function: {msg[1]}")
                w.ready = True

    def _report(self, counts: dict[str, int], first: list[str], n: int) -> None:
        self.total_errors += counts["error"]
        self.total_timeouts += counts["timeout"]
        if not first:
            return
        now = time.monotonic()
        if now - self._last_warn < WARN_INTERVAL_S:
            self._suppressed += 1
            return
        suppressed = (
            f"; {self._suppressed} batch warnings suppressed since the last" if self._suppressed else ""
        )
        logger.warning(
            "rewards scored 0 for %d errors and %d timeouts of %d samples (run total %d / %d); first: %s%s",
            counts["error"],
            counts["timeout"],
            n,
            self.total_errors,
            self.total_timeouts,
            first[0],
            suppressed,
        )
        self._last_warn, self._suppressed = now, 0


def _stop(w: _Worker, *, grace_s: float) -> None:
    if grace_s > 0 and w.proc.poll() is None:
        try:
            w.inbox.send(None)
            w.proc.wait(timeout=grace_s)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if w.proc.poll() is None:
        w.proc.kill()
        w.proc.wait()
    w.inbox.close()
    w.outbox.close()


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        _stop(w, grace_s=1.0)
