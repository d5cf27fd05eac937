"""Parallel layouts for the checkpoint converters: validation against a model, defaults, process setup.

    layout = ParallelConfig(tp=2, pp=1, ep=1)             # megatron/parallel.py's, as the trainer's
    check_layout(hf_config, layout, world=2)              # LayoutError naming the flag (--tp) that fails
    with parallel_session(layout):                        # torch.distributed + megatron parallel state
        ...

The layout, its validation and the process / parallel-state set-up are megatron/parallel.py's
(`ParallelConfig`, `check_layout`, `init_process_group`, `init_parallel`); this module adds the converters'
view: errors name the CLI flags, `default_layout` picks a layout for a world size, and the sessions.
`parallel_session` joins the torchrun group when RANK / WORLD_SIZE are set, reuses an initialised
group, or else starts a 1-rank group itself (so `python tools/...` works without torchrun). Backend:
NCCL with one GPU per local rank on GPU, else gloo with the CPU compatibility layer.
`process_group` is the plain gloo group (no megatron state) of the model-free Megatron -> HF path.
Tests: `python -m pytest tests/e2e/test_converters.py -q`
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist

from megatron_sapo.megatron import parallel
from megatron_sapo.megatron.parallel import LayoutError, ParallelConfig, world_size

__all__ = [
    "ConversionError",
    "ParallelConfig",
    "check_layout",
    "default_layout",
    "parallel_session",
    "process_group",
    "world_size",
]


class ConversionError(ValueError):
    """A user error (bad directory, unsupported model, unreadable checkpoint): reported as one line, like a
    LayoutError (an impossible layout)."""


def check_layout(hf_config: Any, layout: ParallelConfig, *, world: int) -> None:
    """Raise LayoutError unless `layout` splits the model evenly and fits `world` ranks (names --tp, ...)."""
    parallel.check_layout(layout, world=world, hf_config=hf_config, prefix="--")


def default_layout(hf_config: Any, *, world: int) -> ParallelConfig:
    """A layout using all `world` ranks: EP over experts for MoE, else TP, else PP, else data parallel."""
    candidates = (
        [ParallelConfig(ep=world), ParallelConfig(tp=world), ParallelConfig(pp=world)] if world > 1 else []
    )
    for layout in candidates:
        try:
            check_layout(hf_config, layout, world=world)
            return layout
        except LayoutError:
            continue
    return ParallelConfig()


def _init_process_group(backend: str | None = None) -> bool:
    """Initialise torch.distributed if needed; True when this call created the group.

    `backend`: None = NCCL (one GPU per local rank) on GPU, else gloo.
    """
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        from megatron_sapo.utils.spawn import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    parallel.init_process_group(local_rank=int(os.environ.get("LOCAL_RANK", "0")), backend=backend)
    return True


@contextlib.contextmanager
def process_group() -> Iterator[None]:
    """A gloo torch.distributed group for CPU-only work (`megatron_to_hf`): joins torchrun's ranks,
    reuses an initialised group, and creates none for a plain single process."""
    created = world_size() > 1 and _init_process_group("gloo")
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


@contextlib.contextmanager
def parallel_session(layout: ParallelConfig, *, seed: int = 1234) -> Iterator[None]:
    """torch.distributed + megatron parallel state at `layout` for the duration of the block."""
    from megatron.core import parallel_state

    created = _init_process_group()
    try:
        parallel.init_parallel(layout, seed=seed)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
