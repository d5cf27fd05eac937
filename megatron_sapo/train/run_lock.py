"""One run per `run.output_dir`: an exclusive lock on `<output_dir>/.lock`, taken before anything is written.

    claim(out)                       # the CLI, on the launch's rank 0, before it writes config.yaml
    with hold(out, rank): ...        # every trainer rank, around the run (loop.run): all refuse together
    wait_for_own_run(out, timeout=600)  # engine-node processes of a disaggregated run, before serving

The lock is `fcntl.flock` on `.lock`: the kernel drops it when its holder exits, however it exits (SIGKILL
included), so a killed run never blocks its own rerun and there is nothing stale to clean up. The file
holds one JSON line naming the holder (pid, host, start time, launch id) for the refusal message
`RunDirInUse`, a `LayoutError`: one line, exit 2, from `megatron-sapo train`.

Multi-rank and multi-node runs take it once, in global rank 0. The CLI claims it before `save_config`; a
refused claim is remembered and nothing is written; `hold` then broadcasts rank 0's outcome once the
process group exists, so every trainer rank raises the same `RunDirInUse` and they all exit 2 together
(the other ranks never wait at a rendezvous for a rank 0 that left). Engine-node processes never join
that group: they wait until the lock record names their own launch (`launch_id`) before serving, and
refuse after `timeout` when it names another one.

Shared filesystems: on NFS, Linux emulates flock with POSIX locks the server arbitrates, so it holds
across nodes; Lustre does so only when mounted with `-o flock` (with `localflock` it is node-local, and
without either flock fails with an error). Where the lock cannot be taken (that error) the run refuses
rather than running unlocked. The record is not a heartbeat: it is read for messages and by engine nodes,
never trusted to decide that a holder is alive.
Tests: tests/unit/test_run_lock.py, tests/e2e/test_run_lock.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path

import torch.distributed as dist

from megatron_sapo.megatron.parallel import LayoutError

LOCK_NAME = ".lock"
OWN_LAUNCH_WAIT_S = 60.0
"""How long trainer rank 0 waits for a lock held by another process of its own launch (srun torchrun
numbers processes differently from the trainers: the CLI's rank 0 may be an engine-node process)."""
POLL_S = 0.5


class RunDirInUse(LayoutError):
    """Another run holds `run.output_dir`: one line naming the directory and the holder (exit 2)."""


_held: dict[Path, int] = {}  # directory -> the open .lock descriptor this process holds it with
_refused: dict[Path, RunDirInUse] = {}  # sticky: a refused CLI wrote nothing, so the trainer must refuse too


def launch_id(env: Mapping[str, str] = os.environ) -> str:
    """What every process of one launch shares: the SLURM job step, else torchrun's run id, else this pid."""
    job, step = (
        env.get("SLURM_JOB_ID", env.get("SLURM_JOBID")),
        env.get("SLURM_STEP_ID", env.get("SLURM_STEPID")),
    )
    if job:
        return f"slurm:{job}.{step}"
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}@{env.get('MASTER_ADDR')}:{env.get('MASTER_PORT')}"
    return f"pid:{os.getpid()}@{socket.gethostname()}"


def _key(output_dir: str | Path) -> Path:
    return Path(output_dir).resolve()


def read_holder(output_dir: str | Path) -> dict:
    """The record the last holder wrote ({} when there is none or it is unreadable)."""
    try:
        return json.loads((Path(output_dir) / LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _refusal(path: Path, holder: dict) -> RunDirInUse:
    who = f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}"
    since = f", started {holder['started']}" if holder.get("started") else ""
    return RunDirInUse(
        f"run.output_dir {path} is in use by another run ({who}{since}); one run per output directory: "
        "wait for it to end or choose another run.output_dir"
    )


def claim(output_dir: str | Path) -> None:
    """Take the lock on `output_dir` (created if missing) for this process, or raise `RunDirInUse`.

    Idempotent: a directory this process holds is returned at once, one it was refused stays refused."""
    key = _key(output_dir)
    if key in _held:
        return
    if key in _refused:
        raise _refused[key]
    key.mkdir(parents=True, exist_ok=True)
    fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by subprocesses
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        _refused[key] = _refusal(key, read_holder(key))
        raise _refused[key] from None
    except OSError as e:  # e.g. Lustre without -o flock: refuse instead of running unlocked
        os.close(fd)
        raise RunDirInUse(f"run.output_dir {key}: cannot lock {key / LOCK_NAME} ({e})") from None
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "launch": launch_id(),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    _held[key] = fd


def release(output_dir: str | Path) -> None:
    """Drop this process's lock on `output_dir` (the record stays, for messages); no-op when not held."""
    key = _key(output_dir)
    _refused.pop(key, None)
    fd = _held.pop(key, None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor of the open file releases the flock


def _claim_as_rank0(output_dir: Path) -> RunDirInUse | None:
    """Trainer rank 0: `claim`, waiting while another process of this launch holds it (see OWN_LAUNCH_WAIT_S)."""
    deadline = time.monotonic() + OWN_LAUNCH_WAIT_S
    while True:
        try:
            claim(output_dir)
            return None
        except RunDirInUse as e:
            own = read_holder(output_dir).get("launch") == launch_id()
            if not own or time.monotonic() > deadline:
                return e
            _refused.pop(_key(output_dir), None)
            time.sleep(POLL_S)


@contextlib.contextmanager
def hold(output_dir: str | Path, rank: int) -> Iterator[None]:
    """Every trainer rank (after the process group, if any, exists): trainer rank 0 claims `output_dir`
    (already held when the CLI claimed it), all ranks get its outcome and raise the same `RunDirInUse`;
    rank 0 releases it when the block ends, however it ends."""
    out = Path(output_dir)
    refusal = _claim_as_rank0(out) if rank == 0 else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        message = [str(refusal) if refusal else None]
        dist.broadcast_object_list(message, src=0)
        refusal = RunDirInUse(message[0]) if message[0] else None
    if refusal is not None:
        raise refusal
    try:
        yield
    finally:
        if rank == 0:
            release(out)


def wait_for_own_run(output_dir: str | Path, timeout: float) -> None:
    """Engine-node processes: return once the lock record names this launch; `RunDirInUse` naming the
    holder when another launch's record is still there after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (holder := read_holder(output_dir)).get("launch") != launch_id():
        if time.monotonic() > deadline:
            raise _refusal(_key(output_dir), holder)
        time.sleep(POLL_S)
