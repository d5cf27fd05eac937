"""Tiny megatron-core models for CPU tests: parallel-state setup, a local-spec GPT builder, weight sharding.

Used inside ranks started by `megatron_sapo.utils.spawn.run_on_ranks` (gloo already initialised):

    init_megatron_cpu(tp=2)                       # parallel.init_parallel(ParallelConfig(tp=2), seed=1234)
    model = build_tiny_gpt(tiny_gpt_config())     # local (non-TE) layer spec, fp32, CPU
    load_full_weights(model, full, tp_rank=..., tp_size=2)   # full = TP=1 names -> tensors

Weights are made identical across layouts by construction: a TP=1 state dict is split along each
parameter's `partition_dim` (GLU fc1 halves split separately, pipeline layer numbers offset, experts
picked by EP rank), never by trusting megatron's initialisation to match.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

from megatron_sapo.megatron.batching import Sample
from megatron_sapo.megatron.cpu import cpu_transformer_config_kwargs
from megatron_sapo.megatron.parallel import ParallelConfig, init_parallel


def init_megatron_cpu(
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    etp: int | None = None,
    vpp: int | None = None,
    seed: int = 1234,
) -> None:
    """Tests' shorthand for `init_parallel` (CPU layer, parallel state, seeds) inside an initialised group."""
    init_parallel(ParallelConfig(tp=tp, pp=pp, ep=ep, etp=etp, vpp=vpp), seed=seed)


def random_samples(
    n: int, *, vocab: int, seed: int, lengths: tuple[int, int] = (9, 25), prompts: tuple[int, int] = (3, 7)
) -> list[Sample]:
    """`n` rollout samples with random tokens in [1, vocab), lengths in `[lengths)`, prompt lengths in
    `[prompts)` and N(0, 1) advantages, from a generator seeded with `seed` (the same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(*lengths, (1,), generator=generator))
        prompt = int(torch.randint(*prompts, (1,), generator=generator))
        tokens = torch.randint(1, vocab, (length,), generator=generator)
        out.append(
            Sample(tokens, response_start=prompt, advantage=float(torch.randn((), generator=generator)))
        )
    return out


def tiny_gpt_config(
    *, num_layers: int = 2, num_moe_experts: int | None = None, **overrides: Any
) -> TransformerConfig:
    """A Qwen3-like tiny config: GQA 4/2 heads, SwiGLU, RMSNorm, QK-norm; MoE when `num_moe_experts`."""
    kwargs: dict[str, Any] = dict(
        num_layers=num_layers,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=64,
        kv_channels=8,
        normalization="RMSNorm",
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=parallel_state.get_expert_model_parallel_world_size(),
        **cpu_transformer_config_kwargs(),
    )
    if num_moe_experts is not None:
        kwargs.update(
            num_moe_experts=num_moe_experts,
            moe_router_topk=2,
            moe_ffn_hidden_size=32,
            moe_token_dispatcher_type="alltoall",
            moe_router_load_balancing_type="none",
            moe_aux_loss_coeff=0.0,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_tiny_gpt(
    config: TransformerConfig, *, vocab_size: int = 64, max_seq_len: int = 32, tie_embeddings: bool = True
) -> GPTModel:
    """A `GPTModel` on the local layer spec for this rank's pipeline stage (RoPE, fp32, CPU)."""
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        qk_layernorm=config.qk_layernorm,
        normalization=config.normalization,
    )
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=max_seq_len,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=tie_embeddings,
        position_embedding_type="rope",
    )


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.local_experts\.(\d+)\.")


def full_name(local_name: str, *, layer_offset: int, expert_offset: int) -> str:
    """Map a parameter name on this pipeline stage / EP rank to its name in the TP=PP=EP=1 model."""
    name = _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + layer_offset}.", local_name)
    return _EXPERT.sub(lambda m: f".local_experts.{int(m.group(1)) + expert_offset}.", name)


def shard_offsets(model: GPTModel) -> dict[str, int]:
    """This rank's pipeline layer offset and first global expert index (for `full_name`)."""
    config = model.config
    num_local_experts = (config.num_moe_experts or 0) // parallel_state.get_expert_model_parallel_world_size()
    return dict(
        layer_offset=get_transformer_layer_offset(config),
        expert_offset=parallel_state.get_expert_model_parallel_rank() * num_local_experts,
    )


def shard_tensor(
    full: torch.Tensor, param: torch.nn.Parameter, name: str, *, tp_rank: int, tp_size: int
) -> torch.Tensor:
    """This TP rank's slice of a full tensor, following the parameter's megatron partitioning."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if ".linear_fc1." in name and full.shape[dim] == 2 * param.shape[dim]:
        # GLU fc1 stores [gate; up]; each TP rank holds [gate_r; up_r], not a contiguous chunk.
        gate, up = full.chunk(2, dim=dim)
        return torch.cat(
            [gate.chunk(tp_size, dim=dim)[tp_rank], up.chunk(tp_size, dim=dim)[tp_rank]], dim=dim
        )
    return full.chunk(tp_size, dim=dim)[tp_rank]


@torch.no_grad()
def load_full_weights(model: GPTModel, full: dict[str, torch.Tensor], *, tp_rank: int, tp_size: int) -> None:
    """Copy TP=PP=EP=1 weights (`full`, by name) into this rank's shard of `model`."""
    offsets = shard_offsets(model)
    for name, param in model.named_parameters():
        key = full_name(name, **offsets)
        if key == "output_layer.weight" and key not in full:
            key = "embedding.word_embeddings.weight"  # tied copy held by the last pipeline stage
        source = full[key]
        param.copy_(shard_tensor(source, param, name, tp_rank=tp_rank, tp_size=tp_size))


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Overwrite every parameter from a seeded generator (norm weights near 1); return them by name."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator, dtype=param.dtype)
        param.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return {name: p.detach().clone() for name, p in model.named_parameters()}
