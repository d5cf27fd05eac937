"""Llama (`model_type="llama"`, e.g. SmolLM2): GQA attention without biases, SwiGLU MLP, often tied.

Table of `megatron_sapo.bridge`; groups in `_blocks.py`. Tests: `python -m pytest tests -k bridge -q`
"""

from megatron_sapo.bridge.arch._blocks import ATTENTION, DENSE_MLP, EMBEDDINGS

MODEL_TYPE = "llama"
MAPPINGS = (*EMBEDDINGS, *ATTENTION, *DENSE_MLP)
