"""The CPU SGLang server's rotary stand-in (megatron_sapo/rollout/cpu_shim/vllm/_custom_ops.py) against
transformers' own `apply_rotary_pos_emb` (the Llama/Qwen "neox" layout), full and partial rotary, and
a query that is a strided column slice of a fused qkv tensor (as SGLang passes it)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import megatron_sapo

SHIM = megatron_sapo.__file__.replace("__init__.py", "rollout/cpu_shim/vllm/_custom_ops.py")


def _shim():
    spec = importlib.util.spec_from_file_location("_custom_ops_under_test", SHIM)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.rotary_embedding


def _cos_sin_cache(max_pos: int, rot: int, base: float = 10000.0) -> torch.Tensor:
    inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float32) / rot)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)  # [P, R/2]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # SGLang's layout: cos | sin halves


@pytest.mark.parametrize("rot", [16, 8])  # full rotary, and partial (first 8 of 16 channels)
def test_neox_rotary_equals_transformers(rot):
    torch.manual_seed(0)
    tokens, heads, kv_heads, d = 7, 4, 2, 16
    positions = torch.tensor([0, 1, 2, 5, 9, 30, 63])
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d)
    query, key = qkv[:, : heads * d], qkv[:, heads * d : (heads + kv_heads) * d]  # strided views
    q_ref = query.reshape(tokens, heads, d).transpose(0, 1).clone()  # [H, T, D]
    k_ref = key.reshape(tokens, kv_heads, d).transpose(0, 1).clone()
    cache = _cos_sin_cache(64, rot)
    cos, sin = cache[positions].chunk(2, dim=-1)
    cos, sin = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)  # transformers' [T, R] duplication
    q_rot, k_rot = apply_rotary_pos_emb(q_ref[..., :rot], k_ref[..., :rot], cos, sin, unsqueeze_dim=0)
    q_ref[..., :rot], k_ref[..., :rot] = q_rot, k_rot

    _shim()(positions, query, key, d, cache, True)

    torch.testing.assert_close(query.reshape(tokens, heads, d).transpose(0, 1), q_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(key.reshape(tokens, kv_heads, d).transpose(0, 1), k_ref, rtol=0, atol=1e-6)
    assert not torch.equal(
        q_ref[..., :rot], qkv[:, : heads * d].reshape(tokens, heads, d).transpose(0, 1)[..., :rot] * 0
    )
