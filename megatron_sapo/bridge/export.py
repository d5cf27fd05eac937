"""Megatron -> Hugging Face weights: stream full HF-named tensors out of a model sharded in any layout.

The heart of weight sync. Every rank of the job iterates the same generator (it runs collectives);
destination ranks receive `(hf_name, full_tensor)` buckets, the others receive empty buckets at the
same points, so all ranks yield the same number of times:

    for bucket in export_hf_weights(model_chunks, hf_config, bucket_bytes=512 << 20, dst_ranks=(0,)):
        if bucket:
            send_to_sglang(bucket)          # [(name, tensor)], sum of bytes <= bucket_bytes
        del bucket                          # before the next one is filled (see the memory bound)

How: the PP stages exchange the list of HF tensors they hold (names, shapes, dtypes) once; then stage by
stage, parameter by parameter, the stage's ranks all-gather one parameter over its TP (expert-TP for
experts) group and its experts over the EP group, convert it with the architecture's mapping table, and
the stage's rank in a destination's PP group sends it point-to-point to that destination. A rank that
neither yields nor forwards a parameter takes part in its collectives without assembling it. Bucket
boundaries are planned from the metadata, so they agree on every rank.

Extra memory per rank: one bucket plus one gathered parameter. A parameter that would overflow the open
bucket starts a new one, which is yielded before the gather. Shards are gathered in row chunks of at
most 16 MiB (and bucket_bytes / 8) through one reused staging buffer, then copied into their place in
the full tensor (a one-shot gloo all_gather would stage the whole output in a flat buffer of its own);
the HF tensors are views of it, except fused QKV's q/k/v (copies). Vocab padding rows are dropped; a
tied output layer is not exported (only `model.embed_tokens.weight`); experts use per-expert
checkpoint names.

The bound counts one bucket: drop each bucket before asking for the next (`del bucket` at the end of a
`for` body; a loop variable otherwise keeps the previous bucket alive while the next one is filled).

Tensors keep the parameters' dtype and device and may alias parameters (TP=1): consume a bucket before
the next optimizer step. Tests: `python -m pytest tests/distributed/test_bridge.py
tests/distributed/test_export_memory.py -q`
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
GATHER_CHUNK_BYTES = 16 << 20

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


class _Staging:
    """One reusable buffer that every collective gathers into before its rows are copied into place.

    The destination never reaches the backend: gloo's worker thread can hold a finished collective's
    output tensors a little longer than `wait()`, which would keep the previous parameter alive while
    the next one is allocated. Allocated on first use.
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.buffer = nbytes, None

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * like.element_size()
        if nbytes > self.nbytes:  # one row set above the chunk size: a one-off buffer
            return like.new_empty(shape)
        if self.buffer is None:
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=like.device)
        return self.buffer[:nbytes].view(like.dtype).view(shape)


# torch 2.14 deprecates all_gather_into_tensor (a FutureWarning) for all_gather_single, which older
# torch (GPU clusters) does not have.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _gather_rows(
    out: torch.Tensor | None, piece: torch.Tensor, group: dist.ProcessGroup, staging: _Staging
) -> None:
    """out[r] = rank r's `piece` over `group`; `out` [n, rows, *tail] may be a strided view, `piece`
    [rows, *tail]. Row chunks of at most the staging buffer's size per collective. `out=None`: take
    part in the collectives only (the gathered rows are not kept)."""
    n, rows, tail = group_size(group), piece.shape[0], tuple(piece.shape[1:])
    step = max(1, staging.nbytes // max(1, n * torch.Size(tail).numel() * piece.element_size()))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        staged = staging.take((n * (stop - start), *tail), piece)
        _all_gather_single(staged, piece[start:stop].contiguous(), group=group)
        if out is not None:
            out[:, start:stop].copy_(staged.view(n, stop - start, *tail))
        del staged


@torch.no_grad()
def _gather(
    lp: LocalParam, table: MappingTable, groups: ParallelGroups, staging: _Staging, *, keep: bool
) -> list[torch.Tensor]:
    """Full HF tensors of one parameter, in `_unit_meta` order (collective over TP / expert-TP and EP).

    `keep=False` (a rank that neither yields nor forwards them): take part in the collectives without
    assembling the result, and return []; only a TP-gathered expert that the EP gather sends is built.
    Extra memory when kept: the full (TP- and EP-gathered) tensor, plus q/k/v copies for fused QKV.
    """
    full = lp.param.detach()
    tp, ep_gather = group_size(lp.tp_group), lp.mapping.is_expert and group_size(groups.ep) > 1
    if lp.mapping.split is not None and tp > 1:
        shard, start, build = full, 0, keep or ep_gather  # the EP gather sends the TP-gathered tensor
        full = shard.new_empty(
            lp.mapping.full_shape(tuple(shard.shape), tp), device=None if build else "meta"
        )
        for view in lp.mapping.tp_views(full, tp):
            rows = view.shape[1]
            _gather_rows(view if build else None, shard[start : start + rows], lp.tp_group, staging)
            start += rows
    fulls = [full]
    if ep_gather:
        stacked = full.new_empty((group_size(groups.ep), *full.shape)) if keep else None
        _gather_rows(stacked, full, groups.ep, staging)
        fulls = list(stacked.unbind(0)) if keep else []
    del full
    if not keep:
        return []
    return [out.contiguous() for full in fulls for out in lp.mapping.to_hf(full, table.dims)]


def plan_buckets(units: Sequence[Sequence[TensorMeta]], bucket_bytes: int) -> list[bool]:
    """Per tensor (units flattened): whether a new bucket starts before it.

    A unit (the HF tensors of one gathered parameter) that would overflow the open bucket starts a new
    one, so the bucket is flushed before the parameter is gathered; within a unit larger than the limit
    tensors are packed one by one (a tensor above the limit gets its own bucket).
    """
    starts, filled = [], 0
    for unit in units:
        unit_bytes = sum(map(_nbytes, unit))
        for i, meta in enumerate(unit):
            size = _nbytes(meta)
            new = filled > 0 and filled + (unit_bytes if i == 0 else size) > bucket_bytes
            starts.append(new)
            filled = size if new else filled + size
    return starts


def own_stage_plan(
    model: Any,
    hf_config: Any,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    groups: ParallelGroups | None = None,
) -> list[list[TensorMeta]]:
    """The buckets (name, shape, dtype of each tensor, in order) that `export_hf_weights(own_stage=True)`
    yields on this rank, without gathering anything (no collectives): what a receiver must expect."""
    groups = groups or ParallelGroups.from_parallel_state()
    table = mapping_table(hf_config)
    units = [
        lp for lp in local_parameters(model_chunks(model), table, groups) if lp.mapping.exported(table.dims)
    ]
    metas = [_unit_meta(lp, table, groups) for lp in units]
    buckets: list[list[TensorMeta]] = [[]]
    for new, meta in zip(plan_buckets(metas, bucket_bytes), (m for unit in metas for m in unit), strict=True):
        if new:
            buckets.append([])
        buckets[-1].append(meta)
    return [b for b in buckets if b]


def export_hf_weights(
    model: Any,
    hf_config: Any,
    *,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    dst_ranks: Sequence[int] = (0,),
    groups: ParallelGroups | None = None,
    own_stage: bool = False,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets of `(hf_name, full_tensor)`; only global ranks in `dst_ranks` get non-empty ones.

    `model`: a GPTModel or list of virtual-pipeline chunks, any TP/PP/EP/DP layout. `bucket_bytes`:
    bound on one bucket's bytes (a single larger tensor travels alone). `groups`: default megatron's
    parallel state. Every rank must exhaust the generator (it runs collectives).

    `own_stage=True`: every rank gets the tensors of its own pipeline stage only (`dst_ranks` is
    ignored); the collectives stay inside the stage (TP and EP groups), so the stages export at the same
    time and nothing crosses between them — the parallel weight sync, where one rank per stage sends.
    Every rank of one stage yields the same buckets; different stages yield different counts.
    """
    if own_stage:
        dst_ranks = (dist.get_rank(),)
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
    if own_stage:
        pp_ranks, my_stage = [me], 0
    elif len(pp_ranks) > 1:
        metas_by_stage = [None] * len(pp_ranks)
        dist.all_gather_object(metas_by_stage, stage_meta, group=groups.pp)
    flat = [meta for stage in metas_by_stage for unit in stage for meta in unit]
    names = [name for name, _, _ in flat]
    if len(set(names)) != len(names):
        duplicates = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"bridge export: HF names produced twice: {duplicates[:5]}")
    starts = iter(plan_buckets([unit for stage in metas_by_stage for unit in stage], bucket_bytes))
    staging = _Staging(min(GATHER_CHUNK_BYTES, max(1, bucket_bytes // 8)))

    is_dst = me in dst_ranks
    # destinations in my PP group at other stages: I forward my stage's tensors to them
    forward_to = [d for d in dst_ranks if d in pp_ranks and pp_ranks.index(d) != my_stage]
    device = next(chunks[0].parameters()).device
    bucket: list[tuple[str, torch.Tensor]] = []
    for stage, stage_units in enumerate(metas_by_stage):
        for unit_index, unit in enumerate(stage_units):
            new_bucket = [next(starts) for _ in unit]
            if new_bucket[0]:  # flush before gathering: the bucket and the new parameter never add up
                yield bucket
                bucket = []
            tensors: list[torch.Tensor | None] = [None] * len(unit)
            if stage == my_stage:
                # a rank that neither yields nor forwards them only takes part in the collectives
                kept = _gather(units[unit_index], table, groups, staging, keep=is_dst or bool(forward_to))
                if kept:
                    tensors = kept
                for dst in forward_to:
                    for tensor in tensors:
                        dist.send(tensor, dst)
            elif is_dst:
                tensors = []
                for _, shape, dtype in unit:
                    tensors.append(torch.empty(shape, dtype=dtype, device=device))
                    dist.recv(tensors[-1], pp_ranks[stage])
            for i, (name, _, _) in enumerate(unit):
                if i > 0 and new_bucket[i]:
                    yield bucket
                    bucket = []
                if is_dst:
                    bucket.append((name, tensors[i]))
                tensors[i] = None
            del tensors
    yield bucket
    if is_dst:
        logger.debug("bridge export: %d tensors, %.1f MiB", len(flat), sum(map(_nbytes, flat)) / 2**20)
