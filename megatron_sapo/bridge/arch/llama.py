"""Llama (`model_type="llama"`, e.g. SmolLM2): GQA attention without biases, SwiGLU MLP, often tied.

Facts and table of one architecture (see `_architecture.py`); groups in `_blocks.py`.
Tests: `python -m pytest tests -k bridge -q`
"""

from megatron_sapo.bridge.arch._architecture import Architecture
from megatron_sapo.bridge.arch._blocks import ATTENTION, DENSE_MLP, EMBEDDINGS

ARCHITECTURE = Architecture(
    model_type="llama",
    mappings=(*EMBEDDINGS, *ATTENTION, *DENSE_MLP),
    qk_layernorm=False,
    # attention_bias puts a bias on o_proj too, which megatron only has together with MLP biases
    # (add_bias_linear), so both stay unsupported rather than half-mapped.
    must_be_false=("attention_bias", "mlp_bias"),
    rope_types=("default", "llama3"),
)
