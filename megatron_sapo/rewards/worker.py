"""Reward worker process: runs reward calls one at a time for `RewardRunner` (see runner.py).

Started by the runner as `python -m megatron_sapo.rewards.worker READ_FD WRITE_FD`; not a user tool.
Protocol over two pipes (multiprocessing Connections):
    in:  ("init", sys_path, pickled_fn, timeout_s), then (index, response, record) tasks, then None
    out: ("ready",) | ("init_error", message), then per task (index, "ok", reward) |
         (index, "error", message) | (index, "timeout", message)
Each call runs in this process's main thread under a `setitimer` alarm of timeout_s (the soft
timeout: the worker survives it); the runner kills the process at timeout_s + grace (the hard one,
for code that never returns to the interpreter).
"""

from __future__ import annotations

import math
import pickle
import signal
import sys
import traceback
from multiprocessing.connection import Connection


class _SoftTimeout(BaseException):
    """Raised by the alarm; a BaseException so that the reward's `except Exception` cannot eat it."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _SoftTimeout


def _call(fn, timeout_s: float, response: str, record: object) -> tuple[str, object]:
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            value = float(fn(response, record))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _SoftTimeout:
        return "timeout", f"took longer than {timeout_s:g} s"
    except Exception as e:
        return "error", "".join(traceback.format_exception_only(e)).strip()
    if not math.isfinite(value):
        return "error", f"non-finite reward {value}"
    return "ok", value


def main(read_fd: int, write_fd: int) -> None:
    # Ctrl-C reaches the whole process group; the runner owns shutdown (we exit on EOF).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGALRM, _on_alarm)
    inbox, outbox = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
    try:
        _, sys_path, fn_bytes, timeout_s = inbox.recv()
        sys.path[:] = sys_path
        fn = pickle.loads(fn_bytes)
    except Exception as e:
        outbox.send(("init_error", "".join(traceback.format_exception_only(e)).strip()))
        return
    outbox.send(("ready",))
    while True:
        try:
            task = inbox.recv()
        except EOFError:
            return
        if task is None:
            return
        index, response, record = task
        kind, value = _call(fn, timeout_s, response, record)
        outbox.send((index, kind, value))


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
