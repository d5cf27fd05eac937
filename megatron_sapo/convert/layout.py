"""Parallel layouts for the checkpoint converters: validation against a model, defaults, process setup.

    layout = Layout(tp=2, pp=1, ep=1)
    check_layout(hf_config, layout, world_size=2)        # ConversionError naming the field that fails
    with parallel_session(layout):                        # torch.distributed + megatron parallel state
        ...

`parallel_session` joins the torchrun group when RANK / WORLD_SIZE are set, reuses an initialised
group, or else starts a 1-rank group itself (so `python tools/...` works without torchrun). Backend:
NCCL with one GPU per local rank when CUDA is available, else gloo with the CPU compatibility layer.
`process_group` is the plain gloo group (no megatron state) of the model-free Megatron -> HF path.
Tests: `python -m pytest tests/e2e/test_converters.py -q`
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


class ConversionError(ValueError):
    """A user error (bad directory, unsupported model, impossible layout): reported as one line."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """A megatron parallel layout; data parallelism fills the remaining ranks (redundant copies)."""

    tp: int = 1
    """Tensor parallel size (splits attention heads, MLP width and vocab)."""
    pp: int = 1
    """Pipeline parallel size (splits the decoder layers)."""
    ep: int = 1
    """Expert parallel size (splits the routed experts; spread over the data-parallel ranks)."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (None: no interleaving)."""

    def as_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


def world_size() -> int:
    """Ranks of the job: the initialised group, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _need(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def check_layout(hf_config: Any, layout: Layout, *, world: int) -> None:
    """Raise ConversionError unless `layout` splits the model evenly and fits `world` ranks.

    Vocab needs no check: megatron's vocab is padded to a multiple of TP (the padding is dropped on
    export). Expert TP equals TP (megatron's default).
    """
    for name in ("tp", "pp", "ep"):
        _need(getattr(layout, name) >= 1, f"--{name} must be >= 1, got {getattr(layout, name)}")
    tp, pp, ep, vpp = layout.tp, layout.pp, layout.ep, layout.vpp or 1
    c = hf_config
    _need(
        c.num_attention_heads % tp == 0,
        f"num_attention_heads={c.num_attention_heads} is not divisible by tp={tp}",
    )
    _need(
        c.num_key_value_heads % tp == 0,
        f"num_key_value_heads={c.num_key_value_heads} is not divisible by tp={tp}",
    )
    _need(
        c.intermediate_size % tp == 0, f"intermediate_size={c.intermediate_size} is not divisible by tp={tp}"
    )
    stages = pp * vpp
    _need(
        c.num_hidden_layers % stages == 0,
        f"num_hidden_layers={c.num_hidden_layers} is not divisible by pp*vpp={stages}",
    )
    _need(layout.vpp is None or pp > 1, f"--vpp {layout.vpp} needs --pp > 1")
    experts = getattr(c, "num_experts", None)
    if experts:
        _need(experts % ep == 0, f"num_experts={experts} is not divisible by ep={ep}")
        moe_width = c.moe_intermediate_size
        _need(moe_width % tp == 0, f"moe_intermediate_size={moe_width} is not divisible by tp={tp}")
    else:
        _need(ep == 1, f"ep={ep} but {c.model_type} has no experts (num_experts absent)")
    _need(
        world % (tp * pp * ep) == 0,
        f"world size {world} (torchrun --nproc-per-node) must be a multiple of tp*pp*ep={tp * pp * ep} "
        f"(tp={tp}, pp={pp}, ep={ep}; experts are spread over the data-parallel ranks)",
    )


def default_layout(hf_config: Any, *, world: int) -> Layout:
    """A layout using all `world` ranks: EP over experts for MoE, else TP, else PP, else data parallel."""
    candidates = [Layout(ep=world), Layout(tp=world), Layout(pp=world)] if world > 1 else []
    for layout in candidates:
        try:
            check_layout(hf_config, layout, world=world)
            return layout
        except ConversionError:
            continue
    return Layout()


def _init_process_group(backend: str | None = None) -> bool:
    """Initialise torch.distributed if needed; True when this call created the group.

    `backend`: None = NCCL (one GPU per local rank) when CUDA is available, else gloo.
    """
    if dist.is_initialized():
        return False
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        from megatron_sapo.utils.spawn import free_port

        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if backend is None and torch.cuda.is_available():
        # before init: NCCL binds each rank's communicator to the current device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend or "gloo")
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
def parallel_session(layout: Layout, *, seed: int = 1234) -> Iterator[None]:
    """torch.distributed + megatron parallel state at `layout` for the duration of the block."""
    from megatron.core import parallel_state

    created = _init_process_group()
    try:
        if torch.cuda.is_available():
            from megatron.core import tensor_parallel

            seed_fn = tensor_parallel.model_parallel_cuda_manual_seed
        else:
            from megatron_sapo.megatron.cpu import enable_cpu_compat, model_parallel_manual_seed

            enable_cpu_compat()
            seed_fn = model_parallel_manual_seed
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            virtual_pipeline_model_parallel_size=layout.vpp,
            expert_model_parallel_size=layout.ep,
        )
        seed_fn(seed)
        yield
    finally:
        parallel_state.destroy_model_parallel()
        if created:
            dist.destroy_process_group()
