"""Run a function on N local processes joined in a process group, and collect what each returns.

Used by the distributed test tier and the benchmarks: real torch.distributed (gloo on CPU, NCCL on GPU),
real megatron-core parallel state, one OS process per rank, no mocks.

    results = run_on_ranks(fn, world_size=2, args=(...,))   # fn(rank, world_size, *args) -> picklable
    results = run_on_ranks(fn, world_size=2, backend="nccl")  # rank r on GPU r

Tests: ``python -m pytest tests/unit/test_spawn.py tests/distributed/test_loss_dp.py -q``.
"""

from __future__ import annotations

import os
import pickle
import random
import socket
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

BACKENDS = ("gloo", "nccl")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(count: int) -> int:
    """The first of `count` consecutive TCP ports, all free a moment ago on every address, below the
    kernel's ephemeral range: fixed ports (`cluster.engine_port` + node index) that another process's
    bind(0), such as an SGLang server's internal sockets, cannot take meanwhile. `free_port`'s port is
    in that range, so the ports after it can be."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        start = rng.randrange(10000, low - count)
        try:
            for port in range(start, start + count):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return start
    raise RuntimeError(f"no {count} consecutive free ports in [10000, {low})")


def _worker(
    rank: int, world_size: int, port: int, backend: str, fn: Callable, args: tuple, queue: Any
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    try:
        if backend == "nccl":
            # Before init: NCCL binds each rank's communicator to the current device.
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Plain pickle, by value: torch's queue reducer would share tensor storage through file
        # descriptors that disappear when this process exits.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # report every failure to the parent, including SystemExit from asserts in libs
        queue.put((rank, "error", traceback.format_exc()))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable, world_size: int, args: tuple = (), timeout: float = 300.0, *, backend: str = "gloo"
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return results by rank.

    ``backend``: "gloo" (CPU) or "nccl" (rank r runs on GPU r). ``fn`` must be importable by name (a
    module-level function). Raises ValueError for an unknown backend, a world size < 1 or, with NCCL,
    more ranks than visible GPUs (NCCL refuses two ranks on one device); RuntimeError with the failing
    rank's traceback if any rank fails; TimeoutError if the ranks do not finish in ``timeout`` s.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ValueError(
            f"backend='nccl' needs one GPU per rank: world_size={world_size}, "
            f"visible GPUs={torch.cuda.device_count()}"
        )
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, queue), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size:
        if time.monotonic() > deadline:
            break
        if queue.empty():
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.05)
            continue
        rank, status, payload = queue.get()
        if status == "ok":
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"rank {rank} failed:\n{payload}")
    for p in procs:
        p.join(timeout=5 if not errors else 1)
        if p.is_alive():
            p.kill()
            p.join()
    if errors:
        raise RuntimeError("\n".join(errors))
    if len(results) < world_size:
        missing = sorted(set(range(world_size)) - set(results))
        codes = {r: procs[r].exitcode for r in missing}
        raise TimeoutError(f"ranks {missing} returned nothing within {timeout:.0f}s (exit codes {codes})")
    return [results[r] for r in range(world_size)]
