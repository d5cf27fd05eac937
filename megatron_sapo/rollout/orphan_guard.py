"""Run a command and take its whole process group down when the process that started it dies.

    python orphan_guard.py PARENT_PID -- python -m sglang.launch_server ...

`SGLangServer` starts each server through this script (run by path: it imports nothing of the package).
The server runs in a session of its own (so `stop()` can signal its scheduler and detokenizer as one
group), which also means nothing ends it when the trainer that launched it is SIGKILLed (an OOM kill, a
`kill -9`): the server would keep its port and, on GPUs, its memory, and the rerun that resumes the job
would find both taken. This guard is the group's leader: it waits for the command and exits with its
code; once a second it checks that PARENT_PID is still its parent, and when it is not, it sends SIGTERM
to the group, then SIGKILL after GRACE_S. SIGTERM / SIGINT sent to the group reach the command directly:
the guard ignores them and keeps waiting, so `stop()` still waits for the server itself to exit.
The command's output passes through the guard, which replaces by "***" every string it read from its
stdin (newline-separated, up to EOF: the server's keys, which SGLang prints with its arguments); the
command's stdin is /dev/null, so it never sees them that way.
Tests: tests/e2e/test_sglang_engine.py, tests/unit/test_engine_key.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import BinaryIO

POLL_S = 1.0
GRACE_S = 20.0
DRAIN_S = 5.0


def _orphaned(parent: int) -> bool:
    return os.getppid() != parent


def _keep_waiting(signum: int, frame: object) -> None:
    """The group's SIGTERM / SIGINT reach the command itself; the guard waits for it to exit."""


def _copy_masked(source: BinaryIO, secrets: list[bytes]) -> None:
    """Copy `source` to stdout line by line (a secret never spans lines) with every secret masked."""
    out = sys.stdout.buffer
    for line in iter(source.readline, b""):
        for secret in secrets:
            line = line.replace(secret, b"***")
        out.write(line)
        out.flush()


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: orphan_guard.py PARENT_PID -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    parent, command = int(argv[1]), argv[3:]
    for sig in (signal.SIGTERM, signal.SIGINT):
        # a handler, not SIG_IGN: the command must not inherit "ignore" (exec resets handlers, not SIG_IGN)
        signal.signal(sig, _keep_waiting)
    secrets = [s for s in sys.stdin.buffer.read().split(b"\n") if s]
    child = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    copier = threading.Thread(target=_copy_masked, args=(child.stdout, secrets), daemon=True)
    copier.start()
    while True:
        try:
            code = child.wait(timeout=POLL_S)
            copier.join(DRAIN_S)  # the rest of its output (children it left may hold the pipe open)
            return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell reports it
        except subprocess.TimeoutExpired:
            pass
        if _orphaned(parent):
            print(
                f"orphan_guard: process {parent} that started this server is gone; stopping it",
                file=sys.stderr,
            )
            os.killpg(0, signal.SIGTERM)
            try:
                child.wait(timeout=GRACE_S)
                copier.join(DRAIN_S)
                return 1
            except subprocess.TimeoutExpired:
                os.killpg(0, signal.SIGKILL)  # the guard too
                return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
