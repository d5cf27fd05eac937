"""Qwen3 dense (`model_type="qwen3"`): Llama layout plus per-head RMSNorm on queries and keys.

Facts and table of one architecture (see `_architecture.py`); groups in `_blocks.py`.
Tests: `python -m pytest tests -k bridge -q`
"""

from megatron_sapo.bridge.arch._architecture import Architecture
from megatron_sapo.bridge.arch._blocks import ATTENTION, DENSE_MLP, EMBEDDINGS, QK_NORM

ARCHITECTURE = Architecture(
    model_type="qwen3",
    mappings=(*EMBEDDINGS, *ATTENTION, *QK_NORM, *DENSE_MLP),
    qk_layernorm=True,
    must_be_false=("attention_bias", "use_sliding_window"),
)
