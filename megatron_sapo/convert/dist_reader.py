"""Read single slices of a megatron torch_dist checkpoint without building a model.

A torch_dist checkpoint (`iter_XXXXXXX/`: `.metadata` + `__<rank>_<i>.distcp`) stores each sharded key
as a global tensor cut into chunks (whatever layout saved it). This reader answers "the block at these
global offsets of that key" by planning torch.distributed.checkpoint reads for exactly the chunks that
overlap it, with no collectives and no other tensor in memory::

    reader = DistCheckpointReader("/ckpt/mcore/iter_0000000")
    reader.tensors()["decoder.layers.self_attention.linear_qkv.weight"]   # (global shape, dtype)
    qkv_3 = reader.read("decoder.layers.self_attention.linear_qkv.weight", (3, 0, 0), (1, 4096, 4096))

Memory per read: the block, plus one stored chunk at a time while it is copied in (torch.load).
Tests: `python -m pytest tests/e2e/test_converters.py -q`
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list


class _BlockPlanner(LoadPlanner):
    """Plans the reads of one block `[offsets, offsets + dest.shape)` of one key into `dest`."""

    def __init__(self, key: str, offsets: Sequence[int], dest: torch.Tensor) -> None:
        self.key, self.offsets, self.dest = key, torch.Size(offsets), dest

    def set_up_planner(
        self, state_dict: dict, metadata: Metadata | None = None, is_coordinator: bool = False
    ):
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        stored = self.metadata.state_dict_metadata[self.key]
        block = ChunkStorageMetadata(offsets=self.offsets, sizes=self.dest.shape)
        return LoadPlan(create_read_items_for_chunk_list(self.key, stored, [block]))

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise RuntimeError(f"unexpected non-tensor read of {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        index = tuple(slice(o, o + n) for o, n in zip(read_item.dest_offsets, read_item.lengths, strict=True))
        return self.dest[index]

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # resolve_tensor returned a view of `dest`: the data is already in place


class DistCheckpointReader:
    """Block reads from one torch_dist checkpoint directory (its metadata is parsed once)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._storage = FileSystemReader(str(self.path))
        self._metadata = self._storage.read_metadata()
        self._storage.set_up_storage_reader(self._metadata, True)
        self._tensors = {
            key: (tuple(md.size), md.properties.dtype)
            for key, md in self._metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }

    def tensors(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """`{key: (global shape, dtype)}` of the stored tensors (not the byte objects), in stored order."""
        return dict(self._tensors)

    def read(self, key: str, offsets: Sequence[int], sizes: Sequence[int]) -> torch.Tensor:
        """The block `key[offsets[0] : offsets[0] + sizes[0], ...]` of the global tensor, `sizes` shaped."""
        if key not in self._tensors:
            raise KeyError(f"{self.path}: no tensor {key!r} in the checkpoint")
        shape, dtype = self._tensors[key]
        if len(offsets) != len(shape) or any(
            o + s > n for o, s, n in zip(offsets, sizes, shape, strict=True)
        ):
            raise ValueError(f"{key}: block at {tuple(offsets)} of size {tuple(sizes)} is outside {shape}")
        dest = torch.empty(tuple(sizes), dtype=dtype)
        planner = _BlockPlanner(key, offsets, dest)
        planner.set_up_planner({}, self._metadata, True)
        plan = self._storage.prepare_global_plan(
            [self._storage.prepare_local_plan(planner.create_local_plan())]
        )
        self._storage.read_data(planner.finish_plan(plan[0]), planner).wait()
        return dest
