"""safetensors files, read and written in one place: header metadata, sliced reads, sharded streaming writes.

    with SafetensorsReader("/ckpt/Qwen3-0.6B") as reader:       # dir (index + shards, model.safetensors) or a file
        reader.names(); reader.header("model.norm.weight")       # TensorHeader(dtype="BF16", shape, nbytes, file)
        reader.read("lm_head.weight", (slice(0, 1024),))         # only these rows are touched
    index = save_safetensors_sharded(named_tensors, "/out", max_shard_bytes=5 << 30)

    shards = plan_shards(metas, max_shard_bytes=2 << 30)        # [[(name, shape, dtype)], ...]
    with ShardWriter(out_dir / shard_file_name(0, len(shards)), shards[0]) as writer:
        for name, tensor in produce(shards[0]):                  # any order, one tensor at a time
            writer.write(name, tensor)
    write_index(out_dir, shards)                                 # model.safetensors.index.json (> 1 shard)

Reading: names, shapes and dtypes come from the JSON headers alone (no tensor data is mapped); `read`
goes through `safe_open(...).get_slice` (memory-mapped), so a rank touches only the bytes of its slices.
`DTYPES` is the one table of safetensors dtype codes <-> torch dtypes.

Writing: `ShardWriter` writes a file whose header is planned from metadata, putting each tensor's bytes at
their place as soon as the tensor exists (a converter holds no shard); `save_safetensors_sharded` takes
`(name, tensor)` pairs, holds one shard at a time and writes it with a `ShardWriter`. Files are
byte-identical to `safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})` (safetensors 0.8
layout: header JSON with `__metadata__` first, tensors ordered by dtype descending then name, header padded
with spaces to 8 bytes). Shards are named like `save_pretrained` (`model-00001-of-00003.safetensors`, or a
lone `model.safetensors`), each written as `.tmp` and renamed when complete, and
`model.safetensors.index.json` (`metadata.total_size`, `weight_map`) is written when there are several.
A whole HF directory (shards + config / tokenizer, renamed into place) is `snapshot.py`.
Tests: `python -m pytest tests/unit/test_bridge_mapping.py -q`; `tests/e2e/test_converters.py` (streaming)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype codes, in the order of its `Dtype` enum (it sorts a file's tensors by this, descending).
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
}
CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}
_RANK = {dtype: i for i, dtype in enumerate(CODES)}

# (name, shape, dtype) of one tensor to write.
TensorMeta = tuple[str, tuple[int, ...], torch.dtype]


@dataclasses.dataclass(frozen=True)
class TensorHeader:
    """One tensor's entry in a safetensors header."""

    dtype: str
    """safetensors dtype code ("BF16"); `DTYPES.get(dtype)` is the torch dtype."""
    shape: tuple[int, ...]
    nbytes: int
    file: Path


def read_headers(file: str | os.PathLike) -> dict[str, TensorHeader]:
    """`{name: TensorHeader}` of every tensor in `file`, from its JSON header only (names sorted)."""
    file = Path(file)
    with open(file, "rb") as handle:
        head = handle.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        text = handle.read(size) if size <= file.stat().st_size - 8 else b""  # not a size: unreadable
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{file} is not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    return {
        name: TensorHeader(
            entry["dtype"], tuple(entry["shape"]), entry["data_offsets"][1] - entry["data_offsets"][0], file
        )
        for name, entry in sorted(header.items())
    }


class SafetensorsReader:
    """A `TensorSource` over a checkpoint dir or one file.

    A dir is read through its `model.safetensors.index.json`, else its `model.safetensors`, else every
    `*.safetensors` in it (as SGLang loads a dir). Headers are parsed once per file when first needed;
    data files are opened lazily with `safe_open` and kept open until `close`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        path = Path(path)
        self._headers: dict[Path, dict[str, TensorHeader]] = {}
        self._handles: dict[Path, Any] = {}
        if path.is_dir() and (path / INDEX_FILE).exists():
            weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            self._files = {name: path / file for name, file in weight_map.items()}
            self._where = str(path / INDEX_FILE)
            return
        if path.is_file():
            files = [path]
        elif not path.is_dir():
            raise FileNotFoundError(f"no safetensors checkpoint at {path}")
        elif (path / SINGLE_FILE).is_file():
            files = [path / SINGLE_FILE]
        elif not (files := sorted(path.glob("*.safetensors"))):
            raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {path}")
        self._files = {name: file for file in files for name in self._file_headers(file)}
        self._where = str(files[0] if len(files) == 1 else path)

    def _file_headers(self, file: Path) -> dict[str, TensorHeader]:
        if file not in self._headers:
            self._headers[file] = read_headers(file)
        return self._headers[file]

    def names(self) -> list[str]:
        return list(self._files)

    def header(self, name: str) -> TensorHeader | None:
        """Dtype, shape and size of `name` (None when the checkpoint has no such tensor)."""
        file = self._files.get(name)
        if file is None:
            return None
        found = self._file_headers(file).get(name)
        if found is None:
            raise ValueError(f"{self._where} puts tensor {name!r} in {file}, which does not hold it")
        return found

    def shape(self, name: str) -> tuple[int, ...] | None:
        found = self.header(name)
        return None if found is None else found.shape

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        handle = self._handles[file]
        return handle.get_slice(name)[index] if index else handle.get_tensor(name)

    def describe(self, name: str) -> str:
        return str(self._files.get(name, self._where))

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap when collected

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nbytes(meta: TensorMeta) -> int:
    _, shape, dtype = meta
    return torch.Size(shape).numel() * dtype.itemsize


def plan_shards(metas: Sequence[TensorMeta], max_shard_bytes: int) -> list[list[TensorMeta]]:
    """Greedy size-bounded shards in the given order (a tensor above the bound gets a shard alone).

    A new shard starts when the next tensor would overflow a non-empty one. Always at least one
    (possibly empty) shard.
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

    The file is written as `<path>.tmp` and renamed on a clean `close` (a failed write leaves no
    file that looks complete). `write` checks name, shape and dtype against the plan; a tensor may be
    written in row blocks (`start`).
    """

    def __init__(self, path: str | os.PathLike, metas: Sequence[TensorMeta]) -> None:
        self.path = Path(path)
        self._temp = self.path.with_name(self.path.name + ".tmp")
        for name, _, dtype in metas:
            if dtype not in CODES:
                raise ValueError(f"{self.path.name}: {name!r} is {dtype}, which safetensors does not store")
        entries = sorted(metas, key=lambda m: (-_RANK[m[2]], m[0]))
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._slots: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, shape, dtype in entries:
            size = nbytes((name, shape, dtype))
            header[name] = {
                "dtype": CODES[dtype],
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
        self._rows: dict[str, set[int]] = {}  # rows written so far of tensors written in parts

    def write(self, name: str, tensor: torch.Tensor, *, start: int | None = None) -> None:
        """Put `tensor`'s bytes at its place in the file (no copy when it is contiguous on the CPU).

        `start`: `tensor` holds rows `start : start + len(tensor)` (dim 0) of the planned tensor, which
        is complete once each of its rows is written (a fused expert tensor filled expert by expert).
        """
        if name not in self._pending:
            raise ValueError(f"{self.path.name}: {name!r} is not planned for this shard or already written")
        offset, shape, dtype = self._slots[name]
        rows = range(start, start + len(tensor)) if start is not None and tensor.dim() and shape else None
        expected = shape if start is None else None if rows is None else (len(rows), *shape[1:])
        if tuple(tensor.shape) != expected or tensor.dtype != dtype or (rows and rows.stop > shape[0]):
            at = "" if start is None else f" at row {start}"
            raise ValueError(
                f"{self.path.name}: {name!r} is {tuple(tensor.shape)} {tensor.dtype}{at}, planned {shape} {dtype}"
            )
        if rows is not None:
            done = self._rows.setdefault(name, set())
            if done.intersection(rows):
                raise ValueError(
                    f"{self.path.name}: rows {rows.start}..{rows.stop - 1} of {name!r} written twice"
                )
            done.update(rows)
            offset += start * torch.Size(shape[1:]).numel() * dtype.itemsize
        if start is None or len(self._rows[name]) == shape[0]:
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


def save_safetensors_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 << 30,
) -> dict[str, Any]:
    """Write `(name, tensor)` pairs into shards of at most `max_shard_bytes` (or one oversized tensor).

    Holds one shard (CPU copies) at a time. Returns the index (`{"metadata": {"total_size": bytes},
    "weight_map": {name: file}}`), also written to `model.safetensors.index.json` when there are several
    shards. Names must be unique.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[TensorMeta]] = []
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = 0

    def flush() -> None:
        metas = [(name, tuple(t.shape), t.dtype) for name, t in shard.items()]
        with ShardWriter(out / f".shard-{len(shards):05d}", metas) as writer:
            for name, tensor in shard.items():
                writer.write(name, tensor)
        shards.append(metas)
        shard.clear()

    seen: set[str] = set()
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
    if shard or not shards:
        flush()

    for i in range(len(shards)):
        (out / f".shard-{i:05d}").replace(out / shard_file_name(i, len(shards)))
    index = write_index(out, shards)
    logger.info(
        "wrote %d tensors (%.1f MiB) in %d shard(s) to %s",
        len(seen),
        index["metadata"]["total_size"] / 2**20,
        len(shards),
        out,
    )
    return index
