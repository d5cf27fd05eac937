"""Qwen2-MoE (`model_type="qwen2_moe"`): q/k/v biases, no QK-norm, routed experts plus a gated shared expert.

Facts and table of one architecture (see `_architecture.py`); groups in `_blocks.py`.
Tests: `python -m pytest tests -k bridge -q`
"""

from megatron_sapo.bridge.arch._architecture import Architecture
from megatron_sapo.bridge.arch._blocks import (
    ATTENTION,
    DENSE_MLP,
    EMBEDDINGS,
    QKV_BIAS,
    ROUTED_EXPERTS,
    SHARED_EXPERT,
)

ARCHITECTURE = Architecture(
    model_type="qwen2_moe",
    mappings=(*EMBEDDINGS, *ATTENTION, *QKV_BIAS, *DENSE_MLP, *ROUTED_EXPERTS, *SHARED_EXPERT),
    qk_layernorm=False,
    qkv_bias_field="qkv_bias",
    moe=True,
    shared_expert=True,
    must_be_false=("use_sliding_window",),
)
