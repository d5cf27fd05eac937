"""megatron_sapo/train/run_lock.py: the lock on `<run.output_dir>/.lock`, against a real holder process.

- a directory held by a live process is refused with one line naming it and the holder's pid and host;
- after the holder is SIGKILLed the kernel has dropped its lock: a new claim takes it;
- claiming is idempotent in the holding process, and a refusal stays (the refused CLI wrote nothing);
- `hold` releases at the end of its block and after an exception; one run at a time inside it;
- engine-node processes wait for their own launch's record and refuse another launch's.
Run: `python -m pytest tests/unit/test_run_lock.py -q`.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sapo.megatron.parallel import LayoutError
from megatron_sapo.train import run_lock
from megatron_sapo.train.run_lock import RunDirInUse, claim, hold, launch_id, release

ROOT = Path(__file__).resolve().parents[2]
HOLDER = (
    "import sys, time\n"
    "from megatron_sapo.train.run_lock import claim\n"
    "claim(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "time.sleep(300)\n"
)


def start_holder(path: Path) -> subprocess.Popen:
    """A process that claims `path` through the module and sleeps; returns once it holds the lock."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def is_free(path: Path) -> bool:
    """Whether nobody holds the lock (a new open file description conflicts even within this process)."""
    with open(path / run_lock.LOCK_NAME, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each process its own launch (the tests may themselves run under srun / torchrun)."""
    for name in ("SLURM_JOB_ID", "SLURM_JOBID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def holder(tmp_path: Path):
    proc = start_holder(tmp_path)
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    release(tmp_path)


def test_held_directory_is_refused_naming_it_and_the_holder(tmp_path: Path, holder) -> None:
    with pytest.raises(RunDirInUse) as info:
        claim(tmp_path)
    message = str(info.value)
    assert isinstance(info.value, LayoutError)  # the CLI's one line + exit 2
    assert "\n" not in message
    assert f"run.output_dir {tmp_path.resolve()} is in use by another run" in message
    assert f"pid {holder.pid} on {socket.gethostname()}" in message


def test_sigkilled_holder_does_not_block_the_rerun(tmp_path: Path, holder) -> None:
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    claim(tmp_path)
    assert not is_free(tmp_path)
    assert run_lock.read_holder(tmp_path)["pid"] == os.getpid()
    release(tmp_path)
    assert is_free(tmp_path)


def test_claim_is_idempotent_and_a_refusal_stays(tmp_path: Path, holder) -> None:
    other = tmp_path / "other"
    claim(other)
    claim(other)  # the same process: already held
    release(other)
    assert is_free(other)
    with pytest.raises(RunDirInUse):
        claim(tmp_path)
    holder.kill()
    holder.wait()
    with pytest.raises(RunDirInUse):  # the refused CLI wrote no config.yaml: the trainer must refuse too
        claim(tmp_path)


def test_hold_releases_at_exit_and_after_an_exception(tmp_path: Path) -> None:
    with hold(tmp_path, rank=0):
        assert not is_free(tmp_path)
        claim(tmp_path)  # the trainer's claim after the CLI's: the same process, idempotent
    assert is_free(tmp_path)
    with pytest.raises(ZeroDivisionError), hold(tmp_path, rank=0):
        assert not is_free(tmp_path)
        _ = 1 / 0
    assert is_free(tmp_path)
    with hold(tmp_path, rank=1):  # not rank 0 (no process group here): takes nothing
        assert is_free(tmp_path)


def test_hold_refuses_while_another_run_holds(tmp_path: Path, holder) -> None:
    with pytest.raises(RunDirInUse, match=f"pid {holder.pid} "), hold(tmp_path, rank=0):
        pytest.fail("entered a held directory")


def test_engine_nodes_wait_for_their_own_launch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    (tmp_path / run_lock.LOCK_NAME).write_text('{"pid": 5, "host": "n1", "launch": "slurm:76.0"}\n')
    with pytest.raises(RunDirInUse, match="pid 5 on n1"):
        run_lock.wait_for_own_run(tmp_path, timeout=0.2)
    claim(tmp_path)
    run_lock.wait_for_own_run(tmp_path, timeout=0.2)
    release(tmp_path)


def test_launch_id() -> None:
    assert launch_id({"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "2", "TORCHELASTIC_RUN_ID": "x"}) == "slurm:9.2"
    run = {"TORCHELASTIC_RUN_ID": "abc", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    assert launch_id(run) == "torchrun:abc@h:29500"
    assert launch_id({}) == f"pid:{os.getpid()}@{socket.gethostname()}"
