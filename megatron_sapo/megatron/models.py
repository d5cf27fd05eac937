"""Build megatron-core `GPTModel`s from a Hugging Face config: Qwen3, Qwen3-MoE, Qwen2-MoE, Llama.

    from functools import partial
    from megatron_sapo.megatron.models import build_gpt_model, transformer_config_from_hf

    config = transformer_config_from_hf(hf_config, tp=2, pp=1)       # TransformerConfig (CPU: fp32)
    provider = partial(build_gpt_model, hf_config, config=config)     # megatron model_provider shape
    model = provider(pre_process=True, post_process=True, vp_stage=None)

Each supported `model_type` is one file under `megatron_sapo/bridge/arch/` holding its `Architecture`:
the facts the shared code below reads and the bridge's mapping table, so a new architecture is that one
file (`architecture_of` reads the bridge's registry). Parallel state must be initialised
before `build_gpt_model` (megatron reads the TP/PP/EP groups from it). On CPU call
`megatron_sapo.megatron.cpu.enable_cpu_compat()` first; the config then carries the CPU settings.

Weights are left at megatron's initialisation: loading Hugging Face weights is the bridge's job.
Tests: `python -m pytest tests/unit/test_models.py tests/distributed/test_models_tp.py -q`
(logits agree with transformers to ~1e-6 in fp32 after loading through `megatron_sapo.bridge`).
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_sapo.bridge.arch import Architecture, architecture_of, language_config
from megatron_sapo.megatron.parallel import on_gpu

SpecName = Literal["auto", "local", "te"]


# megatron-core's RotaryEmbedding._apply_scaling hard-codes these Llama-3.1 constants; only `factor` is
# passed through GPTModel, so other values cannot be reproduced.
_MEGATRON_LLAMA3_ROPE = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _unsupported(hf_config: Any, field: str, value: Any, why: str) -> ValueError:
    return ValueError(f"{hf_config.model_type}: {field}={value!r} is not supported ({why})")


def _check_supported(hf_config: Any, arch: Architecture) -> None:
    for field in arch.must_be_false:
        if getattr(hf_config, field, False):
            raise _unsupported(hf_config, field, getattr(hf_config, field), "no megatron equivalent here")
    if hf_config.hidden_act != "silu":
        raise _unsupported(hf_config, "hidden_act", hf_config.hidden_act, "only SwiGLU (silu) is mapped")
    layer_types = getattr(hf_config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        raise _unsupported(hf_config, "layer_types", sorted(set(layer_types)), "only full attention")
    if getattr(hf_config, "partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(
            hf_config, "partial_rotary_factor", hf_config.partial_rotary_factor, "full RoPE only"
        )
    rope_settings(hf_config)  # GPTModel takes RoPE, but an unsupported scaling should fail this early


def rope_settings(hf_config: Any) -> dict[str, Any]:
    """GPTModel RoPE kwargs (`rotary_base`, `rope_scaling`, `rope_scaling_factor`) from the HF config.

    transformers 5.x keeps theta and scaling in `config.rope_parameters` (4.x: `rope_theta` plus an
    optional `rope_scaling` dict); both are read.
    """
    arch = architecture_of(hf_config)
    hf_config = language_config(hf_config)
    params = dict(
        getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    )
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    if theta is None:
        raise _unsupported(hf_config, "rope_theta", None, "no RoPE theta in rope_parameters or rope_theta")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in arch.rope_types:
        raise _unsupported(hf_config, "rope_parameters.rope_type", rope_type, f"supported: {arch.rope_types}")
    if rope_type == "llama3":
        fixed = {k: params.get(k) for k in _MEGATRON_LLAMA3_ROPE}
        if fixed != _MEGATRON_LLAMA3_ROPE:
            raise _unsupported(
                hf_config,
                "rope_parameters",
                fixed,
                f"megatron fixes llama3 scaling at {_MEGATRON_LLAMA3_ROPE}",
            )
        return dict(rotary_base=float(theta), rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    return dict(rotary_base=float(theta), rope_scaling=False)


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Smallest multiple of `tp` >= `vocab_size` (megatron's vocab-parallel layers split rows evenly).

    The extra rows are real logits: consumers must ignore columns >= the original `vocab_size`.
    """
    return -(-vocab_size // tp) * tp


def _moe_layer_pattern(hf_config: Any) -> list[int]:
    """1 for a routed-expert layer, 0 for a dense MLP, per layer, with the Hugging Face rule."""
    step, dense_only = hf_config.decoder_sparse_step, set(hf_config.mlp_only_layers or [])
    return [int(i not in dense_only and (i + 1) % step == 0) for i in range(hf_config.num_hidden_layers)]


def _moe_kwargs(hf_config: Any, arch: Architecture) -> dict[str, Any]:
    pattern = _moe_layer_pattern(hf_config)
    if not any(pattern):
        raise _unsupported(hf_config, "mlp_only_layers", hf_config.mlp_only_layers, "no MoE layer is left")
    if hf_config.num_experts_per_tok == 1 and hf_config.norm_topk_prob:
        # HF gives the lone expert weight 1; megatron's post-softmax top-1 is refused (zero gradient).
        raise _unsupported(hf_config, "norm_topk_prob", True, "with num_experts_per_tok=1")
    kwargs: dict[str, Any] = dict(
        num_moe_experts=hf_config.num_experts,
        moe_router_topk=hf_config.num_experts_per_tok,
        moe_ffn_hidden_size=hf_config.moe_intermediate_size,
        # HF: softmax over all experts, top-k, then renormalise iff norm_topk_prob. Renormalised top-k
        # softmax probabilities equal a softmax over the top-k logits, which is megatron's
        # pre_softmax=False; pre_softmax=True keeps the unnormalised full-softmax probabilities.
        moe_router_pre_softmax=not hf_config.norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_dtype="fp32",  # HF routes in fp32 whatever the model dtype
        # megatron's integer freq N marks layers 0, N, 2N (HF: N-1, 2N-1, ...), so always pass the list.
        moe_layer_freq=1 if all(pattern) else pattern,
        moe_token_dispatcher_type="alltoall",
        # HF adds its aux loss only with output_router_logits; RL keeps routing untouched by default.
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
    )
    shared = getattr(hf_config, "shared_expert_intermediate_size", 0) if arch.shared_expert else 0
    if shared:
        kwargs.update(moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True)
    return kwargs


def transformer_config_from_hf(
    hf_config: Any,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    dtype: torch.dtype | None = None,
    sequence_parallel: bool | None = None,
    on_cpu: bool | None = None,
    **overrides: Any,
) -> TransformerConfig:
    """Megatron `TransformerConfig` equivalent to `hf_config` at the given parallel layout.

    `dtype`: parameter dtype (default bf16 on GPU, fp32 on CPU; CPU accepts fp32 only).
    `sequence_parallel`: default on when tp > 1 on GPU (megatron requires it for MoE with TP), off on CPU
    (where it is impossible: True raises). `on_cpu`: default `not parallel.on_gpu()`; True merges
    `cpu_transformer_config_kwargs()` (fp32, CPU init, fusions off). `overrides` are TransformerConfig fields applied last (e.g. `recompute_granularity`,
    `moe_aux_loss_coeff`). Raises ValueError for unsupported architectures or fields.
    """
    arch = architecture_of(hf_config)
    hf_config = language_config(hf_config)
    _check_supported(hf_config, arch)
    on_cpu = not on_gpu() if on_cpu is None else on_cpu
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    kwargs: dict[str, Any] = dict(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        num_attention_heads=hf_config.num_attention_heads,
        num_query_groups=hf_config.num_key_value_heads,
        kv_channels=head_dim,  # Qwen3 decouples head_dim from hidden_size / heads
        ffn_hidden_size=hf_config.intermediate_size,
        normalization="RMSNorm",
        layernorm_epsilon=hf_config.rms_norm_eps,
        qk_layernorm=arch.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=bool(getattr(hf_config, arch.qkv_bias_field)) if arch.qkv_bias_field else False,
        hidden_dropout=0.0,
        attention_dropout=float(getattr(hf_config, "attention_dropout", 0.0)),
        init_method_std=hf_config.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    if arch.moe:
        kwargs.update(_moe_kwargs(hf_config, arch))
    if arch.vision:
        kwargs.update(mrope_section=list(hf_config.rope_parameters["mrope_section"]))
    if on_cpu:
        from megatron_sapo.megatron.cpu import cpu_transformer_config_kwargs

        if dtype not in (None, torch.float32):
            raise ValueError(f"dtype={dtype} on CPU: megatron's CPU path is fp32 only")
        if sequence_parallel:
            raise ValueError("sequence_parallel on CPU: megatron's sequence parallelism needs a GPU")
        kwargs.update(cpu_transformer_config_kwargs())
    else:
        dtype = dtype or torch.bfloat16
        kwargs.update(
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            # megatron refuses MoE + TP without it, and it is the memory-sane default with TP on GPU.
            sequence_parallel=tp > 1 if sequence_parallel is None else sequence_parallel,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def te_available() -> bool:
    """Transformer Engine importable and a CUDA device present (the TE layer spec needs both)."""
    return importlib.util.find_spec("transformer_engine") is not None and on_gpu()


def layer_spec_for(
    config: TransformerConfig, *, spec: SpecName = "auto", vp_stage: int | None = None
) -> TransformerBlockSubmodules:
    """Decoder block spec for this rank's pipeline stage (and virtual stage `vp_stage`).

    `spec`: "te" (Transformer Engine modules; needs TE and CUDA), "local" (megatron-core's own modules:
    the only choice on CPU), or "auto" (TE when available). Uses megatron's block-spec helper, which
    also places dense and MoE layers per `config.moe_layer_freq`.
    """
    if spec not in ("auto", "local", "te"):
        raise ValueError(f"spec must be 'auto', 'local' or 'te', got {spec!r}")
    if spec == "te" and not te_available():
        raise ValueError(
            "spec='te' needs Transformer Engine and CUDA (transformer_engine importable: "
            f"{importlib.util.find_spec('transformer_engine') is not None}, cuda: {on_gpu()})"
        )
    use_te = spec == "te" or (spec == "auto" and te_available())
    return get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=config.normalization, vp_stage=vp_stage
    )


def gpt_model_kwargs(hf_config: Any, *, tp: int) -> dict[str, Any]:
    """`GPTModel` arguments that come from the HF config rather than TransformerConfig (vocab, RoPE, tying)."""
    arch = architecture_of(hf_config)
    hf_config = language_config(hf_config)
    _check_supported(hf_config, arch)  # includes the RoPE checks
    return dict(
        vocab_size=padded_vocab_size(hf_config.vocab_size, tp),
        max_sequence_length=hf_config.max_position_embeddings,
        share_embeddings_and_output_weights=bool(hf_config.tie_word_embeddings),
        position_embedding_type="rope",
        **rope_settings(hf_config),
    )


def build_gpt_model(
    hf_config: Any,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    *,
    vp_stage: int | None = None,
    spec: SpecName = "auto",
    config: TransformerConfig | None = None,
) -> GPTModel:
    """A `GPTModel` for this rank's (virtual) pipeline stage; a megatron model provider once partial'd.

    `config`: default `transformer_config_from_hf` at the parallel sizes of megatron's initialised
    parallel state. `pre_process` / `post_process`: default whether this is the first / last (virtual)
    pipeline stage. The returned model carries `unpadded_vocab_size` (the HF vocab size; its logits are
    `[.., padded_vocab_size / tp]` per TP rank, see `padded_vocab_size`).
    """
    if config is None:
        config = transformer_config_from_hf(
            hf_config,
            tp=parallel_state.get_tensor_model_parallel_world_size(),
            pp=parallel_state.get_pipeline_model_parallel_world_size(),
            ep=parallel_state.get_expert_model_parallel_world_size(),
            etp=parallel_state.get_expert_tensor_parallel_world_size(),
            vpp=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    kwargs = dict(
        config=config,
        transformer_layer_spec=layer_spec_for(config, spec=spec, vp_stage=vp_stage),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        **gpt_model_kwargs(hf_config, tp=config.tensor_model_parallel_size),
    )
    if architecture_of(hf_config).vision:
        from megatron_sapo.megatron.vlm import Qwen3VLModel

        model = Qwen3VLModel(hf_config, **kwargs)
    else:
        model = GPTModel(**kwargs)
    model.unpadded_vocab_size = language_config(hf_config).vocab_size
    return model
