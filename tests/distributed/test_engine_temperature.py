"""`PolicyEngine` at a sampling temperature T ≠ 1 vs transformers, at TP=1 and TP=2 (gloo ranks).

A tiny random Qwen3 (`tests.hf_reference`) is loaded into the engine through the bridge. With
`PolicyEngine(..., temperature=0.7)`:
- `compute_logprobs` equals log_softmax(logits / 0.7) of transformers' own forward at each response token
  (fp32, ≤ 1e-5), which is far from the temperature-1 log-probs;
- one on-policy SAPO train step (one mini-batch, several micro-batches) sees ratio exactly 1
  (`log_ratio/abs_mean` == 0: the training forward uses the same T as `compute_logprobs`), and its
  gradient norm equals that of transformers' autograd of −1/N Σ_i Â_i · mean_t log_softmax(logits / T)
  (SAPO's on-policy gradient is the plain policy gradient: w = 1 at r = 1).

    python -m pytest tests/distributed/test_engine_temperature.py -q
"""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks
from tests.hf_reference import qwen3_config, tiny_hf_model

TEMPERATURE, NUM_SAMPLES, TOKEN_BUDGET, HF_SEED = 0.7, 6, 40, 2
TOL = 1e-5


def _samples() -> list:
    from megatron_sapo.megatron.testing import random_samples

    return random_samples(NUM_SAMPLES, vocab=qwen3_config().vocab_size, seed=5)


def _rank_fn(rank: int, world_size: int, tp: int) -> dict:
    from functools import partial

    from megatron_sapo.bridge import load_hf_weights
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu

    init_megatron_cpu(tp=tp)
    hf_config = qwen3_config()
    engine = PolicyEngine(
        partial(build_gpt_model, hf_config),
        OptimConfig(lr=1e-3),
        LossConfig(mini_batches=1, micro_batch_tokens=TOKEN_BUDGET),
        temperature=TEMPERATURE,
    )
    load_hf_weights(engine.model, hf_config, tiny_hf_model(hf_config, seed=HF_SEED).state_dict())
    samples = _samples()
    old = engine.compute_logprobs(samples)
    metrics = engine.train_step(samples, old)
    return dict(old=[x.numpy() for x in old], metrics=metrics)


def _reference(temperature: float) -> tuple[list[torch.Tensor], float]:
    """transformers: per-sample response log-probs at `temperature`, and the on-policy SAPO grad norm."""
    model = tiny_hf_model(qwen3_config(), seed=HF_SEED)
    samples = _samples()
    logps, objective = [], 0.0
    for s in samples:
        logits = model(s.tokens[None]).logits[0, s.response_start - 1 : -1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        logp = logp.gather(-1, s.tokens[s.response_start :, None]).squeeze(-1)
        logps.append(logp.detach())
        objective = objective + s.advantage * logp.mean()
    (-objective / len(samples)).backward()
    grad_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in model.parameters()))
    return logps, float(grad_norm)


@pytest.fixture(scope="module")
def reference() -> dict[float, tuple[list[torch.Tensor], float]]:
    return {t: _reference(t) for t in (TEMPERATURE, 1.0)}


@pytest.mark.parametrize("tp", [1, 2])
def test_logprobs_and_on_policy_step_at_temperature(tp: int, reference: dict) -> None:
    from megatron_sapo.megatron.batching import pack_micro_batches

    assert len(pack_micro_batches([s.seq_len for s in _samples()], TOKEN_BUDGET)) >= 2
    ref, ref_grad_norm = reference[TEMPERATURE]
    untempered, _ = reference[1.0]
    assert max(float((a - b).abs().max()) for a, b in zip(ref, untempered)) > 0.1  # T matters here
    for result in run_on_ranks(_rank_fn, world_size=tp, args=(tp,)):
        diff = max(float((torch.from_numpy(x) - r).abs().max()) for x, r in zip(result["old"], ref))
        metrics = result["metrics"]
        print(f"tp{tp}: max |engine logp - transformers log_softmax(logits / {TEMPERATURE})| = {diff:.2e}")
        print(f"tp{tp}: grad norm {metrics['grad_norm']:.8g} vs transformers {ref_grad_norm:.8g}")
        assert diff <= TOL
        assert metrics["log_ratio/abs_mean"] == 0.0 and metrics["ratio/mean"] == 1.0
        assert metrics["grad_norm"] == pytest.approx(ref_grad_norm, rel=1e-6)
