"""Hugging Face -> Megatron distributed checkpoint conversion at any TP / PP / VPP / EP layout.

Call inside `parallel_session(layout)` (a megatron.parallel.ParallelConfig) on every rank of the
job (the tools in `tools/` do):

    with parallel_session(ParallelConfig(tp=2)):
        hf_to_megatron("/ckpt/Qwen3-8B", "/ckpt/Qwen3-8B-mcore")          # each rank reads its slices
    with parallel_session(ParallelConfig(tp=2)):
        chunks, hf_config, meta = load_megatron_model("/ckpt/Qwen3-8B-mcore")   # any layout

HF -> Megatron: every rank builds its part of the model on the meta device (`build_gpt_model`, no
memory), checks that the safetensors hold every tensor it needs with the right shape, and the job
writes one torch_dist checkpoint (step 0, model only, `megatron.checkpoint.save_checkpoint`) in which
each parameter's slice is read from the safetensors right before it is written (`lazy_save.py`): a
rank holds about one parameter at a time. Plus the config / tokenizer / processor files
(`bridge/snapshot.py`) and the converter metadata (`assets.py`). A vision-language model is the same
`build_gpt_model` (its vision tower on the first pipeline stage). `load_megatron_model`
builds a model at the current layout and loads such a checkpoint into it (torch_dist reshards on load).
Megatron -> HF never builds a model: see `to_hf.py`.
Tests: `python -m pytest tests/e2e/test_converters.py tests/e2e/test_vlm_converters.py -q` (SmolLM2:
`tests/e2e/test_smollm2_convert.py -m slow`).
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_sapo.bridge import ParallelGroups, mapping_table
from megatron_sapo.bridge.arch import language_config
from megatron_sapo.bridge.layout import local_parameters
from megatron_sapo.bridge.snapshot import copy_assets
from megatron_sapo.convert.assets import (
    load_hf_config,
    read_metadata,
    safetensors_dtype,
    write_metadata,
)
from megatron_sapo.convert.layout import ConversionError
from megatron_sapo.convert.lazy_save import LazyTorchDistSave, ParamSlices
from megatron_sapo.megatron.checkpoint import load_checkpoint, save_checkpoint
from megatron_sapo.megatron.models import (
    SpecName,
    build_gpt_model,
    padded_vocab_size,
    te_available,
    transformer_config_from_hf,
)
from megatron_sapo.megatron.parallel import current_layout, on_gpu

logger = logging.getLogger(__name__)


def build_model_chunks(hf_config: Any, *, dtype: torch.dtype, spec: SpecName) -> list[torch.nn.Module]:
    """This rank's (virtual) pipeline chunks of the model at the current layout, weights uninitialised."""
    layout = current_layout()
    on_cpu = not on_gpu()
    try:
        config = transformer_config_from_hf(
            hf_config,
            **layout.as_dict(),
            dtype=None if on_cpu else dtype,  # CPU: fp32 only (exact for fp16 / bf16 sources)
            use_cpu_initialization=True,  # weights are overwritten: skip the GPU init kernels
        )
        stages = range(layout.vpp) if layout.vpp else [None]
        # the build refuses what the config cannot (a VLM's deepstack layers off the first stage)
        return [build_gpt_model(hf_config, vp_stage=v, spec=spec, config=config).eval() for v in stages]
    except ValueError as err:
        raise ConversionError(str(err).splitlines()[0]) from None


def _resolve_spec(spec: SpecName) -> SpecName:
    return ("te" if te_available() else "local") if spec == "auto" else spec


def hf_to_megatron(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, spec: SpecName = "auto") -> Path:
    """Convert the HF checkpoint `hf_dir` into a megatron distributed checkpoint under `out_dir`.

    `spec`: megatron layer spec of the saved model ("auto": TE on GPU when installed, else local);
    recorded, since TE and local modules name their norm weights differently. Returns `out_dir`.
    """
    hf_config = load_hf_config(hf_dir)
    dtype_name, num_tensors, num_bytes = safetensors_dtype(hf_dir)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"--output-dir {out} exists and is not a directory")
    spec = _resolve_spec(spec)
    with torch.device("meta"):  # shapes and sharding only: each tensor is read while it is saved
        chunks = build_model_chunks(hf_config, dtype=getattr(torch, dtype_name), spec=spec)
    table = mapping_table(hf_config)
    slices = ParamSlices(hf_dir, table)
    try:
        params = local_parameters(chunks, table, ParallelGroups.from_parallel_state())
        for lp in params:  # every missing tensor or bad shape is reported before anything is written
            slices.check(lp)
    except ValueError as err:
        raise ConversionError(str(err).splitlines()[0]) from None
    save_checkpoint(
        out, step=0, model_chunks=chunks, sharded_strategy=LazyTorchDistSave(slices.for_params(params))
    )
    layout = current_layout()
    if dist.get_rank() == 0:
        copy_assets(hf_dir, out)
        write_metadata(
            out,
            hf_config,
            layout,
            world_size=dist.get_world_size(),
            spec=spec,
            dtype=dtype_name,
            padded_vocab_size=padded_vocab_size(language_config(hf_config).vocab_size, layout.tp),
            hf_tensors=num_tensors,
            hf_bytes=num_bytes,
        )
    dist.barrier()
    logger.info("converted %s -> %s at %s", hf_dir, out, layout)
    return out


def load_megatron_model(megatron_dir: str | os.PathLike) -> tuple[list[torch.nn.Module], Any, dict[str, Any]]:
    """(model chunks at the current layout with the checkpoint loaded, HF config, converter metadata)."""
    meta = read_metadata(megatron_dir)
    hf_config = load_hf_config(megatron_dir)
    spec = meta["spec"]
    if spec == "te" and not te_available():
        raise ConversionError(
            f"{megatron_dir} was saved with the Transformer Engine layer spec; loading it needs TE and CUDA"
        )
    layout = current_layout()
    build_config = hf_config
    if meta["padded_vocab_size"] != padded_vocab_size(language_config(hf_config).vocab_size, layout.tp):
        # torch_dist needs the saved global embedding shape: keep the saved padding when tp divides it
        if meta["padded_vocab_size"] % layout.tp:
            raise ConversionError(
                f"vocab: the checkpoint's padded vocab_size={meta['padded_vocab_size']} (saved at "
                f"tp={meta['layout']['tp']}) is not divisible by tp={layout.tp}"
            )
        build_config = copy.deepcopy(hf_config)
        build_config.get_text_config().vocab_size = meta["padded_vocab_size"]  # a VLM's text_config
    chunks = build_model_chunks(build_config, dtype=getattr(torch, meta["dtype"]), spec=spec)
    load_checkpoint(megatron_dir, model_chunks=chunks)
    return chunks, hf_config, meta
