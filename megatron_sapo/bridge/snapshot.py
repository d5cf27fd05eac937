"""A Hugging Face checkpoint directory on disk: safetensors shards next to the config and tokenizer files.

    write_hf_snapshot(named_tensors, "/run/hf", assets_from="/ckpt/Qwen3-8B")   # complete, or not there
    copy_assets("/ckpt/Qwen3-8B", "/out")               # config, tokenizer, generation config, chat template

Used by the disk weight sync (`rollout/weight_sync.py`), the final export of a run (`train/outputs.py`)
and the converters (`convert/`). The shards are written by `safetensors_io.save_safetensors_sharded`.
Tests: `python -m pytest tests/e2e/test_converters.py -q`; the disk transport in tests/e2e/test_weight_sync.py
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from megatron_sapo.bridge.safetensors_io import save_safetensors_sharded
from megatron_sapo.utils.disk import DiskFullError, disk_full_message, is_disk_full

logger = logging.getLogger(__name__)

# Copied verbatim when present (the converters require config.json and check it themselves).
ASSET_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")


def copy_assets(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy config, tokenizer and generation-config files from `src` to `dst`; return the names copied."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = [name for name in ASSET_FILES if (src / name).is_file()]
    for name in copied:
        shutil.copyfile(src / name, dst / name)
    if not any(name in copied for name in _TOKENIZER_FILES):
        logger.warning("no tokenizer files in %s: the output will carry none", src)
    return copied


def write_hf_snapshot(
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    target: str | os.PathLike,
    *,
    assets_from: str | os.PathLike | None,
) -> Path:
    """A complete HF directory at `target`: safetensors shards (+ index) and the assets of `assets_from`.

    Written into `<target>.tmp` and renamed over `target` only when complete, so a reader (an SGLang
    server reloading from disk, a user after a crash) never sees a half-written snapshot. Disk full:
    `DiskFullError` naming `target` and the bytes of weights it had been given, the `.tmp` removed and
    an existing `target` untouched.
    """
    target = Path(target)
    staging = target.with_name(target.name + ".tmp")
    given = [0]

    def counted() -> Iterable[tuple[str, torch.Tensor]]:
        for name, tensor in named_tensors:
            given[0] += tensor.numel() * tensor.element_size()
            yield name, tensor

    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        save_safetensors_sharded(counted(), staging)
        if assets_from is not None:
            copy_assets(assets_from, staging)
    except Exception as e:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFullError(
                f"{disk_full_message(target)}: {given[0] / 2**20:.1f} MB of weights had been staged"
            ) from None
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
