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
