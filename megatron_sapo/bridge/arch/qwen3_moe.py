"""Qwen3-MoE (`model_type="qwen3_moe"`): Qwen3 attention, routed experts, optional dense `mlp_only_layers`.

Table of `megatron_sapo.bridge`; groups in `_blocks.py`. Tests: `python -m pytest tests -k bridge -q`
"""

from megatron_sapo.bridge.arch._blocks import ATTENTION, DENSE_MLP, EMBEDDINGS, QK_NORM, ROUTED_EXPERTS

MODEL_TYPE = "qwen3_moe"
MAPPINGS = (*EMBEDDINGS, *ATTENTION, *QK_NORM, *DENSE_MLP, *ROUTED_EXPERTS)
