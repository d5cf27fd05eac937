"""Hugging Face <-> Megatron distributed checkpoint conversion at any TP / PP / VPP / EP layout.

Call inside `parallel_session(layout)` on every rank of the job (the tools in `tools/` do):

    with parallel_session(Layout(tp=2)):
        hf_to_megatron("/ckpt/Qwen3-8B", "/ckpt/Qwen3-8B-mcore")          # each rank reads its slices
    with parallel_session(Layout(ep=4)):
        megatron_to_hf("/ckpt/Qwen3-8B-mcore", "/ckpt/Qwen3-8B-back")     # rank 0 writes the shards

HF -> Megatron: every rank builds its part of the model (`build_gpt_model`), reads only its slices of
the safetensors (`bridge.load_hf_weights`) and the job writes one torch_dist checkpoint (step 0, model
only, `megatron.checkpoint.save_checkpoint`) plus the files of `assets.py`. Megatron -> HF: the
checkpoint is loaded into a model at the current layout (torch_dist reshards on load), the bridge
streams full HF-named tensors to rank 0 in byte-bounded buckets, and rank 0 writes size-bounded
safetensors shards + index in the source checkpoint's dtype, with config and tokenizer files, so that
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)` (and SGLang) load it.
Tests: `python -m pytest tests/e2e/test_converters.py -q` (SmolLM2: add `-m slow`).
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from tqdm import tqdm

from megatron_sapo.bridge import (
    DEFAULT_BUCKET_BYTES,
    export_hf_weights,
    load_hf_weights,
    save_safetensors_sharded,
)
from megatron_sapo.convert.assets import (
    copy_assets,
    load_hf_config,
    read_metadata,
    safetensors_dtype,
    write_metadata,
)
from megatron_sapo.convert.layout import ConversionError, Layout
from megatron_sapo.megatron.checkpoint import load_checkpoint, save_checkpoint
from megatron_sapo.megatron.models import (
    SpecName,
    build_gpt_model,
    padded_vocab_size,
    te_available,
    transformer_config_from_hf,
)

logger = logging.getLogger(__name__)


def current_layout() -> Layout:
    """The layout of megatron's initialised parallel state."""
    return Layout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
    )


def build_model_chunks(hf_config: Any, *, dtype: torch.dtype, spec: SpecName) -> list[torch.nn.Module]:
    """This rank's (virtual) pipeline chunks of the model at the current layout, weights uninitialised."""
    layout = current_layout()
    on_cpu = not torch.cuda.is_available()
    try:
        config = transformer_config_from_hf(
            hf_config,
            tp=layout.tp,
            pp=layout.pp,
            ep=layout.ep,
            vpp=layout.vpp,
            dtype=None if on_cpu else dtype,  # CPU: fp32 only (exact for fp16 / bf16 sources)
            use_cpu_initialization=True,  # weights are overwritten: skip the GPU init kernels
        )
    except ValueError as err:
        raise ConversionError(str(err).splitlines()[0]) from None
    stages = range(layout.vpp) if layout.vpp else [None]
    return [build_gpt_model(hf_config, vp_stage=v, spec=spec, config=config).eval() for v in stages]


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
    chunks = build_model_chunks(hf_config, dtype=getattr(torch, dtype_name), spec=spec)
    try:
        load_hf_weights(chunks, hf_config, hf_dir)
    except ValueError as err:
        raise ConversionError(str(err).splitlines()[0]) from None
    save_checkpoint(out, step=0, model_chunks=chunks)
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
            padded_vocab_size=padded_vocab_size(hf_config.vocab_size, layout.tp),
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
    if meta["padded_vocab_size"] != padded_vocab_size(hf_config.vocab_size, layout.tp):
        # torch_dist needs the saved global embedding shape: keep the saved padding when tp divides it
        if meta["padded_vocab_size"] % layout.tp:
            raise ConversionError(
                f"vocab: the checkpoint's padded vocab_size={meta['padded_vocab_size']} (saved at "
                f"tp={meta['layout']['tp']}) is not divisible by tp={layout.tp}"
            )
        build_config = copy.deepcopy(hf_config)
        build_config.vocab_size = meta["padded_vocab_size"]
    chunks = build_model_chunks(build_config, dtype=getattr(torch, meta["dtype"]), spec=spec)
    load_checkpoint(megatron_dir, model_chunks=chunks)
    return chunks, hf_config, meta


def megatron_to_hf(
    megatron_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 2 << 30,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    progress: bool = True,
) -> Path:
    """Convert a `hf_to_megatron` output back to a HF checkpoint dir `out_dir` (written by rank 0).

    `max_shard_bytes`: bound on one safetensors shard; `bucket_bytes`: bound on one transfer bucket to
    rank 0; `progress`: a tqdm bar on rank 0. Returns `out_dir`.
    """
    out = Path(out_dir)
    problem = [None]
    if dist.get_rank() == 0 and out.is_dir() and any(out.glob("*.safetensors")):
        problem[0] = f"--output-dir {out} already holds *.safetensors weights; choose an empty directory"
    dist.broadcast_object_list(problem, src=0)  # rank 0 writes: its view of the directory decides for all
    if problem[0]:
        raise ConversionError(problem[0])
    chunks, hf_config, meta = load_megatron_model(megatron_dir)
    dtype = getattr(torch, meta["dtype"])
    buckets = export_hf_weights(chunks, hf_config, bucket_bytes=bucket_bytes, dst_ranks=(0,))
    if dist.get_rank() != 0:
        for _ in buckets:  # collectives: every rank walks the whole export
            pass
        dist.barrier()
        return out
    bar = tqdm(total=meta["hf_tensors"], unit="tensor", desc="export", disable=not progress)

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for bucket in buckets:
            for name, tensor in bucket:
                bar.update()
                yield name, tensor.to(dtype)

    index = save_safetensors_sharded(tensors(), out, max_shard_bytes=max_shard_bytes)
    bar.close()
    copy_assets(megatron_dir, out)
    written = len(index["weight_map"])
    if written != meta["hf_tensors"]:
        logger.warning("exported %d tensors, the source checkpoint had %d", written, meta["hf_tensors"])
    dist.barrier()
    logger.info("converted %s -> %s (%d tensors)", megatron_dir, out, written)
    return out
