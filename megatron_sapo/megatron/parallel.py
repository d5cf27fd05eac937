"""Devices and parallel state, in one place: the `parallel:` config section, its one validator, the
device choice, and the set-up of torch.distributed + megatron's parallel state + seeds.

    from megatron_sapo.megatron.parallel import ParallelConfig, check_layout, init_parallel
    layout = ParallelConfig(tp=2, ep=2)
    check_layout(layout, world=4, hf_config=hf_config, dtype="float32")  # LayoutError naming the setting
    init_process_group(local_rank=0)     # torch.distributed from env:// (NCCL on GPU, else gloo)
    init_parallel(layout, seed=1234)     # CPU layer on CPU, initialize_model_parallel, seed_all

Used by the trainer (train/setup.py), the converters (convert/layout.py, convert/checkpoints.py),
megatron/{models,engine,checkpoint}.py (`on_gpu`, `device`), the launcher (cluster/launch.py) and,
through megatron/testing.py's `init_megatron_cpu`, the tests and benchmarks.
Tests: tests/unit/test_config.py, tests/unit/test_parallel.py, tests/unit/test_launch.py,
tests/distributed/test_parallel_etp.py.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_sapo.utils.typed_config import check, check_min


class LayoutError(ValueError):
    """A layout, device or launch that cannot work: one line naming the setting (the CLIs exit 2)."""


@dataclass
class ParallelConfig:
    """Megatron-Core parallel layout of the trainer; data parallelism takes the remaining ranks."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule); null = not interleaved."""
    ep: int = 1
    """Expert-parallel size (MoE)."""
    etp: int | None = None
    """Expert tensor-parallel size; null = same as `tp`."""
    sequence_parallel: bool | None = None
    """Megatron sequence parallelism (needs tp > 1 and a GPU; megatron requires it for MoE with tp > 1);
    null = on when tp > 1 on a GPU, off on CPU."""

    def __post_init__(self) -> None:
        check_min(self, "tp", "pp", "vpp", "ep", "etp")
        check(self.vpp is None or self.pp > 1, "vpp", "needs parallel.pp > 1")
        check(self.sequence_parallel is not True or self.tp > 1, "sequence_parallel", "needs parallel.tp > 1")

    def as_dict(self) -> dict[str, Any]:
        """The fields by name: keyword arguments of `models.transformer_config_from_hf`."""
        return asdict(self)


def on_gpu() -> bool:
    """Whether this process runs megatron on CUDA (else on CPU through megatron/cpu.py)."""
    return torch.cuda.is_available()


def gpu_count() -> int:
    """Visible CUDA devices (0 on CPU)."""
    return torch.cuda.device_count() if on_gpu() else 0


def device() -> torch.device:
    """Where this rank's tensors live: its current CUDA device, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")


def check_layout(
    parallel: ParallelConfig,
    *,
    world: int | None = None,
    hf_config: Any = None,
    dtype: str | None = None,
    gpu: bool | None = None,
    prefix: str = "parallel.",
) -> None:
    """Raise LayoutError unless `parallel` can run: on `world` ranks, for `hf_config`'s model, in
    `dtype` (`model.dtype`), on this machine (`gpu`: default `on_gpu()`). Checks only what is given.

    Messages name the setting as `{prefix}tp`: "parallel.tp" (config keys), or "--tp" for the converters'
    flags (they have no --etp, so an unset etp is then not mentioned). Vocab needs no check: megatron's
    vocab is padded to a multiple of tp (the padding is dropped on export).
    """
    p, gpu = parallel, on_gpu() if gpu is None else gpu
    tp, pp, ep, etp, stages = p.tp, p.pp, p.ep, p.etp or p.tp, p.pp * (p.vpp or 1)
    name_tp, name_pp, name_ep = f"{prefix}tp", f"{prefix}pp", f"{prefix}ep"
    name_etp = f"{prefix}etp" if p.etp is not None else name_tp  # unset etp follows tp
    unset_etp = f"; {prefix}etp unset: experts use {name_tp}" if p.etp is None and prefix != "--" else ""
    if not gpu and dtype not in (None, "float32"):
        raise LayoutError(f"model.dtype {dtype!r} needs a GPU: megatron's CPU path is float32 only")
    if not gpu and p.sequence_parallel:
        raise LayoutError(
            f"{prefix}sequence_parallel needs a GPU: megatron's sequence parallelism is not possible on CPU"
        )
    if hf_config is not None:
        from megatron_sapo.bridge.arch import language_config

        c = language_config(hf_config)  # a VLM's text tower is what megatron splits
        for field in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
            if getattr(c, field) % tp:
                raise LayoutError(f"{name_tp}={tp} does not divide {field}={getattr(c, field)}")
        if c.num_hidden_layers % stages:
            raise LayoutError(
                f"{name_pp} x {prefix}vpp = {stages} does not divide num_hidden_layers={c.num_hidden_layers}"
            )
        # megatron/vlm.py adds deepstack features after the first decoder layers, on the stage with the
        # vision tower: every such layer must be in the first (virtual) pipeline stage.
        vision = getattr(hf_config, "vision_config", None)
        deepstack = len(getattr(vision, "deepstack_visual_indexes", None) or ())
        if stages > 1 and c.num_hidden_layers // stages < deepstack:
            split = f"{name_pp}={pp}" if p.vpp is None else f"{name_pp} x {prefix}vpp = {pp} x {p.vpp}"
            raise LayoutError(
                f"{split} puts {c.num_hidden_layers // stages} of "
                f"num_hidden_layers={c.num_hidden_layers} on the first pipeline stage, but {c.model_type}'s "
                f"{deepstack} deepstack layers must all be there (with the vision tower)"
            )
        experts = getattr(c, "num_experts", None)
        if not experts and ep > 1:
            raise LayoutError(f"{name_ep}={ep} but {c.model_type} has no experts (num_experts absent)")
        if experts and experts % ep:
            raise LayoutError(f"{name_ep}={ep} does not divide num_experts={experts}")
        if experts and c.moe_intermediate_size % etp:
            raise LayoutError(
                f"{name_etp}={etp} does not divide moe_intermediate_size={c.moe_intermediate_size}{unset_etp}"
            )
        if experts and gpu and tp > 1 and p.sequence_parallel is False:
            raise LayoutError(
                f"{prefix}sequence_parallel false with {name_tp}={tp} on a MoE model: megatron needs sequence "
                "parallelism for MoE with tensor parallelism (set it true or leave it null)"
            )
    if world is not None:
        if world % (tp * pp):
            raise LayoutError(
                f"{name_tp} x {name_pp} = {tp} x {pp} = {tp * pp} does not divide the world size {world}"
            )
        if (world // pp) % (etp * ep):
            raise LayoutError(
                f"{name_etp} x {name_ep} = {etp} x {ep} = {etp * ep} does not divide the {world // pp} ranks "
                f"of one pipeline stage (world size {world} / {name_pp} {pp}; experts are spread over the "
                f"data-parallel ranks{unset_etp})"
            )


def init_process_group(*, local_rank: int = 0, backend: str | None = None) -> None:
    """Join torch.distributed from env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    `backend`: None = NCCL with CUDA device `local_rank % gpu_count()` on GPU, else gloo.
    """
    if backend is None and on_gpu():
        # before init: NCCL binds each rank's communicator to the current device
        torch.cuda.set_device(local_rank % gpu_count())
        backend = "nccl"
    dist.init_process_group(backend or "gloo", init_method="env://")


def init_parallel(parallel: ParallelConfig, *, seed: int = 1234) -> None:
    """Megatron's parallel state at `parallel` inside an initialised torch.distributed group, and seeds.

    On CPU enables the compatibility layer (megatron/cpu.py) first. Checks the layout against the world
    size (LayoutError), rebuilds any previous parallel state, then seeds python's `random`, torch and
    megatron's RNG tracker (`model_parallel_cuda_manual_seed`: TP / EP ranks enter the forked seeds).
    """
    from megatron.core import parallel_state

    check_layout(parallel, world=dist.get_world_size())
    if not on_gpu():
        from megatron_sapo.megatron.cpu import enable_cpu_compat

        enable_cpu_compat()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
    )
    seed_all(seed)


def seed_all(seed: int) -> None:
    """Seed python's `random`, torch (CPU and CUDA) and megatron's RNG tracker streams (data-, tensor- and
    expert-parallel; TP and EP ranks enter the forked seeds). After `init_parallel`'s parallel state."""
    from megatron.core import tensor_parallel

    random.seed(seed)
    torch.manual_seed(seed)
    # on CPU megatron/cpu.py has pointed the tracker's torch.cuda seeding at the CPU generator
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def world_size() -> int:
    """Ranks of the job: the initialised group, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def current_layout() -> ParallelConfig:
    """The layout of megatron's initialised parallel state."""
    from megatron.core import parallel_state as ps

    return ParallelConfig(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
    )
