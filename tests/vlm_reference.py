"""Shared references for the VLM tests: a transformers Qwen3-VL(-MoE) with seeded random weights, an
image+text batch from the tiny processor, and its M-RoPE positions built per sample with `rope_index`.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from megatron_sapo.megatron.mrope import rope_index
from megatron_sapo.utils.tiny_vlm import VISION_TOKENS, tiny_vlm_config


def hf_vlm(moe: bool, processor, seed: int = 1, **config_kwargs):
    """(config, transformers model in eval mode) with the processor's vision token ids."""
    from transformers import AutoModelForImageTextToText

    config = tiny_vlm_config(moe=moe, **config_kwargs)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    torch.manual_seed(seed)
    return config, AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()


def images(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def image_batch(processor):
    """Two prompts: two images of different sizes around text, and one 3rd image between text."""
    parts = [
        [{"type": "image"}, {"type": "text", "text": "what is 12 + 7"}, {"type": "image"}],
        [{"type": "text", "text": "the sum of"}, {"type": "image"}, {"type": "text", "text": "and 3"}],
    ]
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
        )
        for p in parts
    ]
    return processor(
        text=texts, images=images([(32, 48), (64, 64), (48, 96)]), padding=True, return_tensors="pt"
    )


def mrope_positions(enc, config) -> torch.Tensor:
    """`[3, B, T]` positions of a processor batch, per sample with `rope_index` (grids in batch order)."""
    rows, start = [], 0
    merge = config.vision_config.spatial_merge_size
    for b in range(enc["input_ids"].shape[0]):
        ids = enc["input_ids"][b]
        n = int((ids == config.image_token_id).sum())
        grids, count = [], 0
        while count < n:
            grids.append(enc["image_grid_thw"][start])
            count += int(grids[-1].prod()) // merge**2
            start += 1
        rows.append(rope_index(ids, torch.stack(grids) if grids else None, *mrope_tokens(config)))
    return torch.stack(rows, dim=1)


def mrope_tokens(config) -> tuple[int, int]:
    """`rope_index`'s (image_token_id, spatial_merge_size) from a Qwen3-VL config."""
    return config.image_token_id, config.vision_config.spatial_merge_size
