"""Hugging Face -> Megatron weights: load a checkpoint into a model in any TP/PP/EP layout, slices only.

    from megatron_sapo.bridge import load_hf_weights
    load_hf_weights(model_chunks, hf_config, "/ckpt/Qwen3-30B-A3B")     # dir, file, or a state dict

Each rank walks its own parameters, resolves them with the architecture's mapping table (global layer /
expert indices) and reads only its TP slice of each HF tensor through `safe_open(...).get_slice`
(memory-mapped), so no rank ever holds the whole model. Experts are read under per-expert checkpoint
names, or from fused tensors when that is what the source holds (`fused_experts.py`: transformers-5's
in-memory `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I], or the official Qwen3-VL-MoE
files' transposed ones). Errors name the missing tensor and where it was looked for, both shapes
of a mismatch, or the unsupported architecture. No communication: every rank loads independently.

Tests: `python -m pytest tests/distributed/test_bridge.py tests/unit/test_bridge_mapping.py -q`
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping as MappingABC
from typing import Any

import torch

from megatron_sapo.bridge.arch import architecture_of, mapping_table
from megatron_sapo.bridge.fused_experts import FusedExpertAliases
from megatron_sapo.bridge.layout import (
    LocalParam,
    ParallelGroups,
    group_rank,
    group_size,
    local_parameters,
    model_chunks,
)
from megatron_sapo.bridge.mapping import Index, MappingTable, Shape, TensorSource
from megatron_sapo.bridge.safetensors_io import SafetensorsReader

logger = logging.getLogger(__name__)


class StateDictSource:
    """A `TensorSource` over an in-memory `{hf_name: tensor}` dict."""

    def __init__(self, state: MappingABC[str, torch.Tensor], where: str = "the given state dict") -> None:
        self._state, self._where = state, where

    def shape(self, name: str) -> Shape | None:
        tensor = self._state.get(name)
        return None if tensor is None else tuple(tensor.shape)

    def read(self, name: str, index: Index) -> torch.Tensor:
        return self._state[name][index]

    def describe(self, name: str) -> str:
        return self._where


def open_source(
    source: str | os.PathLike | MappingABC[str, torch.Tensor] | TensorSource,
    *,
    files_transposed: bool = False,
) -> TensorSource:
    """A `TensorSource` (with fused-expert aliases) for a checkpoint path, a state dict or a source.

    `files_transposed`: checkpoint files fuse experts in the official Qwen3-VL-MoE orientation (the
    architecture's `disk_experts_transposed`); a state dict is always transformers' in-memory one.
    """
    if isinstance(source, str | os.PathLike):
        source = SafetensorsReader(source)
    elif isinstance(source, MappingABC):
        source = StateDictSource(source)
    return FusedExpertAliases(source, transposed=files_transposed and isinstance(source, SafetensorsReader))


def check_local_slice(lp: LocalParam, table: MappingTable, reader: TensorSource) -> None:
    """ValueError unless the HF tensors of parameter `lp` exist in `reader` with the expected shapes."""
    local_shape = tuple(lp.param.shape)
    if getattr(lp.param, "tensor_model_parallel", False) and lp.param.partition_dim != lp.mapping.split:
        raise ValueError(
            f"bridge: {lp.name} is split along dim {lp.param.partition_dim} by megatron but along "
            f"{lp.mapping.split} by the {table.model_type} table ({lp.mapping.megatron})"
        )
    full_shape = lp.mapping.full_shape(local_shape, group_size(lp.tp_group))
    names = lp.mapping.hf_names(lp.fields, table.dims)
    for name, expected in zip(names, table.expected_hf_shapes(lp.mapping, full_shape), strict=True):
        found = reader.shape(name)
        if found is None:
            raise ValueError(
                f"bridge: HF tensor {name!r} (for megatron {lp.name!r}) not found in {reader.describe(name)}"
            )
        if tuple(found) != tuple(expected):
            raise ValueError(
                f"bridge: HF tensor {name!r} in {reader.describe(name)} has shape {tuple(found)}, but "
                f"megatron {lp.name!r} (local {local_shape}, full {full_shape}) needs {tuple(expected)}"
            )


def read_local_slice(lp: LocalParam, table: MappingTable, reader: TensorSource) -> torch.Tensor:
    """This rank's slice of parameter `lp` (its local shape, the source's dtype) read from `reader`.

    Checks first (`check_local_slice`); `lp.param` may be a meta tensor: only its shape is used.
    """
    check_local_slice(lp, table, reader)
    local_shape = tuple(lp.param.shape)
    tp = (group_rank(lp.tp_group), group_size(lp.tp_group))
    tensor = lp.mapping.load(reader, lp.mapping.hf_names(lp.fields, table.dims), local_shape, tp, table.dims)
    if tuple(tensor.shape) != local_shape:  # a primitive bug, not a checkpoint problem
        raise RuntimeError(f"bridge: {lp.name}: loaded {tuple(tensor.shape)}, parameter is {local_shape}")
    return tensor


@torch.no_grad()
def load_hf_weights(
    model: Any,
    hf_config: Any,
    source: str | os.PathLike | MappingABC[str, torch.Tensor] | TensorSource,
    *,
    groups: ParallelGroups | None = None,
) -> None:
    """Copy this rank's slices of HF weights into every parameter of `model` (GPTModel or VPP chunks).

    `source`: checkpoint dir / safetensors file / `{hf_name: tensor}` / a `TensorSource`. `groups`:
    default megatron's parallel state. Raises ValueError for a missing tensor, a shape mismatch, a
    megatron parameter the table does not map, or an unknown architecture.
    """
    table = mapping_table(hf_config)
    groups = groups or ParallelGroups.from_parallel_state()
    reader = open_source(source, files_transposed=architecture_of(hf_config).disk_experts_transposed)
    params = local_parameters(model_chunks(model), table, groups)
    for lp in params:
        lp.param.data.copy_(read_local_slice(lp, table, reader))
    logger.info("bridge: loaded %d %s parameters", len(params), table.model_type)
