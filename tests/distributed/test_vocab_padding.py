"""Vocab padding: an HF vocab that is not a multiple of TP (301 at TP2 -> 302 rows) vs transformers.

megatron's vocab-parallel layers need `padded_vocab_size` rows, so the TP2 model has one logit column
(on rank 1) that HF does not. Tiny random HF models (`tests.hf_reference`, a tied Qwen3 and an untied
Qwen3-MoE) are loaded into `PolicyEngine` through the bridge at TP1 and TP2 (gloo ranks). Checked:
- `vocab_parallel_logprobs(..., vocab_size=V)` ignores shard columns >= V, even huge ones: log-probs,
  entropies and gradients equal a float64 log_softmax over the V real columns; padded columns get 0;
- `compute_logprobs` equals transformers' log_softmax of the same checkpoint (fp32, <= 1e-5);
- one on-policy train step: the padded embedding / output rows get exactly zero gradient (and stay 0),
  and the gradient norm equals transformers' autograd one (dense model);
- `export_hf_weights` gives back the checkpoint bit-exact (V rows, padding dropped).

    python -m pytest tests/distributed/test_vocab_padding.py -q
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks
from tests.hf_reference import checkpoint_state_dict, qwen3_config, qwen3_moe_config, tiny_hf_model

VOCAB, NUM_SAMPLES, TOKEN_BUDGET, HF_SEED = 301, 6, 40, 3
TOL = 1e-5
MODELS = {
    "qwen3-tied": functools.partial(qwen3_config, vocab_size=VOCAB, tie_word_embeddings=True),
    "qwen3moe-untied": functools.partial(qwen3_moe_config, vocab_size=VOCAB, tie_word_embeddings=False),
}
# Parameters with one row per vocab entry (the output layer only exists when untied).
VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def _samples() -> list:
    from megatron_sapo.megatron.testing import random_samples

    # Targets near the top of the vocab: the last real column sits next to the padded one.
    samples = random_samples(NUM_SAMPLES, vocab=VOCAB, seed=5)
    samples[0].tokens[-3:] = torch.tensor([VOCAB - 1, VOCAB - 2, VOCAB - 1])
    return samples


def _kernel_rank_fn(rank: int, world_size: int, vocab: int, v_pad: int) -> dict:
    import torch.distributed as dist

    from megatron_sapo.megatron.logprobs import vocab_parallel_logprobs

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, v_pad, generator=generator, dtype=torch.float64) * 3
    logits[..., vocab:] = 50.0  # would dominate the softmax if it were counted
    target = torch.randint(0, vocab, (2, 5), generator=generator)
    target[0, :2] = vocab - 1
    upstream = torch.randn(2, 2, 5, generator=generator, dtype=torch.float64)
    v_local = v_pad // world_size
    shard = logits[..., rank * v_local : (rank + 1) * v_local].float().requires_grad_()
    group = dist.group.WORLD if world_size > 1 else None
    logp, ent = vocab_parallel_logprobs(
        shard, target, group, vocab_size=vocab, chunk_size=3, return_entropy=True, temperature=0.8
    )
    (logp.double() * upstream[0] + ent.double() * upstream[1]).sum().backward()
    # numpy: tensors sent between processes would be shared through memory the rank frees on exit
    out = dict(
        logp=logp.detach(), ent=ent.detach(), grad=shard.grad, logits=logits, target=target, up=upstream
    )
    return {k: v.numpy() for k, v in out.items()}


# (vocab, padded vocab): megatron's TP2 padding; and a TP2 shard of padding only (rank 1).
@pytest.mark.parametrize("tp, vocab, v_pad", [(1, VOCAB, VOCAB + 1), (2, VOCAB, VOCAB + 1), (2, 150, 302)])
def test_kernel_ignores_padded_columns(tp: int, vocab: int, v_pad: int) -> None:
    results = run_on_ranks(_kernel_rank_fn, world_size=tp, args=(vocab, v_pad))
    results = [{k: torch.from_numpy(v) for k, v in r.items()} for r in results]
    ref = results[0]
    x = ref["logits"][..., :vocab].clone().requires_grad_()
    logp_all = torch.log_softmax(x / 0.8, dim=-1)
    logp = logp_all.gather(-1, ref["target"][..., None]).squeeze(-1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    (logp * ref["up"][0] + ent * ref["up"][1]).sum().backward()
    grad = torch.cat([r["grad"] for r in results], dim=-1).double()
    for r in results:
        assert torch.allclose(r["logp"].double(), logp, atol=1e-5, rtol=0)
        assert torch.allclose(r["ent"].double(), ent, atol=1e-5, rtol=0)
    assert torch.allclose(grad[..., :vocab], x.grad, atol=1e-5, rtol=0)
    assert torch.all(grad[..., vocab:] == 0)


def _trains(model: str) -> bool:
    # megatron trains MoE layers at TP > 1 only with sequence parallelism, which its CPU (torch) norms
    # refuse: the MoE model is checked forward-only (log-probs, export).
    return "moe" not in model


def _engine_rank_fn(rank: int, world_size: int, model: str) -> dict:
    from functools import partial

    from megatron_sapo.bridge import export_hf_weights, load_hf_weights
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu

    init_megatron_cpu(tp=world_size)
    hf_config = MODELS[model]()
    engine = PolicyEngine(
        partial(build_gpt_model, hf_config),
        OptimConfig(lr=1e-3, weight_decay=0.1),
        LossConfig(mini_batches=1, micro_batch_tokens=TOKEN_BUDGET),
    )
    load_hf_weights(engine.model, hf_config, tiny_hf_model(hf_config, seed=HF_SEED).state_dict())
    buckets = export_hf_weights(engine.model, hf_config, dst_ranks=(0,))
    exported = {name: t.numpy().copy() for bucket in buckets for name, t in bucket}
    samples = _samples()
    old = engine.compute_logprobs(samples)
    out = dict(old=[x.numpy() for x in old], exported=exported)
    if not _trains(model):
        return out
    out["metrics"] = engine.train_step(samples, old)
    # Rows of this rank's vocab shard at global ids >= VOCAB, after the step: gradient and value.
    out["padded"] = {}
    for name, p in engine.model[0].module.named_parameters():
        if name in VOCAB_PARAMS:
            first_pad = max(0, VOCAB - rank * p.shape[0])
            out["padded"][name] = (
                p.main_grad[first_pad:].numpy().copy(),
                p.detach()[first_pad:].numpy().copy(),
            )
    return out


def _reference(model: str) -> tuple[list[torch.Tensor], float, dict[str, torch.Tensor]]:
    """transformers: response log-probs, the on-policy policy-gradient norm, and the checkpoint."""
    hf = tiny_hf_model(MODELS[model](), seed=HF_SEED)
    state = checkpoint_state_dict(hf)
    samples = _samples()
    logps, objective = [], 0.0
    for s in samples:
        logits = hf(s.tokens[None]).logits[0, s.response_start - 1 : -1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(-1, s.tokens[s.response_start :, None]).squeeze(-1)
        logps.append(logp.detach())
        objective = objective + s.advantage * logp.mean()
    (-objective / len(samples)).backward()
    grad_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in hf.parameters() if p.grad is not None))
    return logps, float(grad_norm), state


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("model", list(MODELS))
def test_engine_matches_transformers_with_odd_vocab(model: str, tp: int) -> None:
    from megatron_sapo.megatron.models import padded_vocab_size

    assert padded_vocab_size(VOCAB, 2) == VOCAB + 1
    ref, ref_grad_norm, state = _reference(model)
    results = run_on_ranks(_engine_rank_fn, world_size=tp, args=(model,))
    for rank, result in enumerate(results):
        diff = max(float((torch.from_numpy(x) - r).abs().max()) for x, r in zip(result["old"], ref))
        print(f"{model} tp{tp} rank{rank}: max |engine logp - transformers log_softmax| = {diff:.2e}")
        assert diff <= TOL
        if _trains(model):
            grad_norm = result["metrics"]["grad_norm"]
            print(f"{model} tp{tp}: grad norm {grad_norm:.8g} vs transformers {ref_grad_norm:.8g}")
            assert grad_norm == pytest.approx(ref_grad_norm, rel=1e-6)
            for name, (grad, value) in result["padded"].items():
                assert (grad == 0).all() and (value == 0).all(), f"{name}: padded rows got gradient or moved"
    if _trains(model):
        pad_rows = sum(r["padded"][VOCAB_PARAMS[0]][0].shape[0] for r in results)
        assert pad_rows == padded_vocab_size(VOCAB, tp) - VOCAB
    exported = results[0]["exported"]
    assert exported.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(torch.from_numpy(exported[name]), tensor), name
