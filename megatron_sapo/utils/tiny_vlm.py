"""Tiny offline Qwen3-VL / Qwen3-VL-MoE checkpoints: config, tokenizer with the vision tokens, processor.

Nothing can be downloaded here, so tests and the VLM quickstart build their vision-language policies
from a transformers config with seeded random weights, the locally trained BPE of `tiny.py` plus the
Qwen-VL special tokens, and a `Qwen3VLProcessor` assembled from local objects:

    from megatron_sapo.utils.tiny_vlm import save_tiny_vlm, tiny_vlm_config
    path = save_tiny_vlm("out/hf", tiny_vlm_config(moe=True), seed=0)
    # config.json + model.safetensors + tokenizer + processor (preprocessor_config.json, chat template)

The saved layout is the one official Qwen3-VL checkpoints have, so our importers, converters and SGLang
read it as they would a downloaded model. For Qwen3-VL-MoE that means the fused expert tensors in the
official orientation `gate_up_proj [E, H, 2I]`, `down_proj [E, I, H]`: transformers' `save_pretrained`
writes them transposed (`[E, 2I, H]`, `[E, H, I]`), which SGLang would load silently wrong.
Sizes: vision depth 3 and >= 3 text layers because SGLang's Qwen3-VL-MoE hard-codes 3 deepstack layers;
`head_dim` 16 with `mrope_section` [4, 2, 2] (sums to head_dim / 2, as [24, 20, 20] does for 128).
Tests: `python -m pytest tests/unit/test_tiny_vlm.py -q`
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from megatron_sapo.utils.tiny import train_tokenizer

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
PATCH_SIZE, TEMPORAL_PATCH, MERGE = 16, 2, 2
# A message's content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts,
# as Qwen3-VL's own template takes them; each image becomes vision_start, one image_pad (the processor
# expands it to t*h*w / merge^2 pads), vision_end.
VLM_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_vlm_tokenizer(
    corpus: Iterable[str] | None = None, *, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """`tiny.train_tokenizer` plus the Qwen-VL vision special tokens and the multimodal chat template."""
    tok = train_tokenizer(corpus, vocab_size=vocab_size, extra_special_tokens=VISION_TOKENS)
    tok.chat_template = VLM_CHAT_TEMPLATE
    return tok


def tiny_vlm_config(
    *,
    moe: bool = False,
    vocab_size: int = 640,
    hidden_size: int = 64,
    num_layers: int = 4,
    vision_depth: int = 3,
    vision_hidden: int = 32,
    num_experts: int = 4,
    tie_word_embeddings: bool = False,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    top_k: int = 2,
    moe_intermediate_size: int | None = None,
) -> Any:
    """A tiny `Qwen3VLConfig` (or `Qwen3VLMoeConfig` when `moe`); token ids are set by `save_tiny_vlm`.
    `intermediate_size` defaults to 2·hidden, `moe_intermediate_size` to 3/4·hidden; head_dim is 16."""
    from transformers import Qwen3VLConfig, Qwen3VLMoeConfig

    if num_layers < 3 or vision_depth < 3:
        raise ValueError("tiny VLM: SGLang's Qwen3-VL-MoE needs >= 3 text layers and vision depth >= 3")
    text: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
    )
    if moe:
        # moe_intermediate != hidden / 2, so the fused [E, H, 2I] and [E, 2I, H] orientations differ in shape
        text.update(
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            moe_intermediate_size=moe_intermediate_size or 3 * hidden_size // 4,
        )
        text.update(decoder_sparse_step=1, norm_topk_prob=True)
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_heads=2,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH,
        spatial_merge_size=MERGE,
        out_hidden_size=hidden_size,
        num_position_embeddings=64,  # an 8x8 grid, bilinearly interpolated to any image size
        deepstack_visual_indexes=list(range(vision_depth - 3, vision_depth)),
    )
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return cls(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings)


def build_processor(
    tokenizer: PreTrainedTokenizerFast, *, min_pixels: int = 32 * 32, max_pixels: int = 128 * 128
):
    """A `Qwen3VLProcessor` from local objects (no hub): image + video processors sized for tiny images."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    image = Qwen2VLImageProcessor(
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE, size=size
    )
    video = Qwen3VLVideoProcessor(
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE, size=size
    )
    return Qwen3VLProcessor(
        image_processor=image, tokenizer=tokenizer, video_processor=video, chat_template=VLM_CHAT_TEMPLATE
    )


def official_expert_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory fused experts ([E, 2I, H] / [E, H, I]) in the official checkpoint
    orientation ([E, H, 2I] / [E, I, H]): dims 1 and 2 swapped, every other tensor unchanged."""
    fused = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
    return {k: (v.transpose(1, 2).contiguous() if k.endswith(fused) else v) for k, v in state.items()}


@torch.no_grad()
def save_tiny_vlm(
    out_dir: str | Path,
    config: Any,
    tokenizer: PreTrainedTokenizerFast | None = None,
    *,
    seed: int = 0,
    min_pixels: int = 32 * 32,
    max_pixels: int = 128 * 128,
) -> Path:
    """A random fp32 Qwen3-VL(-MoE) saved as an official checkpoint with tokenizer and processor files."""
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText

    tokenizer = tokenizer or train_vlm_tokenizer()
    text = config.text_config
    if text.vocab_size < len(tokenizer):
        raise ValueError(f"text_config.vocab_size {text.vocab_size} < tokenizer size {len(tokenizer)}")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    for cfg in (config, text):
        cfg.eos_token_id, cfg.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        cfg.bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(official_expert_layout(state), str(out / "model.safetensors"), metadata={"format": "pt"})
    build_processor(tokenizer, min_pixels=min_pixels, max_pixels=max_pixels).save_pretrained(out)
    _write_index(out, state)
    return out


def _write_index(out: Path, state: dict[str, torch.Tensor]) -> None:
    # Single-file checkpoints usually have no index; some readers (and our converters) like one.
    size = sum(t.numel() * t.element_size() for t in state.values())
    index = {
        "metadata": {"total_size": size},
        "weight_map": dict.fromkeys(sorted(state), "model.safetensors"),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
