"""Qwen3-MoE (`model_type="qwen3_moe"`): Qwen3 attention, routed experts, optional dense `mlp_only_layers`.

Facts and table of one architecture (see `_architecture.py`); groups in `_blocks.py`.
Tests: `python -m pytest tests -k bridge -q`
"""

from megatron_sapo.bridge.arch._architecture import Architecture
from megatron_sapo.bridge.arch._blocks import ATTENTION, DENSE_MLP, EMBEDDINGS, QK_NORM, ROUTED_EXPERTS

ARCHITECTURE = Architecture(
    model_type="qwen3_moe",
    mappings=(*EMBEDDINGS, *ATTENTION, *QK_NORM, *DENSE_MLP, *ROUTED_EXPERTS),
    qk_layernorm=True,
    moe=True,
    must_be_false=("attention_bias", "use_sliding_window"),
)
