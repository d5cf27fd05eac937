"""`run_on_ranks` argument validation (before any process starts) and a 1-rank gloo round trip.

python -m pytest tests/unit/test_spawn.py -q
"""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks


def _rank_and_backend(rank: int, world_size: int) -> tuple[int, int, str]:
    import torch.distributed as dist

    return rank, world_size, dist.get_backend()


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        run_on_ranks(_rank_and_backend, world_size=1, backend="mpi")


def test_world_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        run_on_ranks(_rank_and_backend, world_size=0)


def test_nccl_needs_one_gpu_per_rank() -> None:
    with pytest.raises(ValueError, match="one GPU per rank"):
        run_on_ranks(_rank_and_backend, world_size=torch.cuda.device_count() + 1, backend="nccl")


def test_gloo_is_the_default_backend() -> None:
    assert run_on_ranks(_rank_and_backend, world_size=1) == [(0, 1, "gloo")]


def test_free_ports_are_consecutive_bindable_and_below_the_ephemeral_range() -> None:
    import socket
    from pathlib import Path

    from megatron_sapo.utils.spawn import free_ports

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    start = free_ports(3)
    assert start >= 10000 and start + 3 <= low
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(3)]
    try:
        for i, s in enumerate(sockets):
            s.bind(("0.0.0.0", start + i))  # each still free: binds
    finally:
        for s in sockets:
            s.close()
