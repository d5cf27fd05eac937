"""Named groups of mappings that several architectures share verbatim (embeddings, attention, MLPs).

Each architecture file (`qwen3.py`, `llama.py`, ...) lists in its `ARCHITECTURE.mappings` the groups it is
made of plus anything of its own, so the table of an architecture reads top to bottom in one place. Every group carries both
megatron layer-spec namings of the same tensor:
- local spec (`get_gpt_layer_local_spec`, the only one on CPU): separate `input_layernorm` /
  `pre_mlp_layernorm`, experts in `SequentialMLP` as `mlp.experts.local_experts.{e}.linear_fc1.weight`;
- Transformer Engine spec (`get_gpt_layer_with_transformer_engine_spec`): the norm before attention and
  before a dense MLP is fused into the next linear (`linear_qkv.layer_norm_weight`,
  `mlp.linear_fc1.layer_norm_weight`); a MoE layer keeps `pre_mlp_layernorm` (a TENorm); experts are
  `SequentialMLP` (same names as local) or, with `moe_grouped_gemm`, `TEGroupedMLP` whose
  `TEColumnParallelGroupedLinear` holds `mlp.experts.linear_fc1.weight{e}`. The legacy `GroupedMLP`
  (`weight1` / `weight2`, all experts in one tensor) is not mapped.
A model only has one of the namings, so the other entries simply never match.
Tests: `python -m pytest tests/unit/test_bridge_mapping.py -q`
"""

from __future__ import annotations

import copy

from megatron_sapo.bridge.mapping import Direct, FusedQKV, GatedMLP, Mapping, VocabParallel

M = "decoder.layers.{layer}."
H = "model.layers.{layer}."
COLUMN, ROW = 0, 1

EMBEDDINGS = (
    VocabParallel("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    VocabParallel("output_layer.weight", "lm_head.weight", tied_to="model.embed_tokens.weight"),
    Direct("decoder.final_layernorm.weight", "model.norm.weight"),
)

ATTENTION = (
    Direct(M + "input_layernorm.weight", H + "input_layernorm.weight"),
    Direct(M + "self_attention.linear_qkv.layer_norm_weight", H + "input_layernorm.weight"),  # TE
    FusedQKV(
        M + "self_attention.linear_qkv.weight",
        H + "self_attn.q_proj.weight",
        H + "self_attn.k_proj.weight",
        H + "self_attn.v_proj.weight",
    ),
    Direct(M + "self_attention.linear_proj.weight", H + "self_attn.o_proj.weight", split=ROW),
)

QKV_BIAS = (
    FusedQKV(
        M + "self_attention.linear_qkv.bias",
        H + "self_attn.q_proj.bias",
        H + "self_attn.k_proj.bias",
        H + "self_attn.v_proj.bias",
    ),
)

QK_NORM = (
    Direct(M + "self_attention.q_layernorm.weight", H + "self_attn.q_norm.weight"),
    Direct(M + "self_attention.k_layernorm.weight", H + "self_attn.k_norm.weight"),
)

# Dense MLP layers (also the `mlp_only_layers` of MoE models). `pre_mlp_layernorm` is the local-spec
# norm of every layer and the TE norm of MoE layers.
DENSE_MLP = (
    Direct(M + "pre_mlp_layernorm.weight", H + "post_attention_layernorm.weight"),
    Direct(M + "mlp.linear_fc1.layer_norm_weight", H + "post_attention_layernorm.weight"),  # TE
    GatedMLP(M + "mlp.linear_fc1.weight", H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"),
    Direct(M + "mlp.linear_fc2.weight", H + "mlp.down_proj.weight", split=ROW),
)

# Routed experts under their per-expert checkpoint names (what SGLang loads; never transformers-5's
# in-memory fused `mlp.experts.gate_up_proj`, which SGLang silently ignores).
_EXPERT = H + "mlp.experts.{expert}."
ROUTED_EXPERTS = (
    Direct(M + "mlp.router.weight", H + "mlp.gate.weight"),
    GatedMLP(
        M + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
        _EXPERT + "gate_proj.weight",
        _EXPERT + "up_proj.weight",
    ),
    Direct(
        M + "mlp.experts.local_experts.{expert}.linear_fc2.weight", _EXPERT + "down_proj.weight", split=ROW
    ),
    GatedMLP(
        M + "mlp.experts.linear_fc1.weight{expert}", _EXPERT + "gate_proj.weight", _EXPERT + "up_proj.weight"
    ),
    Direct(
        M + "mlp.experts.linear_fc2.weight{expert}", _EXPERT + "down_proj.weight", split=ROW
    ),  # TE grouped
)

# Qwen2-MoE's always-on expert, scaled by sigmoid(shared_expert_gate(x)); TP-split like a dense MLP.
SHARED_EXPERT = (
    GatedMLP(
        M + "mlp.shared_experts.linear_fc1.weight",
        H + "mlp.shared_expert.gate_proj.weight",
        H + "mlp.shared_expert.up_proj.weight",
    ),
    Direct(M + "mlp.shared_experts.linear_fc2.weight", H + "mlp.shared_expert.down_proj.weight", split=ROW),
    Direct(M + "mlp.shared_experts.gate_weight", H + "mlp.shared_expert_gate.weight"),
)


def in_language_model(*groups: tuple[Mapping, ...]) -> tuple[Mapping, ...]:
    """The groups with their `model.*` HF names under `model.language_model.*` (Qwen3-VL's text tower);
    `lm_head.weight` stays at the top, as in the official checkpoints."""

    def moved(name: str | None) -> str | None:
        return "model.language_model." + name[len("model.") :] if name and name.startswith("model.") else name

    out = []
    for mapping in (m for group in groups for m in group):
        clone = copy.copy(mapping)
        object.__setattr__(clone, "hf", tuple(moved(n) for n in mapping.hf))
        if getattr(mapping, "tied_to", None):
            object.__setattr__(clone, "tied_to", moved(mapping.tied_to))
        out.append(clone)
    return tuple(out)


# Qwen3-VL's vision tower (`megatron/vlm.py`): transformers' own module, replicated over TP, so every
# tensor is a Direct copy under its HF name. `{block}` is the vision block / deepstack merger index.
_V, _HV = "vision.", "model.visual."
_MERGER = (
    "norm.weight",
    "norm.bias",
    "linear_fc1.weight",
    "linear_fc1.bias",
    "linear_fc2.weight",
    "linear_fc2.bias",
)
_BLOCK = tuple(
    f"{part}.{kind}"
    for part in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.linear_fc1", "mlp.linear_fc2")
    for kind in ("weight", "bias")
)
VISION_TOWER = (
    *(
        Direct(_V + n, _HV + n)
        for n in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed.weight")
    ),
    *(Direct(f"{_V}blocks.{{block}}.{n}", f"{_HV}blocks.{{block}}.{n}") for n in _BLOCK),
    *(Direct(f"{_V}merger.{n}", f"{_HV}merger.{n}") for n in _MERGER),
    *(
        Direct(f"{_V}deepstack_merger_list.{{block}}.{n}", f"{_HV}deepstack_merger_list.{{block}}.{n}")
        for n in _MERGER
    ),
)
