"""One run per `run.output_dir` (megatron_sapo/train/run_lock.py), end to end through `megatron-sapo train`.

- a two-rank torchrun run takes the lock once (its record names its rank-0 worker) and finishes; while it
  runs, a second single-process run on the same directory exits 2 with one line naming the directory and
  the holder's pid and host, writing nothing, and a second two-rank torchrun run refuses on both ranks
  together (no rank left waiting at a rendezvous); the first run's metrics come out whole, each step
  once, and the lock is free after it;
- a two-rank torchrun run SIGKILLed mid-run leaves no lock behind: the rerun resumes and finishes.
Run: `python -m pytest tests/e2e/test_run_lock.py -q` (~3 min on 2 cores).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from megatron_sapo.train import run_lock
from megatron_sapo.utils.spawn import free_port
from tests.e2e.test_multirank import TINY, TRAIN, clean_env, rows
from tests.unit.test_run_lock import is_free

ARGS = [*TINY, "parallel.ep=2", "rollout.engine=transformers", "run.steps=4", "run.save_every=1"]


def torchrun(out: Path, log: Path) -> subprocess.Popen:
    """Two trainer ranks on `out`, output to `log`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), *TRAIN, f"run.output_dir={out}", *ARGS]
    with open(log, "w") as fh:
        return subprocess.Popen(
            cmd, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait_for_row(proc: subprocess.Popen, out: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and f'{{"step": {step},' in metrics.read_text()):
        assert proc.poll() is None, f"the run ended (exit {proc.returncode}) before step {step}"
        assert time.monotonic() < deadline, f"no step {step} row after {timeout} s"
        time.sleep(0.1)


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (torchrun starts each worker in a session of its own: killpg misses them)."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [p for child in found for p in tree(int(child))]


def signal_tree(proc: subprocess.Popen, sig: signal.Signals) -> list[int]:
    """Send `sig` to the agent and every worker (workers first: a stopped agent cannot restart them)."""
    pids = tree(proc.pid)
    for pid in reversed(pids):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        signal_tree(proc, signal.SIGKILL)
    proc.wait()


def wait_free(out: Path, timeout: float = 30) -> bool:
    """Whether the lock becomes free within `timeout` s (killed workers take a moment to exit)."""
    deadline = time.monotonic() + timeout
    while not is_free(out):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_two_rank_run_holds_once_and_refuses_a_second_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = torchrun(out, tmp_path / "first.log")
    try:
        wait_for_row(first, out, 1)
        # paused (agent and both ranks, lock held) while the other runs try: a tiny run ends in seconds
        pids = signal_tree(first, signal.SIGSTOP)
        try:
            holder = run_lock.read_holder(out)
            # one of the run's workers holds it (rank 0's), not the torchrun agent
            assert holder["pid"] in pids[1:], (holder, pids)
            config = (out / "config.yaml").read_bytes()
            _refused_while_held(out, holder, tmp_path)
            assert (out / "config.yaml").read_bytes() == config  # the refused runs wrote nothing
        finally:
            signal_tree(first, signal.SIGCONT)
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        stop(first)
    assert [x["step"] for x in rows(out)] == [0, 1, 2, 3, 4]  # the refused runs added no row
    assert is_free(out)


def _refused_while_held(out: Path, holder: dict, tmp_path: Path) -> None:
    """A single-process run: exit 2, one line naming the directory and the holder; a two-rank torchrun
    run: the same line from both ranks, and it ends (no rank waits for one that left)."""
    named = f"pid {holder['pid']} on {holder['host']}"
    second = subprocess.run(
        [sys.executable, *TRAIN, f"run.output_dir={out}", *TINY, "rollout.engine=transformers"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert second.returncode == 2, second.stderr[-3000:]
    assert "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"megatron-sapo train: error: run.output_dir {out.resolve()} is in use"), last
    assert named in last, last

    third = torchrun(out, tmp_path / "third.log")
    try:
        third.wait(timeout=300)
    finally:
        stop(third)
    log = (tmp_path / "third.log").read_text()
    assert third.returncode != 0, log[-3000:]
    refusals = [x for x in log.splitlines() if "is in use by another run" in x]
    assert len(refusals) == 2 and all(named in x for x in refusals), log[-3000:]  # one line per rank


def test_sigkilled_two_rank_run_does_not_block_its_rerun(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = torchrun(out, tmp_path / "first.log")
    try:
        wait_for_row(first, out, 2)
        killed = run_lock.read_holder(out)
    finally:
        stop(first)
    assert wait_free(out), f"the lock is still held after SIGKILL: {run_lock.read_holder(out)}"
    rerun = torchrun(out, tmp_path / "rerun.log")
    try:
        code = rerun.wait(timeout=600)
    finally:
        stop(rerun)
    log = (tmp_path / "rerun.log").read_text()
    assert code == 0, log[-3000:]
    assert "resuming from checkpoint" in log
    assert [x["step"] for x in rows(out)] == [0, 1, 2, 3, 4]
    assert run_lock.read_holder(out)["pid"] != killed["pid"]  # the rerun took the lock itself
