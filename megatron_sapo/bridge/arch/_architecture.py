"""`Architecture`: everything about one Hugging Face `model_type` in one object, one per file here.

An architecture file (`qwen3.py`, `llama.py`, ...) defines `ARCHITECTURE = Architecture(...)`: the HF
`model_type`, the facts `megatron_sapo/megatron/models.py` builds a megatron-core GPTModel from, and the
mapping table `megatron_sapo/bridge/` converts weights with. The registry in `__init__.py` finds them.
Tests: `python -m pytest tests/unit/test_bridge_mapping.py tests/unit/test_models.py -q`
"""

from __future__ import annotations

import dataclasses

from megatron_sapo.bridge.mapping import Mapping


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one Hugging Face `model_type` maps onto megatron-core's GPT: config facts and weight names."""

    model_type: str
    """The HF `config.model_type` this file answers for (the registry key; unique across files)."""
    mappings: tuple[Mapping, ...]
    """The mapping table: megatron parameter names <-> HF tensor names (groups from `_blocks.py`)."""
    qk_layernorm: bool
    """RMSNorm over each query/key head before RoPE (Qwen3's `q_norm` / `k_norm`)."""
    qkv_bias_field: str | None = None
    """HF boolean attribute that puts a bias on q/k/v only (Qwen2's `qkv_bias`) -> `add_qkv_bias`."""
    moe: bool = False
    """Routed experts: `num_experts`, `num_experts_per_tok`, `moe_intermediate_size`, `norm_topk_prob`,
    `decoder_sparse_step`, `mlp_only_layers`."""
    shared_expert: bool = False
    """A sigmoid-gated shared expert of width `shared_expert_intermediate_size` (Qwen2-MoE)."""
    must_be_false: tuple[str, ...] = ()
    """HF flags this mapping cannot express when true (e.g. a bias on o_proj without one on the MLP)."""
    rope_types: tuple[str, ...] = ("default",)
    """`rope_parameters["rope_type"]` values megatron's RotaryEmbedding reproduces."""
    vision: bool = False
    """A vision-language model (Qwen3-VL): the language model is built from `config.text_config`, with
    `megatron/vlm.py`'s vision tower, M-RoPE and deepstack around it."""
    disk_experts_transposed: bool = False
    """The checkpoint files fuse each layer's experts as `gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]`
    (official Qwen3-VL-MoE), not transformers' in-memory `[E, 2I, H]` / `[E, H, I]`."""
    text_defaults: tuple[tuple[str, object], ...] = ()
    """Text-config fields an architecture fixes instead of configuring (Qwen3-VL-MoE always renormalises
    its top-k: `("norm_topk_prob", True)`), read by `language_config` when the config lacks them."""
