"""A Hugging Face checkpoint directory on disk: safetensors shards next to the config and tokenizer files.

    write_hf_snapshot(named_tensors, "/run/hf", assets_from="/ckpt/Qwen3-8B")   # complete, or not there
    write_stage_shards(buckets, "/run/hf.tmp", stage)     # each pipeline stage at once, then on one rank:
    finish_stage_snapshot("/run/hf.tmp", "/run/hf", assets_from="/ckpt/Qwen3-8B")   # one index
    copy_assets("/ckpt/Qwen3-8B", "/out")    # config, tokenizer, generation config, chat template, processor

Used by the disk weight sync (`rollout/weight_sync.py`), the final export of a run (`train/outputs.py`)
and the converters (`convert/`). The shards are written by `safetensors_io.save_safetensors_sharded`.
Tests: `python -m pytest tests/e2e/test_converters.py -q`; the disk transport in tests/e2e/test_weight_sync.py
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from megatron_sapo.bridge.safetensors_io import INDEX_FILE, save_safetensors_sharded
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
    # a vision-language model's processor: transformers 5 writes processor_config.json with the image and
    # video processors inside; older checkpoints keep them in preprocessor_config.json and
    # video_preprocessor_config.json (SGLang and AutoProcessor read either)
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
STAGE_MAP = "weight_map.json"


def copy_assets(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy config, tokenizer, generation-config and processor files (`ASSET_FILES`) from `src` to `dst`;
    return the names copied."""
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


def write_stage_shards(
    buckets: Iterable[Sequence[tuple[str, torch.Tensor]]], staging: str | os.PathLike, stage: int
) -> dict[str, str]:
    """One pipeline stage's part of a snapshot that several stages write at once (the disk weight sync).

    Writes the stage's tensors as shards under `<staging>/.stage-<stage>/` and returns (and saves beside
    them) the stage's weight map {name: file}; `finish_stage_snapshot` then assembles the snapshot.
    """
    out = Path(staging) / f".stage-{stage:03d}"
    shutil.rmtree(out, ignore_errors=True)
    try:
        index = save_safetensors_sharded((nt for bucket in buckets for nt in bucket), out)
    except Exception as e:
        shutil.rmtree(out, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFullError(f"{disk_full_message(out)}: stage {stage}'s shards") from None
        raise
    (out / STAGE_MAP).write_text(json.dumps(index["weight_map"]))
    return index["weight_map"]


def finish_stage_snapshot(
    staging: str | os.PathLike, target: str | os.PathLike, *, assets_from: str | os.PathLike
) -> Path:
    """Assemble the stages' shards in `staging` (from `write_stage_shards`) into one HF directory at
    `target`: every shard moved up under a stage-prefixed name, one index over all of them, the assets of
    `assets_from`; renamed over `target` only when complete (a reader never sees a half snapshot)."""
    staging, target = Path(staging), Path(target)
    weight_map: dict[str, str] = {}
    total = 0
    stage_dirs = sorted(staging.glob(".stage-*"))
    if not stage_dirs:
        raise FileNotFoundError(f"no stage shards in {staging}")
    for stage_dir in stage_dirs:
        prefix = "model-pp" + stage_dir.name.removeprefix(".stage-")
        renamed: dict[str, str] = {}
        for name, file in json.loads((stage_dir / STAGE_MAP).read_text()).items():
            if name in weight_map:
                raise ValueError(f"{name} written by two pipeline stages ({stage_dir.name})")
            if file not in renamed:
                renamed[file] = file.replace("model", prefix, 1)
                total += (stage_dir / file).stat().st_size
                (stage_dir / file).replace(staging / renamed[file])
            weight_map[name] = renamed[file]
        shutil.rmtree(stage_dir)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    copy_assets(assets_from, staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target
