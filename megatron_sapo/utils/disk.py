"""Disk-full (ENOSPC) as one line naming the path, for every writer of big files (checkpoints, HF exports).

    try:
        write_everything(path)
    except Exception as e:
        if is_disk_full(e):
            raise DiskFullError(disk_full_message(path, needed=nbytes)) from e
        raise

`is_disk_full` also looks inside the errors that torch.distributed.checkpoint wraps per rank. Tests:
tests/distributed/test_checkpoint_failures.py.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

__all__ = ["DiskFullError", "disk_full_message", "is_disk_full"]


class DiskFullError(OSError):
    """No space left on the device while writing a path; the message names it (one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, its causes, or the per-rank failures it wraps (a DCP `CheckpointException`) are ENOSPC."""
    seen: set[int] = set()
    todo: list[object] = [exc]
    while todo:
        e = todo.pop()
        if not isinstance(e, BaseException) or id(e) in seen:
            if isinstance(e, tuple):  # DCP's WrappedException: (exception, traceback)
                todo.extend(e)
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if os.strerror(errno.ENOSPC) in str(e):  # an error of another rank: pickled without its cause
            return True
        todo += [e.__cause__, e.__context__, *getattr(e, "failures", {}).values()]
    return False


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def disk_full_message(path: str | os.PathLike, *, needed: int | None = None) -> str:
    """'no space left on the device writing PATH (needs ~N MB, M MB free)'; the free space is measured
    on the nearest existing parent of `path`."""
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    need = f"needs ~{_mb(needed)}, " if needed else ""
    return f"no space left on the device writing {path} ({need}{_mb(free)} free)"
