"""safetensors I/O for the bridge: sliced, memory-mapped reads of HF checkpoints; size-bounded sharded writes.

    with SafetensorsReader("/ckpt/Qwen3-0.6B") as reader:       # dir with model.safetensors[.index.json]
        reader.shape("model.norm.weight"); reader.read("lm_head.weight", (slice(0, 1024),))
    index = save_safetensors_sharded(named_tensors, "/out", max_shard_bytes=5 << 30)

The writer streams: it holds one shard at a time, names shards like `save_pretrained`
(`model-00001-of-00003.safetensors`, or a lone `model.safetensors`) and writes
`model.safetensors.index.json` (`metadata.total_size`, `weight_map`) when there is more than one shard.
Tests: `python -m pytest tests/unit/test_bridge_mapping.py -q`
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class SafetensorsReader:
    """A `TensorSource` over a checkpoint dir (index + shards, or one `model.safetensors`) or one file.

    Files are opened lazily with `safe_open` (memory-mapped) and reads go through `get_slice`, so a
    rank only touches the bytes of its slices.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        if path.is_dir():
            if (path / INDEX_FILE).exists():
                weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
                self._files = {name: path / file for name, file in weight_map.items()}
                self._where = str(path / INDEX_FILE)
            elif (path / SINGLE_FILE).exists():
                self._files = self._keys_of(path / SINGLE_FILE)
                self._where = str(path / SINGLE_FILE)
            else:
                raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {path}")
        elif path.is_file():
            self._files, self._where = self._keys_of(path), str(path)
        else:
            raise FileNotFoundError(f"no safetensors checkpoint at {path}")
        self._handles: dict[Path, Any] = {}

    @staticmethod
    def _keys_of(file: Path) -> dict[str, Path]:
        with safe_open(file, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), file)

    def _handle(self, name: str) -> Any:
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def names(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self._files:
            return None
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        handle = self._handle(name)
        return handle.get_slice(name)[index] if index else handle.get_tensor(name)

    def describe(self, name: str) -> str:
        return str(self._files.get(name, self._where))

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap when collected

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_safetensors_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 << 30,
) -> dict[str, Any]:
    """Write `(name, tensor)` pairs into shards of at most `max_shard_bytes` (or one oversized tensor).

    Returns the index (`{"metadata": {"total_size": bytes}, "weight_map": {name: file}}`), also written
    to `model.safetensors.index.json` when there are several shards. Names must be unique.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, total, written, seen = 0, 0, [], set()

    def flush() -> None:
        temp = out / f".shard-{len(written):05d}.safetensors.tmp"
        save_file(shard, str(temp), metadata={"format": "pt"})
        written.append((temp, list(shard)))
        shard.clear()

    for name, tensor in tensors:
        if name in seen:
            raise ValueError(f"save_safetensors_sharded: tensor {name!r} given twice")
        seen.add(name)
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor.detach().to("cpu").contiguous()
        shard_bytes += size
        total += size
    if shard or not written:
        flush()

    weight_map = {}
    for i, (temp, names) in enumerate(written):
        file = SINGLE_FILE if len(written) == 1 else f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        temp.replace(out / file)
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    if len(written) > 1:
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    logger.info(
        "wrote %d tensors (%.1f MiB) in %d shard(s) to %s", len(seen), total / 2**20, len(written), out
    )
    return index
