"""Mapping primitives between one megatron parameter and its Hugging Face tensor(s), and a table of them.

Each primitive pairs a megatron name template with HF name template(s) and knows three things:
its TP split axis (`split`), how to turn the full (TP-gathered) megatron tensor into HF tensors
(`to_hf`, export) and how to read only this TP rank's slice from HF tensors (`load`, import):

    Direct("decoder.final_layernorm.weight", "model.norm.weight")                 # replicated
    Direct("decoder.layers.{layer}.self_attention.linear_proj.weight",
           "model.layers.{layer}.self_attn.o_proj.weight", split=1)              # row-parallel
    VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight")  # rows padded to V_pad
    FusedQKV(megatron, q, k, v)      # GQA: rows grouped per KV head as [q heads of the group, k, v]
    GatedMLP(megatron, gate, up)     # SwiGLU fc1 = [gate; up]; each TP rank holds [gate_r; up_r]

Templates use `{layer}` (global decoder layer index), `{expert}` (global expert index) and `{block}` (an
index taken as is, e.g. a vision block: not renumbered by the pipeline layout); a template with
`{expert}` is an expert weight: split over the expert-TP group and gathered over EP by the callers.
Architecture tables (`megatron_sapo/bridge/arch/`) are tuples of these; `MappingTable` matches names.
No process groups here: `export.py` / `load.py` do the communication.

Tests: `python -m pytest tests/unit/test_bridge_mapping.py -q`
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import Any, Protocol

import torch

Index = tuple[slice, ...]
Shape = tuple[int, ...]


class TensorSource(Protocol):
    """Read access to HF tensors by name, sliced (safetensors files, an in-memory state dict)."""

    def shape(self, name: str) -> Shape | None:
        """Full shape of `name`, or None when the source has no such tensor."""

    def read(self, name: str, index: Index) -> torch.Tensor:
        """`tensor[index]` without materialising the rest (`index`: one slice per leading dim)."""

    def describe(self, name: str) -> str:
        """Where `name` is (or would be) looked up, for error messages."""


@dataclasses.dataclass(frozen=True)
class ModelDims:
    """The HF config numbers the primitives need (head layout, unpadded vocab, tying)."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int
    """Unpadded HF vocab; megatron rows >= it are padding."""
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelDims:
        heads = hf_config.num_attention_heads
        return cls(
            num_attention_heads=heads,
            num_query_groups=hf_config.num_key_value_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
            vocab_size=hf_config.vocab_size,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        )


def _rows(start: int, stop: int) -> Index:
    return (slice(start, stop),)


def _along(dim: int, start: int, stop: int) -> Index:
    return (slice(None),) * dim + (slice(start, stop),)


def _stack(shards: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    return shards if isinstance(shards, torch.Tensor) else torch.stack(list(shards))


@functools.cache
def _compile(template: str) -> re.Pattern[str]:
    pattern = re.escape(template)
    for field in ("layer", "expert", "block"):
        pattern = pattern.replace(re.escape("{" + field + "}"), rf"(?P<{field}>\d+)")
    return re.compile(pattern + "$")


@dataclasses.dataclass(frozen=True)
class Mapping:
    """Base primitive: megatron template <-> HF templates, TP split axis `split` (None: replicated)."""

    megatron: str
    hf: tuple[str, ...]
    split: int | None

    @property
    def is_expert(self) -> bool:
        return "{expert}" in self.megatron

    def match(self, megatron_name: str) -> dict[str, int] | None:
        """The template fields (`layer`, `expert`) of `megatron_name`, or None when it doesn't match."""
        found = _compile(self.megatron).match(megatron_name)
        return None if found is None else {k: int(v) for k, v in found.groupdict().items()}

    def hf_names(self, fields: dict[str, int], dims: ModelDims) -> list[str]:
        """HF names read by `load` (and written by `to_hf`) for these template fields."""
        return [name.format(**fields) for name in self.hf]

    def exported(self, dims: ModelDims) -> bool:
        """False when the HF checkpoint has no tensor of its own for this parameter (tied output)."""
        return True

    def tp_views(self, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
        """Where the TP ranks' shards sit in the full megatron tensor: views `[tp, rows_i, *tail_i]` of
        `full`, one per consecutive dim-0 block i of a shard (the same blocks on every rank); slot r of
        view i holds block i of TP rank r's shard. Export gathers straight into them."""
        return [full.unflatten(self.split, (tp, -1)).movedim(self.split, 0)]

    def merge_tp(self, shards: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """The full megatron tensor from the TP ranks' shards, stacked `[tp, *shard]` (or a list) in TP
        rank order (the inverse of `tp_views`)."""
        stacked = _stack(shards)
        if self.split is None:
            return stacked[0]
        full = stacked.new_empty(self.full_shape(tuple(stacked.shape[1:]), stacked.shape[0]))
        start = 0
        for view in self.tp_views(full, stacked.shape[0]):
            rows = view.shape[1]
            view.copy_(stacked[:, start : start + rows].reshape(view.shape))
            start += rows
        return full

    def to_hf(self, full: torch.Tensor, dims: ModelDims) -> list[torch.Tensor]:
        """HF tensors (in `hf` order) from the full megatron tensor. Works on meta tensors (shapes)."""
        raise NotImplementedError

    def load(
        self, source: TensorSource, names: list[str], local_shape: Shape, tp: tuple[int, int], dims: ModelDims
    ) -> torch.Tensor:
        """This TP rank's megatron shard (`local_shape`) read from `names`; `tp` = (rank, size)."""
        raise NotImplementedError

    def full_shape(self, local_shape: Shape, tp_size: int) -> Shape:
        if self.split is None:
            return tuple(local_shape)
        return tuple(n * tp_size if d == self.split else n for d, n in enumerate(local_shape))


@dataclasses.dataclass(frozen=True, init=False)
class Direct(Mapping):
    """One megatron tensor is one HF tensor; TP splits it evenly along `split` (0 column, 1 row)."""

    def __init__(self, megatron: str, hf: str, *, split: int | None = None) -> None:
        super().__init__(megatron, (hf,), split)

    def to_hf(self, full: torch.Tensor, dims: ModelDims) -> list[torch.Tensor]:
        return [full]

    def load(self, source, names, local_shape, tp, dims):
        if self.split is None:
            return source.read(names[0], ())
        rank, n = tp[0], local_shape[self.split]
        return source.read(names[0], _along(self.split, rank * n, (rank + 1) * n))


@dataclasses.dataclass(frozen=True, init=False)
class VocabParallel(Mapping):
    """Embedding / output rows, vocab-parallel over TP (dim 0), padded with zero rows to V_pad.

    `tied_to`: the HF name to read instead when the config ties embeddings; the tied output then
    exports nothing (HF checkpoints of tied models carry only `model.embed_tokens.weight`).
    """

    tied_to: str | None = None

    def __init__(self, megatron: str, hf: str, *, tied_to: str | None = None) -> None:
        super().__init__(megatron, (hf,), 0)
        object.__setattr__(self, "tied_to", tied_to)

    def hf_names(self, fields, dims):
        return [self.tied_to] if self.tied_to and dims.tie_word_embeddings else super().hf_names(fields, dims)

    def exported(self, dims: ModelDims) -> bool:
        return not (self.tied_to and dims.tie_word_embeddings)

    def to_hf(self, full, dims):
        return [full[: dims.vocab_size]]

    def load(self, source, names, local_shape, tp, dims):
        rows = local_shape[0]
        start, stop = tp[0] * rows, min((tp[0] + 1) * rows, dims.vocab_size)
        real = source.read(names[0], _rows(start, max(start, stop)))
        pad = real.new_zeros(rows - real.shape[0], *real.shape[1:])
        return torch.cat([real, pad])


@dataclasses.dataclass(frozen=True, init=False)
class FusedQKV(Mapping):
    """megatron `linear_qkv` ([G·(n+2)·d, H] weight or [G·(n+2)·d] bias) <-> HF q/k/v projections.

    Rows are grouped per KV head g: [q heads g·n .. g·n+n-1, k head g, v head g] (n = heads / G),
    matching HF's repeat_kv; TP rank r holds groups [r·G/tp, (r+1)·G/tp), a contiguous row block.
    """

    def __init__(self, megatron: str, q: str, k: str, v: str) -> None:
        super().__init__(megatron, (q, k, v), 0)

    def to_hf(self, full, dims):
        groups, d = dims.num_query_groups, dims.head_dim
        n = dims.num_attention_heads // groups
        grouped = full.reshape(groups, n + 2, d, *full.shape[1:])
        tail = full.shape[1:]
        return [
            grouped[:, :n].reshape(groups * n * d, *tail),
            grouped[:, n].reshape(groups * d, *tail),
            grouped[:, n + 1].reshape(groups * d, *tail),
        ]

    def load(self, source, names, local_shape, tp, dims):
        rank, size = tp
        d, local_groups = dims.head_dim, dims.num_query_groups // size
        n = dims.num_attention_heads // dims.num_query_groups
        g0, g1 = rank * local_groups, (rank + 1) * local_groups
        q = source.read(names[0], _rows(g0 * n * d, g1 * n * d))
        k, v = (source.read(name, _rows(g0 * d, g1 * d)) for name in names[1:])
        tail = q.shape[1:]
        parts = [q.reshape(local_groups, n, d, *tail)] + [
            t.reshape(local_groups, 1, d, *tail) for t in (k, v)
        ]
        return torch.cat(parts, dim=1).reshape(-1, *tail)


@dataclasses.dataclass(frozen=True, init=False)
class GatedMLP(Mapping):
    """SwiGLU `linear_fc1` [2I, H] = [gate; up] <-> HF gate_proj / up_proj [I, H] each.

    Column-parallel per half: TP rank r holds [gate rows of r; up rows of r], not a contiguous block.
    """

    def __init__(self, megatron: str, gate: str, up: str) -> None:
        super().__init__(megatron, (gate, up), 0)

    def tp_views(self, full, tp):
        # a rank holds [gate_r; up_r]: its gate block goes to the gate half, its up block to the up half
        return list(full.view(2, tp, -1, *full.shape[1:]))

    def to_hf(self, full, dims):
        return list(full.chunk(2, dim=0))

    def load(self, source, names, local_shape, tp, dims):
        rows = local_shape[0] // 2
        index = _rows(tp[0] * rows, (tp[0] + 1) * rows)
        return torch.cat([source.read(name, index) for name in names], dim=0)


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A megatron parameter name resolved against a table: its mapping and global template fields."""

    mapping: Mapping
    fields: dict[str, int]


class MappingTable:
    """An architecture's mappings bound to its `ModelDims`; resolves megatron names (first match)."""

    def __init__(self, model_type: str, mappings: Sequence[Mapping], dims: ModelDims) -> None:
        self.model_type, self.mappings, self.dims = model_type, tuple(mappings), dims

    def resolve(self, megatron_name: str) -> Resolved:
        """The mapping of a megatron name with *global* layer / expert indices; KeyError if none."""
        for mapping in self.mappings:
            fields = mapping.match(megatron_name)
            if fields is not None:
                return Resolved(mapping, fields)
        raise KeyError(
            f"{self.model_type}: no bridge mapping for megatron parameter {megatron_name!r} "
            f"(add it to megatron_sapo/bridge/arch/{self.model_type}.py)"
        )

    def expected_hf_shapes(self, mapping: Mapping, full_shape: Shape) -> list[Shape]:
        """HF tensor shapes for a full megatron shape, from `to_hf` on a meta tensor."""
        meta = torch.empty(full_shape, device="meta")
        return [tuple(t.shape) for t in mapping.to_hf(meta, self.dims)]
