"""Qwen3-VL-MoE (`model_type="qwen3_vl_moe"`): Qwen3-MoE text tower under `model.language_model.*`, vision.

Facts and table of one architecture (see `_architecture.py`); groups in `_blocks.py`; the megatron model
is `megatron_sapo/megatron/vlm.py`'s `Qwen3VLModel`. Experts are mapped under per-expert names (what
SGLang's weight update takes); the official checkpoints fuse them as `mlp.experts.gate_up_proj [E, H, 2I]`
and `down_proj [E, I, H]` (`disk_experts_transposed`), which the bridge's readers and writers translate.
The text config has no `norm_topk_prob`: Qwen3-VL-MoE always renormalises its top-k weights.
Tests: `python -m pytest tests/unit/test_vlm.py tests/unit/test_bridge_mapping.py -q`
"""

from megatron_sapo.bridge.arch._architecture import Architecture
from megatron_sapo.bridge.arch._blocks import (
    ATTENTION,
    DENSE_MLP,
    EMBEDDINGS,
    QK_NORM,
    ROUTED_EXPERTS,
    VISION_TOWER,
    in_language_model,
)

ARCHITECTURE = Architecture(
    model_type="qwen3_vl_moe",
    mappings=(*in_language_model(EMBEDDINGS, ATTENTION, QK_NORM, DENSE_MLP, ROUTED_EXPERTS), *VISION_TOWER),
    qk_layernorm=True,
    moe=True,
    must_be_false=("attention_bias",),
    vision=True,
    text_defaults=(("norm_topk_prob", True), ("decoder_sparse_step", 1), ("mlp_only_layers", ())),
    disk_experts_transposed=True,
)
