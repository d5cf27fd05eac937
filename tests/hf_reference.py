"""Test-only reference: tiny random Hugging Face models and a minimal HF -> megatron weight mapping.

Used by tests/unit/test_models.py and tests/distributed/test_models_tp.py to check megatron models built
by `megatron_sapo.megatron.models` against transformers (same weights, same logits). Deliberately
independent of the library: the production bridge is a separate module and must not be trusted here.

    hf = tiny_hf_model(qwen3_config())            # transformers model, random fp32 weights
    full = hf_to_megatron(hf.state_dict(), hf.config)   # TP=PP=EP=1 megatron names -> tensors
"""

from __future__ import annotations

from typing import Any

import torch
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


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Megatron's fused QKV rows: per query group [its q heads..., k head, v head] ([rows, H] or [rows]).

    HF's GQA gives kv head j to q heads j*n_rep .. (j+1)*n_rep-1 (repeat_kv), i.e. contiguous q heads.
    """
    tail = q.shape[1:]
    parts = [t.reshape(num_groups, -1, *tail) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def hf_to_megatron(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """TP=PP=EP=1 megatron (local spec) state dict from a transformers state dict of the same model."""
    groups = config.num_key_value_heads
    out = {
        "embedding.word_embeddings.weight": state["model.embed_tokens.weight"],
        "decoder.final_layernorm.weight": state["model.norm.weight"],
    }
    if not config.tie_word_embeddings:
        out["output_layer.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        h, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = state[h + "input_layernorm.weight"]
        out[m + "pre_mlp_layernorm.weight"] = state[h + "post_attention_layernorm.weight"]
        attn = h + "self_attn."
        for kind in ("weight", "bias"):
            if attn + f"q_proj.{kind}" in state:
                qkv = [state[attn + f"{p}_proj.{kind}"] for p in "qkv"]
                out[m + f"self_attention.linear_qkv.{kind}"] = _fuse_qkv(*qkv, groups)
        out[m + "self_attention.linear_proj.weight"] = state[attn + "o_proj.weight"]
        if attn + "q_norm.weight" in state:
            out[m + "self_attention.q_layernorm.weight"] = state[attn + "q_norm.weight"]
            out[m + "self_attention.k_layernorm.weight"] = state[attn + "k_norm.weight"]
        mlp = h + "mlp."
        if mlp + "gate_proj.weight" in state:  # dense layer: fc1 = [gate; up]
            out[m + "mlp.linear_fc1.weight"] = torch.cat(
                [state[mlp + "gate_proj.weight"], state[mlp + "up_proj.weight"]]
            )
            out[m + "mlp.linear_fc2.weight"] = state[mlp + "down_proj.weight"]
            continue
        out[m + "mlp.router.weight"] = state[mlp + "gate.weight"]
        # transformers 5 keeps experts fused in memory: gate_up_proj [E, 2I, H] (gate rows first),
        # down_proj [E, H, I] -- already megatron's per-expert fc1 / fc2 orientation.
        for e in range(config.num_experts):
            out[m + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = state[mlp + "experts.gate_up_proj"][
                e
            ]
            out[m + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = state[mlp + "experts.down_proj"][e]
        if mlp + "shared_expert.gate_proj.weight" in state:
            shared = mlp + "shared_expert."
            fc1 = torch.cat([state[shared + "gate_proj.weight"], state[shared + "up_proj.weight"]])
            out[m + "mlp.shared_experts.linear_fc1.weight"] = fc1
            out[m + "mlp.shared_experts.linear_fc2.weight"] = state[shared + "down_proj.weight"]
            out[m + "mlp.shared_experts.gate_weight"] = state[mlp + "shared_expert_gate.weight"]
    return {name: t.detach().clone() for name, t in out.items()}


def pad_vocab(full: dict[str, torch.Tensor], padded_vocab: int) -> dict[str, torch.Tensor]:
    """Zero rows appended to the embedding / output weights up to `padded_vocab` rows."""
    out = dict(full)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in out:
            weight = out[name]
            pad = weight.new_zeros(padded_vocab - weight.shape[0], weight.shape[1])
            out[name] = torch.cat([weight, pad])
    return out
