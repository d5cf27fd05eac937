"""Save a megatron model built on the meta device, reading each tensor from the HF checkpoint as it is written.

`hf_to_megatron` builds the model at the target layout with `torch.device("meta")` (no memory), so
megatron itself produces the sharded state dict (keys, global shapes, TP / EP offsets, replica ids,
the SwiGLU gate/up split) exactly as for a real model. The save then goes through the normal
`save_checkpoint` with one difference, the torch_dist strategy `LazyTorchDistSave`: where megatron's
writer would stage a CPU copy of every tensor before writing (the whole per-rank model), it hands
the file writer an iterable that reads each tensor's HF slice (`bridge.read_local_slice`) right before
that tensor is serialised and drops it after, so a rank holds about one parameter at a time::

    strategy = LazyTorchDistSave(ParamSlices(hf_dir, table).for_params(params))
    save_checkpoint(out, step=0, model_chunks=meta_chunks, sharded_strategy=strategy)

The files are what `InProcessTorchDistSave` writes for a materialised model (same planner, same
writer): `load_checkpoint` loads them at any layout. Tests: `python -m pytest tests/e2e/test_converters.py -q`
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_plan
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

from megatron_sapo.bridge.arch import ARCHITECTURES
from megatron_sapo.bridge.layout import LocalParam
from megatron_sapo.bridge.load import check_local_slice, open_source, read_local_slice
from megatron_sapo.bridge.mapping import MappingTable
from megatron_sapo.bridge.safetensors_io import SafetensorsReader
from megatron_sapo.megatron.dist_ckpt_writer import InProcessTorchDistSave, _InProcessWriter


class ParamSlices:
    """Turns a meta tensor (a parameter of a meta model, or a view of one) into its real data.

    Identifies the parameter by the view's storage, reads this rank's slice of it from the HF
    checkpoint in the parameter's dtype and applies the view (shape, strides, offset). Keeps the
    last parameter read (megatron cuts SwiGLU fc1 into two views) and closes the safetensors files
    after each read, so their memory maps do not accumulate resident pages.
    """

    def __init__(self, hf_dir: str | os.PathLike, table: MappingTable) -> None:
        self._table, self._files = table, SafetensorsReader(hf_dir)
        transposed = ARCHITECTURES[table.model_type].disk_experts_transposed
        self._source = open_source(self._files, files_transposed=transposed)
        self._params: dict[int, LocalParam] = {}
        self._last: tuple[LocalParam | None, torch.Tensor | None] = (None, None)

    def check(self, lp: LocalParam) -> None:
        """ValueError unless the HF checkpoint holds `lp`'s tensors with the expected shapes."""
        check_local_slice(lp, self._table, self._source)

    def for_params(self, params: Sequence[LocalParam]) -> ParamSlices:
        """Serve these (meta) parameters; returns self."""
        self._params = {id(lp.param.untyped_storage()): lp for lp in params}
        return self

    def __call__(self, meta: torch.Tensor) -> torch.Tensor:
        lp = self._params.get(id(meta.untyped_storage()))
        if lp is None:
            raise RuntimeError(f"lazy save: a tensor of shape {tuple(meta.shape)} is not a model parameter")
        if self._last[0] is not lp:
            self._last = (None, None)  # drop the previous parameter before reading the next
            data = read_local_slice(lp, self._table, self._source).to(lp.param.dtype).contiguous()
            self._files.close()
            self._last = (lp, data)
        data = self._last[1]
        view = data.as_strided(meta.shape, meta.stride(), meta.storage_offset())
        return view if view.numel() == data.numel() else view.clone()  # torch.save writes whole storages


class _Lazy:
    """`(write item, tensor)` pairs whose tensors are materialised one by one while being iterated."""

    def __init__(self, items: list[tuple[Any, torch.Tensor]], materialise: ParamSlices) -> None:
        self._items, self._materialise = items, materialise

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[tuple[Any, torch.Tensor]]:
        for item, meta in self._items:
            yield item, self._materialise(meta) if meta.is_meta else meta


class _LazyWriter(_InProcessWriter):
    def __init__(self, *args: Any, materialise: ParamSlices, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.materialise = materialise

    def preload_tensors(self, write_buckets: list, non_blocking: bool = False) -> list:
        # Megatron stages CPU copies of every tensor here; the meta tensors are read lazily instead.
        return [
            (file, key, (bytes_data, _Lazy(tensor_data, self.materialise)))
            for file, key, (bytes_data, tensor_data) in write_buckets
        ]


class LazyTorchDistSave(InProcessTorchDistSave):
    """`InProcessTorchDistSave` for meta models: tensors come from `materialise` while being written."""

    def __init__(self, materialise: ParamSlices) -> None:
        super().__init__()
        self.materialise = materialise

    def async_save(self, sharded_state_dict: dict, checkpoint_dir: Any) -> Any:
        # InProcessTorchDistSave.async_save with the lazy writer
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        writer = _LazyWriter(checkpoint_dir, thread_count=self.thread_count, materialise=self.materialise)
        planner = MCoreSavePlanner(
            dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
        )
        plan = save_state_dict_async_plan(
            mcore_to_pyt_state_dict(sharded_state_dict, False), writer, None, 0, planner=planner
        )
        return self._get_save_and_finalize_callbacks(writer, plan[0])
