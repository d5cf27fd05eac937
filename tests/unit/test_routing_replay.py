"""Routing-replay layout helpers: token order s * B + b, per-sample split/merge with padding, MoE ordinals.

Pure tensor checks against hand-built layouts (no megatron model, no process group); the model-level
replay tests are in tests/distributed/test_routing_replay.py.

    python -m pytest tests/unit/test_routing_replay.py -q
"""

from __future__ import annotations

import torch
from megatron.core.transformer import TransformerConfig

from megatron_sapo.megatron.routing_replay import merge_samples, moe_layer_ordinals, split_by_sample

LAYERS, SEQ, BATCH, TOPK = 3, 5, 4, 2


def _routing() -> torch.Tensor:
    """`[L, S*B, k]` whose entry encodes (layer, s, b, j), laid out as megatron flattens [S, B]."""
    layer, s, b, j = torch.meshgrid(
        torch.arange(LAYERS), torch.arange(SEQ), torch.arange(BATCH), torch.arange(TOPK), indexing="ij"
    )
    return (1000 * layer + 100 * s + 10 * b + j).reshape(LAYERS, SEQ * BATCH, TOPK)


def test_split_by_sample_follows_sequence_major_token_order() -> None:
    samples = split_by_sample(_routing(), BATCH, lengths=[5, 3, 1, 4])
    assert [tuple(x.shape) for x in samples] == [(LAYERS, n, TOPK) for n in (5, 3, 1, 4)]
    for b, sample in enumerate(samples):
        for s in range(sample.shape[1]):
            expected = 1000 * torch.arange(LAYERS)[:, None] + 100 * s + 10 * b + torch.arange(TOPK)
            assert torch.equal(sample[:, s], expected)


def test_merge_regroups_and_pads_with_distinct_experts() -> None:
    samples = split_by_sample(_routing(), BATCH, lengths=[5, 3, 1, 4])
    assert torch.equal(merge_samples(samples, SEQ), torch.where(_padded_mask(), _pad(), _routing()))
    # A different micro-batch grouping: samples 3 and 1, padded to 6 positions.
    regrouped = merge_samples([samples[3], samples[1]], seq_len=6).view(LAYERS, 6, 2, TOPK)
    assert torch.equal(regrouped[:, :4, 0], samples[3])
    assert torch.equal(regrouped[:, :3, 1], samples[1])
    assert torch.equal(regrouped[:, 4:, 0], torch.arange(TOPK).expand(LAYERS, 2, TOPK))


def _padded_mask() -> torch.Tensor:
    valid = torch.arange(SEQ)[:, None] < torch.tensor([5, 3, 1, 4])[None, :]  # [S, B]
    return (~valid).reshape(1, SEQ * BATCH, 1)


def _pad() -> torch.Tensor:
    return torch.arange(TOPK).expand(LAYERS, SEQ * BATCH, TOPK)


def test_moe_layer_ordinals_skip_dense_layers() -> None:
    base = dict(num_layers=4, hidden_size=8, num_attention_heads=2, num_moe_experts=4)
    assert moe_layer_ordinals(TransformerConfig(**base)) == {1: 0, 2: 1, 3: 2, 4: 3}
    assert moe_layer_ordinals(TransformerConfig(**base, moe_layer_freq=2)) == {1: 0, 3: 1}
    assert moe_layer_ordinals(TransformerConfig(**base, moe_layer_freq=[0, 1, 1, 0])) == {2: 0, 3: 1}
