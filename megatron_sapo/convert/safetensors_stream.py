"""Streaming safetensors output: shards planned from tensor metadata, each tensor written straight to disk.

`safetensors.torch.save_file` needs a whole shard in memory. When the names, shapes and dtypes of every
tensor are known up front (they are for a checkpoint conversion), the header can be written first and
each tensor's bytes put at their place as soon as the tensor exists, so a writer holds no tensor at all::

    shards = plan_shards(metas, max_shard_bytes=2 << 30)        # [[(name, shape, dtype)], ...]
    with ShardWriter(out_dir / shard_file_name(0, len(shards)), shards[0]) as writer:
        for name, tensor in produce(shards[0]):                  # any order
            writer.write(name, tensor)
    write_index(out_dir, shards)                                 # model.safetensors.index.json (> 1 shard)

Files are byte-identical to `save_file(tensors, path, metadata={"format": "pt"})` of the same tensors
(safetensors 0.8 layout: header JSON with `__metadata__` first, tensors ordered by dtype descending then
name, header padded with spaces to 8 bytes), and shards / names / index follow
`megatron_sapo.bridge.save_safetensors_sharded`. Tests: `python -m pytest tests/e2e/test_converters.py -q`
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_sapo.bridge.safetensors_io import INDEX_FILE, SINGLE_FILE

# (name, shape, dtype) of one HF tensor.
TensorMeta = tuple[str, tuple[int, ...], torch.dtype]

# safetensors' codes, in the order of its `Dtype` enum (it sorts a file's tensors by this, descending).
_CODES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}
_RANK = {dtype: i for i, dtype in enumerate(_CODES)}


def nbytes(meta: TensorMeta) -> int:
    _, shape, dtype = meta
    return torch.Size(shape).numel() * dtype.itemsize


def plan_shards(metas: Sequence[TensorMeta], max_shard_bytes: int) -> list[list[TensorMeta]]:
    """Greedy size-bounded shards in the given order (a tensor above the bound gets a shard alone).

    The rule of `save_safetensors_sharded`: a new shard starts when the next tensor would overflow a
    non-empty one. Always at least one (possibly empty) shard.
    """
    shards: list[list[TensorMeta]] = [[]]
    filled = 0
    for meta in metas:
        size = nbytes(meta)
        if shards[-1] and filled + size > max_shard_bytes:
            shards.append([])
            filled = 0
        shards[-1].append(meta)
        filled += size
    return shards


def shard_file_name(index: int, count: int) -> str:
    """`model.safetensors` alone, else `model-00001-of-00003.safetensors` (as `save_pretrained`)."""
    return SINGLE_FILE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def write_index(out_dir: str | os.PathLike, shards: Sequence[Sequence[TensorMeta]]) -> dict[str, Any]:
    """The index `{"metadata": {"total_size"}, "weight_map"}`, written to disk when there are >= 2 shards."""
    weight_map = {
        name: shard_file_name(i, len(shards)) for i, shard in enumerate(shards) for name, _, _ in shard
    }
    total = sum(nbytes(meta) for shard in shards for meta in shard)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if len(shards) > 1:
        (Path(out_dir) / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


class ShardWriter:
    """Writes one safetensors file whose tensors are given by `metas`; `write` each of them once.

    The file is written as `<path>.tmp` and renamed on a clean `close` (a failed conversion leaves no
    file that looks complete). `write` checks name, shape and dtype against the plan.
    """

    def __init__(self, path: str | os.PathLike, metas: Sequence[TensorMeta]) -> None:
        self.path = Path(path)
        self._temp = self.path.with_name(self.path.name + ".tmp")
        entries = sorted(metas, key=lambda m: (-_RANK[m[2]], m[0]))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._slots: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in entries:
            size = nbytes((name, shape, dtype))
            header[name] = {
                "dtype": _CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            self._slots[name] = (offset, tuple(shape), dtype)
            offset += size
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        text += b" " * (-len(text) % 8)
        self._data_start = 8 + len(text)
        self._file = open(self._temp, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(struct.pack("<Q", len(text)) + text)
        self._file.truncate(self._data_start + offset)
        self._pending = set(self._slots)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Put `tensor`'s bytes at its place in the file (no copy when it is contiguous on the CPU)."""
        if name not in self._pending:
            raise ValueError(f"{self.path.name}: {name!r} is not planned for this shard or already written")
        offset, shape, dtype = self._slots[name]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ValueError(
                f"{self.path.name}: {name!r} is {tuple(tensor.shape)} {tensor.dtype}, planned {shape} {dtype}"
            )
        self._pending.discard(name)
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.seek(self._data_start + offset)
        self._file.write(memoryview(data.numpy()))

    def close(self) -> None:
        self._file.close()
        if self._pending:
            self._temp.unlink()
            raise RuntimeError(f"{self.path.name}: tensors never written: {sorted(self._pending)[:5]}")
        self._temp.replace(self.path)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
            self._temp.unlink(missing_ok=True)
