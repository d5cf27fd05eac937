"""megatron-core GPTModels built from Hugging Face configs (`megatron_sapo.megatron.models`) vs transformers.

Tiny random Qwen3 / Qwen3-MoE / Qwen2-MoE / Llama configs (head_dim 16 != hidden 64 / 4 heads, GQA 4/2):
the config mapping against the values the test passed to transformers, total parameter counts against
the transformers model, per-tensor shapes and values by exporting through the bridge and comparing with
what `save_pretrained` writes, and -- the independent reference -- logits of the megatron model after
loading the transformers weights through the bridge (`megatron_sapo.bridge`) equal transformers' logits
in fp32. Runs in this process on a 1-rank gloo group with megatron's parallel state.

    python -m pytest tests/unit/test_models.py -q
"""

from __future__ import annotations

import functools

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CPU tests (the CPU compatibility layer refuses CUDA machines)", allow_module_level=True)

from transformers import GPT2Config, MistralConfig

from megatron_sapo.bridge import export_hf_weights, load_hf_weights
from megatron_sapo.megatron.cpu import causal_attention_mask
from megatron_sapo.megatron.models import (
    build_gpt_model,
    layer_spec_for,
    padded_vocab_size,
    transformer_config_from_hf,
)
from tests.hf_reference import (
    checkpoint_state_dict,
    llama_config,
    qwen2_moe_config,
    qwen3_config,
    qwen3_moe_config,
    tiny_hf_model,
)

LOGIT_TOL = 1e-5

CASES = {
    "qwen3-untied": functools.partial(qwen3_config, tie_word_embeddings=False),
    "qwen3-tied": functools.partial(qwen3_config, tie_word_embeddings=True),
    "llama-tied": llama_config,
    "llama-untied-llama3-rope": functools.partial(
        llama_config,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=1e4,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    "qwen3moe-norm-topk": qwen3_moe_config,
    "qwen3moe-no-norm-topk-dense-layer": functools.partial(
        qwen3_moe_config, norm_topk_prob=False, mlp_only_layers=[1], tie_word_embeddings=True
    ),
    "qwen3moe-sparse-step-2": functools.partial(qwen3_moe_config, decoder_sparse_step=2),
    "qwen2moe-shared-expert": qwen2_moe_config,
}


pytestmark = pytest.mark.usefixtures("megatron_tp1")  # tests/conftest.py


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_count_and_shapes_match_transformers(case: str) -> None:
    hf_config = CASES[case]()
    hf = tiny_hf_model(hf_config)
    model = build_gpt_model(hf_config)
    # parameters() yields a tied weight once on both sides.
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    assert model.unpadded_vocab_size == hf_config.vocab_size
    # in-memory transformers-5 names (fused experts) in, checkpoint names out, every tensor bit-exact
    load_hf_weights(model, hf_config, hf.state_dict())
    exported = {name: t for bucket in export_hf_weights(model, hf_config) for name, t in bucket}
    reference = checkpoint_state_dict(hf)
    assert sorted(exported) == sorted(reference)
    for name, tensor in reference.items():
        assert torch.equal(exported[name], tensor), name


@torch.no_grad()
@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case: str) -> None:
    hf_config = CASES[case]()
    hf = tiny_hf_model(hf_config, seed=1)
    model = build_gpt_model(hf_config).eval()
    load_hf_weights(model, hf_config, hf.state_dict())

    batch, seq = 2, 12
    tokens = torch.randint(0, hf_config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(3))
    expected = hf(input_ids=tokens).logits
    got = model(tokens, torch.arange(seq).expand(batch, seq), causal_attention_mask(seq, batch))
    assert got.shape == expected.shape == (batch, seq, hf_config.vocab_size)
    err = (got - expected).abs().max().item()
    assert err <= LOGIT_TOL, f"{case}: max |logit diff| {err:.2e}"
    # the comparison must be sensitive: logits vary across tokens by far more than the tolerance
    assert expected.std().item() > 1e3 * LOGIT_TOL


def test_dense_config_mapping() -> None:
    hf_config = qwen3_config(tie_word_embeddings=False)
    config = transformer_config_from_hf(hf_config, on_cpu=True)
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size) == (2, 64, 96)
    assert (config.num_attention_heads, config.num_query_groups, config.kv_channels) == (4, 2, 16)
    assert config.layernorm_epsilon == 1e-5 and config.normalization == "RMSNorm"
    assert config.qk_layernorm and config.gated_linear_unit and not config.add_bias_linear
    assert config.activation_func is torch.nn.functional.silu
    assert config.params_dtype == torch.float32 and config.use_cpu_initialization
    assert config.num_moe_experts is None

    model = build_gpt_model(hf_config)
    assert not model.share_embeddings_and_output_weights
    assert model.max_sequence_length == 64
    inv_freq = model.rotary_pos_emb.inv_freq
    # RoPE theta 5e5 as passed to transformers: inv_freq_i = theta^(-2i / head_dim)
    torch.testing.assert_close(inv_freq, 5e5 ** (-torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    assert not transformer_config_from_hf(llama_config(), on_cpu=True).qk_layernorm
    assert build_gpt_model(llama_config()).share_embeddings_and_output_weights


def test_moe_config_mapping() -> None:
    config = transformer_config_from_hf(qwen3_moe_config(mlp_only_layers=[1]), on_cpu=True)
    assert (config.num_moe_experts, config.moe_router_topk, config.moe_ffn_hidden_size) == (4, 2, 32)
    assert config.ffn_hidden_size == 96  # the dense layer's width
    assert config.moe_layer_freq == [1, 0, 1]
    assert not config.moe_router_pre_softmax  # norm_topk_prob=True
    assert config.moe_shared_expert_intermediate_size is None

    # HF rule: MoE iff (i + 1) % step == 0 -> layers 1 (and 3, ...); megatron's int N would mean 0, N.
    step2 = transformer_config_from_hf(qwen3_moe_config(decoder_sparse_step=2), on_cpu=True)
    assert step2.moe_layer_freq == [0, 1, 0]
    no_norm = transformer_config_from_hf(qwen3_moe_config(norm_topk_prob=False), on_cpu=True)
    assert no_norm.moe_router_pre_softmax  # softmax over all experts, top-k kept unnormalised
    shared = transformer_config_from_hf(qwen2_moe_config(), on_cpu=True)
    assert shared.moe_shared_expert_intermediate_size == 48 and shared.moe_shared_expert_gate
    assert shared.add_qkv_bias and not shared.add_bias_linear


def test_gpu_settings_and_parallel_sizes() -> None:
    config = transformer_config_from_hf(qwen3_moe_config(), tp=2, pp=3, ep=4, etp=1, on_cpu=False)
    assert config.params_dtype == torch.bfloat16 and config.bf16 and not config.use_cpu_initialization
    assert config.sequence_parallel  # required by megatron for MoE with TP > 1
    assert config.moe_router_dtype == "fp32"
    sizes = (
        config.tensor_model_parallel_size,
        config.pipeline_model_parallel_size,
        config.expert_model_parallel_size,
        config.expert_tensor_parallel_size,
    )
    assert sizes == (2, 3, 4, 1)
    assert transformer_config_from_hf(qwen3_config(), num_layers=1, on_cpu=True).num_layers == 1


@pytest.mark.parametrize(
    ("vocab", "tp", "padded"),
    [(128, 1, 128), (129, 1, 129), (129, 2, 130), (130, 4, 132), (151936, 8, 151936)],
)
def test_vocab_padding(vocab: int, tp: int, padded: int) -> None:
    assert padded_vocab_size(vocab, tp) == padded


@pytest.mark.parametrize(
    ("make_config", "field"),
    [
        (lambda: GPT2Config(n_layer=1), "model_type 'gpt2'"),
        (lambda: MistralConfig(), "model_type 'mistral'"),
        (lambda: qwen3_config(attention_bias=True), "attention_bias"),
        (lambda: qwen3_config(hidden_act="gelu"), "hidden_act"),
        (lambda: qwen3_config(use_sliding_window=True, sliding_window=8), "use_sliding_window"),
        (lambda: llama_config(mlp_bias=True), "mlp_bias"),
        (
            lambda: qwen3_config(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)),
            "rope_type",
        ),
        (
            lambda: llama_config(
                rope_parameters=dict(
                    rope_type="llama3",
                    rope_theta=1e4,
                    factor=8.0,
                    low_freq_factor=2.0,
                    high_freq_factor=4.0,
                    original_max_position_embeddings=8192,
                )
            ),
            "rope_parameters",
        ),
        (lambda: qwen3_moe_config(num_experts_per_tok=1), "norm_topk_prob"),
        (lambda: qwen3_moe_config(mlp_only_layers=[0, 1, 2]), "mlp_only_layers"),
    ],
)
def test_unsupported_configs_raise_naming_the_field(make_config, field: str) -> None:
    hf_config = make_config()
    with pytest.raises(ValueError, match=field):
        transformer_config_from_hf(hf_config, on_cpu=True)


def test_spec_and_dtype_errors() -> None:
    config = transformer_config_from_hf(qwen3_config(), on_cpu=True)
    with pytest.raises(ValueError, match="Transformer Engine"):
        layer_spec_for(config, spec="te")
    with pytest.raises(ValueError, match="spec must be"):
        layer_spec_for(config, spec="fast")
    with pytest.raises(ValueError, match="fp32 only"):
        transformer_config_from_hf(qwen3_config(), dtype=torch.bfloat16, on_cpu=True)
    assert layer_spec_for(config).layer_specs  # "auto" falls back to the local spec on CPU
