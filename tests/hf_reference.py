"""Test-only reference: tiny random Hugging Face models (every tensor randomised) and their checkpoints.

Used by the model and bridge tests to check megatron models (built by `megatron_sapo.megatron.models`,
weights loaded by `megatron_sapo.bridge`) against transformers: same weights, same logits. The only
HF <-> megatron mapping lives in the bridge; transformers' own `save_pretrained` is the reference for
checkpoint names and layouts.

    hf = tiny_hf_model(qwen3_config())            # transformers model, random fp32 weights
    state = checkpoint_state_dict(hf)             # {checkpoint name: tensor} as save_pretrained writes
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

# head_dim 16 != hidden 64 / 4 heads, so kv_channels must come from head_dim, not hidden / heads.
_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    attn_implementation="eager",
)


def qwen3_config(**overrides: Any) -> Qwen3Config:
    return Qwen3Config(**{**_COMMON, "num_hidden_layers": 2, "rope_theta": 5e5, **overrides})


def qwen3_moe_config(**overrides: Any) -> Qwen3MoeConfig:
    kwargs = dict(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return Qwen3MoeConfig(**{**_COMMON, **kwargs, "norm_topk_prob": True, **overrides})


def qwen2_moe_config(**overrides: Any) -> Qwen2MoeConfig:
    kwargs = dict(num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    return Qwen2MoeConfig(**{**_COMMON, **kwargs, "shared_expert_intermediate_size": 48, **overrides})


def llama_config(**overrides: Any) -> LlamaConfig:
    # SmolLM2-style: tied embeddings, no biases, large RoPE theta.
    kwargs = dict(num_hidden_layers=2, tie_word_embeddings=True, rope_theta=1e5)
    return LlamaConfig(**{**_COMMON, **kwargs, **overrides})


@torch.no_grad()
def tiny_hf_model(config: Any, seed: int = 0) -> torch.nn.Module:
    """A transformers causal LM with every parameter drawn from a seeded generator (norms near 1).

    HF initialises norms to exactly 1 and the MoE router to zeros, which would hide a swapped or missing
    norm / router in the mapping; random values make every tensor count.
    """
    model = AutoModelForCausalLM.from_config(config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def checkpoint_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `save_pretrained` writes (checkpoint names: per-expert MoE weights, no tied lm_head)."""
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return load_checkpoint(tmp)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint dir (one `model.safetensors` or index + shards), by name."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    out: dict[str, torch.Tensor] = {}
    for file in files:
        out.update(load_file(str(path / file)))
    return out
