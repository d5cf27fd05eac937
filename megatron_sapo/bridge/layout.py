"""Where this rank's megatron parameters sit in the whole model: process groups and global names.

Shared by `export.py` and `load.py`. A model is a `GPTModel` or a list of them (virtual pipeline
chunks), possibly wrapped (DDP / Float16Module expose `.module`). Each parameter is resolved against
the architecture's `MappingTable` with *global* indices: a local decoder layer i is global layer
`layers[i].layer_number - 1` (megatron's own placement, any PP/VPP layout), and local expert e on EP
rank r is global expert r·E/ep + e (megatron's `local_expert_indices`).

    groups = ParallelGroups.from_parallel_state()     # or pass gloo/NCCL groups explicitly
    params = local_parameters(model_chunks(model), table, groups)

Tests: `python -m pytest tests/distributed/test_bridge.py -q`
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

from megatron_sapo.bridge.mapping import Mapping, MappingTable


@dataclasses.dataclass(frozen=True)
class ParallelGroups:
    """The process groups the bridge communicates over (None: a single-rank group, no communication)."""

    tp: dist.ProcessGroup | None
    """Tensor parallel: splits every non-expert TP-split tensor."""
    etp: dist.ProcessGroup | None
    """Expert tensor parallel: splits expert weights (megatron defaults it to the TP size)."""
    ep: dist.ProcessGroup | None
    """Expert parallel: each rank holds num_experts / ep experts."""
    pp: dist.ProcessGroup | None
    """Pipeline parallel: ranks in stage order."""

    @classmethod
    def from_parallel_state(cls) -> ParallelGroups:
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_group(),
            etp=ps.get_expert_tensor_parallel_group(check_initialized=False),
            ep=ps.get_expert_model_parallel_group(check_initialized=False),
            pp=ps.get_pipeline_model_parallel_group(),
        )


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def group_ranks(group: dist.ProcessGroup | None) -> list[int]:
    """Global ranks of `group` in group-rank order (this rank alone when None)."""
    return (
        [dist.get_rank() if dist.is_initialized() else 0]
        if group is None
        else dist.get_process_group_ranks(group)
    )


@dataclasses.dataclass
class LocalParam:
    """One parameter of this rank, resolved: `fields` hold global layer / expert indices."""

    name: str
    param: torch.nn.Parameter
    mapping: Mapping
    fields: dict[str, int]
    tp_group: dist.ProcessGroup | None
    """The group splitting it along `mapping.split` (expert-TP for experts)."""
    num_local_experts: int
    """Experts per EP rank in its model chunk (0 for a dense model)."""


def model_chunks(model: Any) -> list[torch.nn.Module]:
    """The (virtual pipeline) model chunks of `model`, unwrapped from DDP / Float16Module."""
    chunks = list(model) if isinstance(model, list | tuple) else [model]
    unwrapped = []
    for chunk in chunks:
        while hasattr(chunk, "module") and not hasattr(chunk, "decoder"):
            chunk = chunk.module
        unwrapped.append(chunk)
    return unwrapped


def local_parameters(
    chunks: list[torch.nn.Module], table: MappingTable, groups: ParallelGroups
) -> list[LocalParam]:
    """This rank's parameters in chunk order, each resolved with global indices (ValueError if unmapped)."""
    ep_rank, ep_size = group_rank(groups.ep), group_size(groups.ep)
    out = []
    for chunk in chunks:
        decoder = getattr(chunk, "decoder", None)
        global_layer = [layer.layer_number - 1 for layer in decoder.layers] if decoder is not None else []
        num_local_experts = (getattr(chunk.config, "num_moe_experts", None) or 0) // ep_size
        for name, param in chunk.named_parameters():
            try:
                resolved = table.resolve(name)
            except KeyError as error:
                raise ValueError(error.args[0]) from None
            fields = dict(resolved.fields)
            if "layer" in fields:
                fields["layer"] = global_layer[fields["layer"]]
            if "expert" in fields:
                fields["expert"] += ep_rank * num_local_experts
            tp_group = groups.etp if resolved.mapping.is_expert else groups.tp
            out.append(LocalParam(name, param, resolved.mapping, fields, tp_group, num_local_experts))
    return out
