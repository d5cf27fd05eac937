"""Qwen3-VL dense (`model_type="qwen3_vl"`): Qwen3 text tower under `model.language_model.*`, vision tower.

Facts and table of one architecture (see `_architecture.py`); groups in `_blocks.py`; the megatron model
is `megatron_sapo/megatron/vlm.py`'s `Qwen3VLModel` (language model built from `text_config`).
Tests: `python -m pytest tests/unit/test_vlm.py tests/unit/test_bridge_mapping.py -q`
"""

from megatron_sapo.bridge.arch._architecture import Architecture
from megatron_sapo.bridge.arch._blocks import (
    ATTENTION,
    DENSE_MLP,
    EMBEDDINGS,
    QK_NORM,
    VISION_TOWER,
    in_language_model,
)

ARCHITECTURE = Architecture(
    model_type="qwen3_vl",
    mappings=(*in_language_model(EMBEDDINGS, ATTENTION, QK_NORM, DENSE_MLP), *VISION_TOWER),
    qk_layernorm=True,
    must_be_false=("attention_bias",),
    vision=True,
)
