"""Qwen2-MoE (`model_type="qwen2_moe"`): q/k/v biases, no QK-norm, routed experts plus a gated shared expert.

Table of `megatron_sapo.bridge`; groups in `_blocks.py`. Tests: `python -m pytest tests -k bridge -q`
"""

from megatron_sapo.bridge.arch._blocks import (
    ATTENTION,
    DENSE_MLP,
    EMBEDDINGS,
    QKV_BIAS,
    ROUTED_EXPERTS,
    SHARED_EXPERT,
)

MODEL_TYPE = "qwen2_moe"
MAPPINGS = (*EMBEDDINGS, *ATTENTION, *QKV_BIAS, *DENSE_MLP, *ROUTED_EXPERTS, *SHARED_EXPERT)
