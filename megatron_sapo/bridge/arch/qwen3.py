"""Qwen3 dense (`model_type="qwen3"`): Llama layout plus per-head RMSNorm on queries and keys.

Table of `megatron_sapo.bridge`; groups in `_blocks.py`. Tests: `python -m pytest tests -k bridge -q`
"""

from megatron_sapo.bridge.arch._blocks import ATTENTION, DENSE_MLP, EMBEDDINGS, QK_NORM

MODEL_TYPE = "qwen3"
MAPPINGS = (*EMBEDDINGS, *ATTENTION, *QK_NORM, *DENSE_MLP)
