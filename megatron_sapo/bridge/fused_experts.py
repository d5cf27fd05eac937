"""Routed experts: per-expert HF tensors <-> one layer's experts fused into two checkpoint tensors.

The mapping tables name every expert on its own (`...mlp.experts.{e}.gate_proj.weight` [I, H],
`up_proj` [I, H], `down_proj` [H, I]: what SGLang's weight update takes). Checkpoints may instead fuse
the E experts of a layer (I = moe_intermediate_size, H = hidden size):
- transformers 5 in memory (`model.state_dict()`): `mlp.experts.gate_up_proj [E, 2I, H]` (gate rows,
  then up rows), `mlp.experts.down_proj [E, H, I]`;
- official Qwen3-VL-MoE files (`Architecture.disk_experts_transposed`): `gate_up_proj [E, H, 2I]`
  (gate columns, then up), `down_proj [E, I, H]` — the in-memory tensors with dims 1 and 2 swapped.

Reading: `FusedExpertAliases` answers per-expert names from fused tensors (either orientation), slice
by slice. Writing (the official orientation, `convert/to_hf.py`): `official_fused_experts` plans which
fused tensors replace the per-expert ones of a checkpoint, and `FusedTensor.block` builds expert e's
slice `fused[e]` from its per-expert tensors, so a writer fills a fused tensor one expert at a time::

    files, fused = official_fused_experts(per_expert_metas)     # metas: (name, shape, dtype)
    for e, names in enumerate(fused[name].parts):
        writer.write(name, fused[name].block([tensors[n] for n in names]), start=e)

Tests: `python -m pytest tests/unit/test_bridge_mapping.py -q`; tests/e2e/test_vlm_converters.py
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Sequence

import torch

from megatron_sapo.bridge.mapping import Index, Shape, TensorSource

PER_EXPERT = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
# the fused tensor of each per-expert projection, and the projections concatenated (rows) into it
_FUSED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
PARTS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
"""Each fused tensor's per-expert projections, in the order they are concatenated."""
FUSED_SUFFIXES = tuple(f".mlp.experts.{fused}" for fused in PARTS)
"""Name endings of a layer's fused expert tensors."""

TensorMeta = tuple[str, tuple[int, ...], torch.dtype]


class FusedExpertAliases:
    """A `TensorSource` that also answers per-expert names from fused expert tensors.

    Fused layouts: transformers-5 in memory `gate_up_proj [E, 2I, H]` (gate rows, then up rows),
    `down_proj [E, H, I]`; with `transposed`, the official Qwen3-VL-MoE files `[E, H, 2I]` / `[E, I, H]`.
    A per-expert name reads `[I, H]` (gate / up) or `[H, I]` (down), as HF's per-expert linears.
    """

    def __init__(self, base: TensorSource, *, transposed: bool = False) -> None:
        self.base, self.transposed = base, transposed

    def _alias(self, name: str) -> tuple[str, int, str, Shape] | None:
        found = PER_EXPERT.match(name)
        if found is None or self.base.shape(name) is not None:
            return None
        proj = found["proj"]
        fused = f"{found['prefix']}.{_FUSED[proj]}"
        shape = self.base.shape(fused)
        if shape is None:
            return None
        # the per-expert view's [rows, cols], whatever the stored orientation
        rows, cols = (shape[2], shape[1]) if self.transposed else (shape[1], shape[2])
        return fused, int(found["expert"]), proj, (shape[0], rows, cols)

    def shape(self, name: str) -> Shape | None:
        alias = self._alias(name)
        if alias is None:
            return self.base.shape(name)
        _, _, proj, (_, rows, cols) = alias
        return (rows, cols) if proj == "down_proj" else (rows // 2, cols)

    def read(self, name: str, index: Index) -> torch.Tensor:
        alias = self._alias(name)
        if alias is None:
            return self.base.read(name, index)
        fused, expert, proj, (_, rows, _) = alias
        row_count = rows if proj == "down_proj" else rows // 2
        offset = row_count if proj == "up_proj" else 0  # gate_up: [gate rows; up rows]
        index = tuple(index) + (slice(None),) * (2 - len(index))
        start, stop, step = index[0].indices(row_count)
        row_index = slice(start + offset, stop + offset, step)
        if self.transposed:  # rows of the view are the stored tensor's last dim
            return self.base.read(fused, (slice(expert, expert + 1), index[1], row_index))[0].T.contiguous()
        return self.base.read(fused, (slice(expert, expert + 1), row_index, index[1]))[0]

    def describe(self, name: str) -> str:
        return self.base.describe(name)


@dataclasses.dataclass(frozen=True)
class FusedTensor:
    """One layer's experts of one projection fused in the official orientation, and its parts."""

    name: str
    """`...mlp.experts.gate_up_proj` ([E, H, 2I]) or `...mlp.experts.down_proj` ([E, I, H])."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: tuple[tuple[str, ...], ...]
    """Per expert e (in order): the per-expert names whose rows make up `fused[e]` transposed."""

    def block(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """`fused[e : e + 1]` [1, *shape[1:]] from expert e's per-expert tensors (in `parts[e]` order)."""
        return torch.cat(list(tensors), dim=0).T.contiguous()[None]


def official_fused_experts(metas: Sequence[TensorMeta]) -> tuple[list[TensorMeta], dict[str, FusedTensor]]:
    """The tensors of a checkpoint file set whose per-expert tensors are fused per layer (official layout).

    `metas`: the per-expert checkpoint's tensors in order. Returns (the files' tensors: the same order,
    each fused tensor where its expert 0 was, its other parts dropped; {fused name: FusedTensor}).
    ValueError when a layer's experts are not 0..E-1, each with all its projections of equal shapes.
    """
    members: dict[str, dict[int, dict[str, TensorMeta]]] = {}
    files: list[TensorMeta] = []
    for meta in metas:
        found = PER_EXPERT.match(meta[0])
        if found is None:
            files.append(meta)
            continue
        fused = f"{found['prefix']}.{_FUSED[found['proj']]}"
        if fused not in members:
            members[fused] = {}
            files.append((fused, (), meta[2]))  # a placeholder, shaped below
        members[fused].setdefault(int(found["expert"]), {})[found["proj"]] = meta
    table: dict[str, FusedTensor] = {}
    for fused, experts in members.items():
        projs = PARTS[fused.rsplit(".", 1)[1]]
        if sorted(experts) != list(range(len(experts))) or any(
            set(e) != set(projs) for e in experts.values()
        ):
            raise ValueError(f"{fused}: experts {sorted(experts)} do not each have {projs} (need 0..E-1)")
        every = {tuple(e[p][1] for p in projs) for e in experts.values()}
        dtypes = {e[p][2] for e in experts.values() for p in projs}
        shapes = next(iter(every))
        if (
            len(every) > 1
            or len(dtypes) > 1
            or {len(s) for s in shapes} != {2}
            or len({s[1] for s in shapes}) > 1
        ):
            raise ValueError(f"{fused}: per-expert tensors differ in shape or dtype ({every}, {dtypes})")
        rows, cols = sum(s[0] for s in shapes), shapes[0][1]
        table[fused] = FusedTensor(
            fused,
            (len(experts), cols, rows),
            dtypes.pop(),
            tuple(tuple(experts[e][p][0] for p in projs) for e in range(len(experts))),
        )
    return [(m[0], table[m[0]].shape, m[2]) if m[0] in table else m for m in files], table


def fuse_stream(
    named: Iterable[tuple[str, torch.Tensor]], num_experts: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """A per-expert tensor stream (an export's) with each layer's experts fused in the official orientation.

    Every other tensor passes through in order; a fused tensor is yielded when its last expert part
    arrives, so at most the layers in flight are held (an export sends one layer's experts together).
    ValueError when the stream ends with a layer's experts incomplete.
    """
    pending: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for name, tensor in named:
        found = PER_EXPERT.match(name)
        if found is None:
            yield name, tensor
            continue
        fused = f"{found['prefix']}.{_FUSED[found['proj']]}"
        parts = pending.setdefault(fused, {})
        parts[(int(found["expert"]), found["proj"])] = tensor
        projs = PARTS[fused.rsplit(".", 1)[1]]
        if len(parts) == num_experts * len(projs):
            del pending[fused]
            blocks = [torch.cat([parts[(e, p)] for p in projs], dim=0).T for e in range(num_experts)]
            yield fused, torch.stack(blocks).contiguous()
    if pending:
        name, parts = next(iter(pending.items()))
        raise ValueError(f"{name}: the stream ended with {len(parts)} of its per-expert tensors")
