"""Megatron -> Hugging Face weights: stream full HF-named tensors out of a model sharded in any layout.

The heart of weight sync. Every rank of the job iterates the same generator (it runs collectives);
destination ranks receive `(hf_name, full_tensor)` buckets, the others receive empty buckets at the
same points, so all ranks yield the same number of times:

    for bucket in export_hf_weights(model_chunks, hf_config, bucket_bytes=512 << 20, dst_ranks=(0,)):
        if bucket:
            send_to_sglang(bucket)          # [(name, tensor)], sum of bytes <= bucket_bytes

How: the PP stages exchange the list of HF tensors they hold (names, shapes, dtypes) once; then stage by
stage, parameter by parameter, the stage's ranks all-gather one parameter over its TP (expert-TP for
experts) group and its experts over the EP group, convert it with the architecture's mapping table, and
the stage's rank in a destination's PP group sends it point-to-point to that destination. Bucket
boundaries are planned from the metadata, so they agree on every rank. Extra memory per rank: one
bucket plus one gathered parameter. Vocab padding rows are dropped; a tied output layer is not
exported (only `model.embed_tokens.weight`); experts use per-expert checkpoint names.

Tensors keep the parameters' dtype and device and may alias parameters (TP=1): consume a bucket before
the next optimizer step. Tests: `python -m pytest tests/distributed/test_bridge.py -q`
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_sapo.bridge.arch import mapping_table
from megatron_sapo.bridge.layout import (
    LocalParam,
    ParallelGroups,
    group_rank,
    group_ranks,
    group_size,
    local_parameters,
    model_chunks,
)
from megatron_sapo.bridge.mapping import MappingTable

logger = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 << 20

# One HF tensor of a stage: (name, shape, dtype).
TensorMeta = tuple[str, tuple[int, ...], torch.dtype]


def _nbytes(meta: TensorMeta) -> int:
    _, shape, dtype = meta
    return torch.Size(shape).numel() * dtype.itemsize


def _unit_meta(lp: LocalParam, table: MappingTable, groups: ParallelGroups) -> list[TensorMeta]:
    """The HF tensors one local parameter becomes once gathered (all EP ranks' experts included)."""
    full_shape = lp.mapping.full_shape(tuple(lp.param.shape), group_size(lp.tp_group))
    shapes = table.expected_hf_shapes(lp.mapping, full_shape)
    field_sets = [lp.fields]
    if lp.mapping.is_expert:
        first = lp.fields["expert"] - group_rank(groups.ep) * lp.num_local_experts
        field_sets = [
            {**lp.fields, "expert": first + r * lp.num_local_experts} for r in range(group_size(groups.ep))
        ]
    return [
        (name, shape, lp.param.dtype)
        for fields in field_sets
        for name, shape in zip(lp.mapping.hf_names(fields, table.dims), shapes, strict=True)
    ]


@torch.no_grad()
def _gather(lp: LocalParam, table: MappingTable, groups: ParallelGroups) -> list[torch.Tensor]:
    """Full HF tensors of one parameter, in `_unit_meta` order (collective over TP / expert-TP and EP)."""
    tensor = lp.param.detach()
    tp = group_size(lp.tp_group)
    if lp.mapping.split is not None and tp > 1:
        # One [tp, *shard] stack is the only full-size temporary (a list all_gather plus torch.cat held
        # two); split-0 tensors are then a view of it.
        flat = tensor.new_empty((tp * tensor.shape[0], *tensor.shape[1:]))  # gloo wants the dim-0 concat
        dist.all_gather_into_tensor(flat, tensor.contiguous(), group=lp.tp_group)
        stacked = flat.view(tp, *tensor.shape)
        del flat
        tensor = lp.mapping.merge_tp(stacked)
        del stacked
    fulls = [tensor]
    if lp.mapping.is_expert and group_size(groups.ep) > 1:
        fulls = [torch.empty_like(tensor) for _ in range(group_size(groups.ep))]
        dist.all_gather(fulls, tensor.contiguous(), group=groups.ep)
    return [out.contiguous() for full in fulls for out in lp.mapping.to_hf(full, table.dims)]


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[bool]:
    """Per tensor: whether a new bucket starts before it (a tensor above the limit gets its own bucket)."""
    starts, filled = [], 0
    for meta in metas:
        size = _nbytes(meta)
        new = filled > 0 and filled + size > bucket_bytes
        starts.append(new)
        filled = size if new else filled + size
    return starts


def export_hf_weights(
    model: Any,
    hf_config: Any,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dst_ranks: Sequence[int] = (0,),
    groups: ParallelGroups | None = None,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of `(hf_name, full_tensor)`; only global ranks in `dst_ranks` get non-empty ones.

    `model`: a GPTModel or list of virtual-pipeline chunks, any TP/PP/EP/DP layout. `bucket_bytes`:
    bound on one bucket's bytes (a single larger tensor travels alone). `groups`: default megatron's
    parallel state. Every rank must exhaust the generator (it runs collectives).
    """
    if bucket_bytes <= 0 or not dst_ranks:
        raise ValueError(
            f"bucket_bytes must be > 0 and dst_ranks non-empty (got {bucket_bytes}, {dst_ranks})"
        )
    groups = groups or ParallelGroups.from_parallel_state()
    table = mapping_table(hf_config)
    chunks = model_chunks(model)
    units = [lp for lp in local_parameters(chunks, table, groups) if lp.mapping.exported(table.dims)]
    stage_meta = [_unit_meta(lp, table, groups) for lp in units]

    pp_ranks, my_stage, me = group_ranks(groups.pp), group_rank(groups.pp), dist.get_rank()
    metas_by_stage: list[Any] = [stage_meta]
    if len(pp_ranks) > 1:
        metas_by_stage = [None] * len(pp_ranks)
        dist.all_gather_object(metas_by_stage, stage_meta, group=groups.pp)
    flat = [meta for stage in metas_by_stage for unit in stage for meta in unit]
    names = [name for name, _, _ in flat]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"bridge export: HF names produced twice: {duplicates[:5]}")
    starts = iter(plan_buckets(flat, bucket_bytes))

    is_dst = me in dst_ranks
    # destinations in my PP group at other stages: I forward my stage's tensors to them
    forward_to = [d for d in dst_ranks if d in pp_ranks and pp_ranks.index(d) != my_stage]
    device = next(chunks[0].parameters()).device
    bucket: list[tuple[str, torch.Tensor]] = []
    for stage, stage_units in enumerate(metas_by_stage):
        for unit_index, unit in enumerate(stage_units):
            tensors: list[torch.Tensor | None] = [None] * len(unit)
            if stage == my_stage:
                tensors = list(_gather(units[unit_index], table, groups))
                for dst in forward_to:
                    for tensor in tensors:
                        dist.send(tensor, dst)
            elif is_dst:
                tensors = []
                for _, shape, dtype in unit:
                    tensors.append(torch.empty(shape, dtype=dtype, device=device))
                    dist.recv(tensors[-1], pp_ranks[stage])
            for (name, _, _), tensor in zip(unit, tensors, strict=True):
                if next(starts):
                    yield bucket
                    bucket = []
                if is_dst:
                    bucket.append((name, tensor))
            del tensors
    yield bucket
    if is_dst:
        logger.debug("bridge export: %d tensors, %.1f MiB", len(flat), sum(map(_nbytes, flat)) / 2**20)
