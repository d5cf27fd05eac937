"""GPTModels built from Hugging Face configs at TP=2 / EP=2 (2 gloo ranks) vs the transformers model.

The ranks' parameters (split ones on every TP / EP rank, replicated ones once) add up to the transformers
count plus the vocab padding rows, and after each rank loads its slices of the transformers weights
through the bridge (`megatron_sapo.bridge.load_hf_weights`, from the in-memory state dict), the gathered
vocab-parallel logits equal transformers' logits (padding columns dropped). Vocab 129 is padded to 130
so that TP=2 can split it. Checkpoint round trips at more layouts: tests/distributed/test_bridge.py.

    python -m pytest tests/distributed/test_models_tp.py -q
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks
from tests.hf_reference import llama_config, qwen3_config, qwen3_moe_config, tiny_hf_model

LOGIT_TOL = 1e-5
BATCH, SEQ = 2, 10

# name -> (HF config factory, parallel sizes)
CASES = {
    "qwen3-untied-vocab129-tp2": (functools.partial(qwen3_config, vocab_size=129), dict(tp=2)),
    "llama-tied-tp2": (llama_config, dict(tp=2)),
    "qwen3moe-tp2": (functools.partial(qwen3_moe_config, mlp_only_layers=[1]), dict(tp=2)),
    "qwen3moe-ep2": (qwen3_moe_config, dict(ep=2)),
}


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(5))


def _rank_fn(rank: int, world_size: int, case: str) -> dict:
    from megatron.core import parallel_state

    from megatron_sapo.bridge import load_hf_weights
    from megatron_sapo.megatron.cpu import causal_attention_mask
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu

    make_config, sizes = CASES[case]
    init_megatron_cpu(**sizes)
    hf_config = make_config()
    model = build_gpt_model(hf_config).eval()
    params = {
        name: (
            tuple(p.shape),
            bool(getattr(p, "tensor_model_parallel", False)),
            getattr(p, "partition_dim", -1),
        )
        for name, p in model.named_parameters()
    }
    hf = tiny_hf_model(hf_config, seed=2)
    load_hf_weights(model, hf_config, hf.state_dict())
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    with torch.no_grad():
        logits = model(
            _tokens(hf_config.vocab_size),
            torch.arange(SEQ).expand(BATCH, SEQ),
            causal_attention_mask(SEQ, BATCH),
        )
    return dict(params=params, logits=logits, tp_rank=tp_rank, padded_vocab=model.vocab_size)


@pytest.mark.parametrize("case", sorted(CASES))
def test_sharded_shapes_counts_and_logits(case: str) -> None:
    make_config, sizes = CASES[case]
    hf_config = make_config()
    tp, ep = sizes.get("tp", 1), sizes.get("ep", 1)
    results = run_on_ranks(_rank_fn, world_size=2, args=(case,))

    hf = tiny_hf_model(hf_config, seed=2)
    padded_vocab = results[0]["padded_vocab"]
    assert padded_vocab == -(-hf_config.vocab_size // tp) * tp
    # TP / EP ranks hold equally shaped shards under the same local names
    assert results[0]["params"] == results[1]["params"]
    total = 0
    for rank, result in enumerate(results):
        for name, (shape, split, _) in result["params"].items():
            distinct = (split and tp > 1) or (ep > 1 and ".local_experts." in name)
            if distinct or rank == 0:  # a replicated parameter counts once
                total += torch.Size(shape).numel()
    pad_rows = padded_vocab - hf_config.vocab_size
    untied = 0 if hf_config.tie_word_embeddings else 1
    assert total == sum(p.numel() for p in hf.parameters()) + pad_rows * hf_config.hidden_size * (1 + untied)

    with torch.no_grad():
        expected_logits = hf(input_ids=_tokens(hf_config.vocab_size)).logits
    # vocab-parallel: TP rank r holds columns [r * V/tp, (r + 1) * V/tp); EP ranks hold the full vocab.
    by_tp_rank = sorted(results, key=lambda r: r["tp_rank"])[:tp] if tp > 1 else results[:1]
    logits = torch.cat([r["logits"] for r in by_tp_rank], dim=-1)
    assert logits.shape[-1] == padded_vocab
    err = (logits[..., : hf_config.vocab_size] - expected_logits).abs().max().item()
    assert err <= LOGIT_TOL, f"{case}: max |logit diff| {err:.2e}"
    if ep > 1:  # both EP ranks see the whole batch and must agree
        torch.testing.assert_close(results[0]["logits"], results[1]["logits"], rtol=0, atol=LOGIT_TOL)


def _pipeline_rank_fn(rank: int, world_size: int, vpp: int | None) -> list[dict]:
    """Per (virtual) stage of this rank: pre/post flags, global layer -> 'moe' | 'dense', param count."""
    from megatron.core import parallel_state

    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu

    init_megatron_cpu(pp=2)
    if vpp is not None:  # init_megatron_cpu has no VPP switch; rebuild the parallel state with it
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(
            pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=vpp
        )
    hf_config = qwen3_moe_config(num_hidden_layers=4, mlp_only_layers=[1], tie_word_embeddings=False)
    stages = []
    for vp_stage in range(vpp) if vpp is not None else [None]:
        model = build_gpt_model(hf_config, vp_stage=vp_stage)  # the model-provider call shape
        kinds = {  # layer_number is megatron's global 1-based index
            layer.layer_number - 1: "moe" if hasattr(layer.mlp, "router") else "dense"
            for layer in model.decoder.layers
        }
        stages.append(
            dict(
                pre=model.pre_process,
                post=model.post_process,
                kinds=kinds,
                numel=sum(p.numel() for p in model.parameters()),
            )
        )
    return stages


@pytest.mark.parametrize("vpp", [None, 2])
def test_pipeline_stages_place_moe_and_dense_layers_like_transformers(vpp: int | None) -> None:
    hf_config = qwen3_moe_config(num_hidden_layers=4, mlp_only_layers=[1], tie_word_embeddings=False)
    hf = tiny_hf_model(hf_config)
    # transformers' own placement: a layer is MoE iff its mlp has experts
    hf_kinds = {
        i: "moe" if hasattr(layer.mlp, "experts") else "dense" for i, layer in enumerate(hf.model.layers)
    }
    stages = [s for rank in run_on_ranks(_pipeline_rank_fn, world_size=2, args=(vpp,)) for s in rank]

    kinds = {layer: kind for s in stages for layer, kind in s["kinds"].items()}
    assert kinds == hf_kinds
    assert sum(len(s["kinds"]) for s in stages) == hf_config.num_hidden_layers  # no layer built twice
    assert [s["pre"] for s in stages].count(True) == 1 and stages[0]["pre"]
    assert [s["post"] for s in stages].count(True) == 1 and stages[-1]["post"]
    assert sum(s["numel"] for s in stages) == sum(p.numel() for p in hf.parameters())
