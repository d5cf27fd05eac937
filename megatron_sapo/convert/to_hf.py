"""Megatron distributed checkpoint -> Hugging Face safetensors, streamed: no model, one tensor at a time.

    megatron_to_hf("/ckpt/Qwen3-8B-mcore", "/ckpt/Qwen3-8B-back")   # 1 process, or every rank of a job

The checkpoint's `.metadata` lists every sharded key with its global shape: megatron stores a
parameter of decoder layer l as `decoder.layers.<name>[l]` (a leading layer axis; heterogeneous
layers keep `decoder.layers.<l>.<name>`) and routed expert e as `...mlp.experts.experts.<name>[.., e]`
(an expert axis), whatever TP / PP / EP layout saved it. Each such (key, layer, expert) block is one
full megatron tensor (TP-merged: fused QKV grouped per KV head, SwiGLU fc1 = [gate; up], vocab padded),
so the architecture's bridge table turns it into HF tensors with the same `to_hf` that weight export
uses. The HF tensors are planned (names, shapes, output dtype, shards) from the metadata alone, shards
are dealt round-robin over the ranks, and every rank writes its shards tensor by tensor
(`bridge.safetensors_io.ShardWriter`): a rank holds one megatron tensor and its HF views at a time, never
a shard. Rank 0 then writes the index and copies config / tokenizer / processor files.

Where the source architecture's files fuse each layer's experts (official Qwen3-VL-MoE:
`gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`, `bridge/fused_experts.py`), the per-expert tensors are
written as those fused tensors instead, one expert's slice at a time: still one megatron tensor (one
expert) in memory, never a layer's experts.

Works with or without torch.distributed (no megatron parallel state is used). Output: tensors
bit-identical to exporting a loaded model, files byte-identical to `save_file`.
Tests: `python -m pytest tests/e2e/test_converters.py tests/e2e/test_vlm_converters.py -q`
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_sapo.bridge import architecture_of, mapping_table
from megatron_sapo.bridge.fused_experts import official_fused_experts
from megatron_sapo.bridge.mapping import Mapping, MappingTable
from megatron_sapo.bridge.safetensors_io import (
    ShardWriter,
    TensorMeta,
    nbytes,
    plan_shards,
    shard_file_name,
    write_index,
)
from megatron_sapo.bridge.snapshot import copy_assets
from megatron_sapo.convert.assets import load_hf_config, read_metadata
from megatron_sapo.convert.dist_reader import DistCheckpointReader
from megatron_sapo.convert.layout import ConversionError
from megatron_sapo.megatron.checkpoint import TRACKER_FILE, checkpoint_path

logger = logging.getLogger(__name__)

_LAYERS = "decoder.layers."
_FIXED_LAYER = re.compile(r"^(\d+)\.(.+)$")
# megatron's sharded key of a routed expert (SequentialMLP and TE grouped GEMM alike) vs its parameter.
_EXPERTS_KEY, _EXPERT_PARAM = "mlp.experts.experts.", "mlp.experts.local_experts.{expert}."


@dataclasses.dataclass(frozen=True)
class Unit:
    """One full megatron tensor: block `index` (layer / expert axes) of checkpoint `key`, and its HF tensors."""

    key: str
    index: tuple[int, ...]
    shape: tuple[int, ...]
    """Full megatron shape (the stored global shape without the stacked axes)."""
    mapping: Mapping
    hf: tuple[TensorMeta, ...]
    order: tuple[int, ...]


def _blocks(key: str, shape: tuple[int, ...]) -> Iterator[tuple[str, tuple[int, ...], dict[str, int]]]:
    """(megatron parameter name, stacked-axis index, fields) of every full tensor stored under `key`."""
    if not key.startswith(_LAYERS):
        yield key, (), {}
        return
    rest, fixed = key[len(_LAYERS) :], None
    if found := _FIXED_LAYER.match(rest):
        fixed, rest = int(found[1]), found[2]
    axes = [] if fixed is not None else ["layer"]
    if rest.startswith(_EXPERTS_KEY):
        rest, axes = _EXPERT_PARAM + rest[len(_EXPERTS_KEY) :], [*axes, "expert"]
    for index in itertools.product(*(range(n) for n in shape[: len(axes)])):
        fields = dict(zip(axes, index, strict=True))
        layer = fixed if fixed is not None else fields["layer"]
        yield _LAYERS + f"{layer}." + rest.format(expert=fields.get("expert")), index, fields


def plan_units(
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype]], table: MappingTable, dtype: torch.dtype
) -> list[Unit]:
    """Every exported full tensor of the checkpoint, in HF order: embedding, layer by layer (experts in
    order), then the rest. `tensors`: the checkpoint's `{key: (global shape, dtype)}`; `dtype`: output."""
    position = {id(mapping): i for i, mapping in enumerate(table.mappings)}
    units = []
    for key, (shape, _) in tensors.items():
        for name, index, _ in _blocks(key, shape):
            try:
                resolved = table.resolve(name)
            except KeyError as err:
                raise ConversionError(f"checkpoint tensor {key!r}: {err.args[0]}") from None
            mapping, fields = resolved.mapping, resolved.fields
            if not mapping.exported(table.dims):
                continue
            full = shape[len(index) :]
            hf = tuple(
                (hf_name, tuple(hf_shape), dtype)
                for hf_name, hf_shape in zip(
                    mapping.hf_names(fields, table.dims), table.expected_hf_shapes(mapping, full), strict=True
                )
            )
            stage = 0 if key.startswith("embedding.") else 1 if key.startswith(_LAYERS) else 2
            order = (stage, fields.get("layer", -1), fields.get("expert", -1), position[id(mapping)])
            units.append(Unit(key, index, full, mapping, hf, order))
    return sorted(units, key=lambda unit: unit.order)


def _converted(reader: DistCheckpointReader, unit: Unit, table: MappingTable) -> list[torch.Tensor]:
    """The HF tensors of `unit`, read and converted (one full megatron tensor in memory)."""
    full = reader.read(
        unit.key, (*unit.index, *(0 for _ in unit.shape)), (*(1 for _ in unit.index), *unit.shape)
    )
    full = full.view(unit.shape)
    return [
        t.to(dtype).contiguous()
        for t, (_, _, dtype) in zip(unit.mapping.to_hf(full, table.dims), unit.hf, strict=True)
    ]


class _UnitTensors:
    """Serves HF tensors by name, holding only the unit converted last: a unit's HF tensors are
    consecutive in a shard, so each unit is read once per shard."""

    def __init__(self, reader: DistCheckpointReader, table: MappingTable, unit_of: dict[str, Unit]) -> None:
        self.reader, self.table, self.unit_of = reader, table, unit_of
        self.last: Unit | None = None
        self.tensors: dict[str, torch.Tensor] = {}

    def take(self, name: str) -> torch.Tensor:
        unit = self.unit_of[name]
        if unit is not self.last:
            self.tensors.clear()  # leftovers of the previous unit belong to another shard
            converted = _converted(self.reader, unit, self.table)
            self.tensors.update(zip((n for n, _, _ in unit.hf), converted, strict=True))
            self.last = unit
        return self.tensors.pop(name)


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _checkpoint_dir(megatron_dir: Path) -> Path:
    tracker = megatron_dir / TRACKER_FILE
    if not tracker.is_file():
        raise ConversionError(
            f"no {TRACKER_FILE} in {megatron_dir}: the checkpoint was not written completely"
        )
    path = checkpoint_path(megatron_dir, int(tracker.read_text().strip()))
    if not (path / ".metadata").is_file():
        raise ConversionError(f"{path} is not a complete torch_dist checkpoint (no .metadata)")
    return path


def megatron_to_hf(
    megatron_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 2 << 30,
    progress: bool = True,
) -> Path:
    """Convert a `hf_to_megatron` output back to a HF checkpoint dir `out_dir`.

    Call on every rank of the job (or without torch.distributed): shards are split among the ranks.
    `max_shard_bytes`: bound on one safetensors shard; `progress`: a tqdm bar of rank 0's bytes.
    Returns `out_dir`.
    """
    rank, world = _rank_world()
    out, source = Path(out_dir), Path(megatron_dir)
    problem = [None]
    if rank == 0 and out.is_dir() and any(out.glob("*.safetensors")):
        problem[0] = f"--output-dir {out} already holds *.safetensors weights; choose an empty directory"
    if world > 1:
        dist.broadcast_object_list(problem, src=0)  # rank 0's view of the directory decides for all
    if problem[0]:
        raise ConversionError(problem[0])
    meta = read_metadata(source)
    hf_config = load_hf_config(source)
    dtype = getattr(torch, meta["dtype"])
    table = mapping_table(hf_config)
    reader = DistCheckpointReader(_checkpoint_dir(source))
    units = plan_units(reader.tensors(), table, dtype)
    files, fused = [hf for unit in units for hf in unit.hf], {}
    if architecture_of(hf_config).disk_experts_transposed:  # official Qwen3-VL-MoE: experts fused per layer
        files, fused = official_fused_experts(files)
    shards = plan_shards(files, max_shard_bytes)
    unit_of = {name: unit for unit in units for name, _, _ in unit.hf}
    mine = range(rank, len(shards), world)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(
        total=sum(nbytes(m) for i in mine for m in shards[i]),
        unit="B",
        unit_scale=True,
        desc=f"export (rank 0 of {world})",
        disable=not progress or rank != 0,
    )
    for i in mine:
        with ShardWriter(out / shard_file_name(i, len(shards)), shards[i]) as writer:
            take = _UnitTensors(reader, table, unit_of).take
            for hf in shards[i]:
                if hf[0] in fused:  # written expert by expert: one expert's tensors in memory
                    for e, names in enumerate(fused[hf[0]].parts):
                        writer.write(hf[0], fused[hf[0]].block([take(n) for n in names]), start=e)
                else:
                    writer.write(hf[0], take(hf[0]))
                bar.update(nbytes(hf))
            del take
    bar.close()
    if world > 1:
        dist.barrier()  # every shard is on disk before the index names it
    if rank == 0:
        index = write_index(out, shards)
        copy_assets(source, out)
        written = len(index["weight_map"])
        if written != meta["hf_tensors"]:
            logger.warning("exported %d tensors, the source checkpoint had %d", written, meta["hf_tensors"])
        logger.info("converted %s -> %s (%d tensors, %d shards)", source, out, written, len(shards))
    if world > 1:
        dist.barrier()
    return out
