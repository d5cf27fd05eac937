"""Rollout correction (`loss.rollout_correction`: TIS / MIS of π_old against the engine's μ) against closed forms.

- TIS weights are min(π_old/μ, C) token by token, zero on padding, and the truncated fraction counts ρ > C;
- MIS drops exactly the sequences whose mean |log π_old − log μ| exceeds log C (built by hand on both sides
  of the bound), and a masked sequence still counts in 1/N;
- with μ = π_old every correction is 1: loss and gradient equal the uncorrected ones, for every loss;
- SAPO's corrected gradient is −w·r·min(ρ, C)·Â / (|y_i|·N) per token (Eq. 7–8 times the weight);
- the corrected loss of GSPO and GRPO is their per-token loss times the closed-form weights, aggregated;
- bad settings and a missing μ fail with the key's name.
Run: `python -m pytest tests/unit/test_rollout_correction.py -q` (seconds).
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_sapo.losses import LOSSES, compute_policy_loss, rollout_correction_weights
from megatron_sapo.losses.aggregation import aggregate

B, T, CAP = 6, 9, 2.0


def _inputs(seed: int = 0, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3 - 0.05
    old = logp + 0.3 * torch.randn(B, T, generator=g)
    engine = old + spread * torch.randn(B, T, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    for b in range(B):  # ragged right padding, one sequence of a single token
        mask[b, max(1, T - b) :] = False
    adv = torch.randn(B, generator=g)
    return logp, old, engine, mask, adv


def test_tis_weights_are_truncated_ratios() -> None:
    _, old, engine, mask, _ = _inputs(spread=1.0)
    weights, metrics = rollout_correction_weights(old, engine, mask, mode="tis", cap=CAP)
    for b in range(B):
        for t in range(T):
            rho = math.exp(float(old[b, t]) - float(engine[b, t]))
            want = min(rho, CAP) if mask[b, t] else 0.0
            assert float(weights[b, t]) == pytest.approx(want, rel=1e-5, abs=1e-7)
    rho = (old - engine).exp()[mask]
    assert 0 < float((rho > CAP).float().mean()) < 1  # the case exercises truncation on some tokens only
    assert metrics["rollout_correction/truncated_fraction"] == pytest.approx(
        float((rho > CAP).float().mean())
    )
    assert metrics["rollout_correction/weight_mean"] == pytest.approx(
        float(rho.clamp(max=CAP).mean()), rel=1e-5
    )
    want_abs = float((old - engine).abs()[mask].mean())
    assert metrics["rollout_correction/abs_log_ratio_mean"] == pytest.approx(want_abs, rel=1e-5)
    assert not weights.requires_grad


def test_mis_masks_exactly_the_sequences_past_the_bound() -> None:
    bound = math.log(CAP)
    old = torch.zeros(4, 3)
    # per-sequence mean |Δ| (3 valid tokens each): 0.5·b, 1.01·b, 0.99·b, mixed signs 1.2·b -> masked: 2nd, 4th
    deltas = (
        torch.tensor([[0.5, -0.5, 0.5], [1.01, 1.01, -1.01], [0.99, -0.99, 0.99], [1.2, -1.2, 1.2]]) * bound
    )
    engine = old - deltas
    mask = torch.ones(4, 3, dtype=torch.bool)
    weights, metrics = rollout_correction_weights(old, engine, mask, mode="mis", cap=CAP)
    assert weights.tolist() == [[1.0] * 3, [0.0] * 3, [1.0] * 3, [0.0] * 3]
    assert metrics["rollout_correction/masked_fraction"] == pytest.approx(0.5)
    # padding does not enter a sequence's mean: a huge gap on a padded position changes nothing
    engine[0, 2], mask[0, 2] = -100.0, False
    weights, _ = rollout_correction_weights(old, engine, mask, mode="mis", cap=CAP)
    assert weights[0].tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_exact_engine_leaves_loss_and_gradient_unchanged(name: str, mode: str) -> None:
    logp, old, _, mask, adv = _inputs()
    results = []
    for correction in ("off", mode):
        x = logp.clone().requires_grad_(True)
        loss, metrics = compute_policy_loss(
            name, x, old, adv, mask, rollout_correction=correction, engine_logp=old.clone()
        )
        loss.backward()
        results.append((float(loss), x.grad.clone(), metrics))
    (l0, g0, _), (l1, g1, m1) = results
    assert l1 == l0 and torch.equal(g1, g0)
    assert m1["rollout_correction/weight_mean"] == 1.0 and m1["rollout_correction/abs_log_ratio_mean"] == 0.0


def test_sapo_corrected_gradient_matches_closed_form() -> None:
    logp, old, engine, mask, adv = _inputs(seed=3)
    tau_pos, tau_neg = 1.0, 1.05
    x = logp.clone().requires_grad_(True)
    loss, _ = compute_policy_loss(
        "sapo", x, old, adv, mask, rollout_correction="tis", rollout_correction_cap=CAP, engine_logp=engine
    )
    loss.backward()
    n = mask.sum(-1).float()
    for b in range(B):
        tau = tau_pos if adv[b] > 0 else tau_neg
        for t in range(T):
            if not mask[b, t]:
                assert float(x.grad[b, t]) == 0.0
                continue
            r = math.exp(float(logp[b, t]) - float(old[b, t]))
            p = 1 / (1 + math.exp(-tau * (r - 1)))
            rho = min(math.exp(float(old[b, t]) - float(engine[b, t])), CAP)
            want = -(4 * p * (1 - p)) * r * rho * float(adv[b]) / (float(n[b]) * B)
            assert float(x.grad[b, t]) == pytest.approx(want, rel=1e-4, abs=1e-8)


@pytest.mark.parametrize("name", ["gspo", "grpo"])
@pytest.mark.parametrize("mode", ["tis", "mis"])
def test_corrected_loss_is_weighted_per_token_loss(name: str, mode: str) -> None:
    logp, old, engine, mask, adv = _inputs(seed=5, spread=0.9)
    loss, metrics = compute_policy_loss(
        name, logp, old, adv, mask, rollout_correction=mode, rollout_correction_cap=CAP, engine_logp=engine
    )
    log_rho = old - engine
    if mode == "tis":
        weights = log_rho.exp().clamp(max=CAP)
    else:
        seq_dev = torch.stack([log_rho[b][mask[b]].abs().mean() for b in range(B)])
        weights = (seq_dev <= math.log(CAP)).float()[:, None].expand(B, T)
        assert 0 < metrics["rollout_correction/masked_fraction"] < 1  # some sequences masked, not all
    per_token, _ = LOSSES[name]((logp - old).clamp(-20, 20), adv[:, None].expand(B, T), mask)
    want = aggregate(per_token * weights, mask, "seq-mean-token-mean", None)
    assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-7)


def test_bad_settings_name_the_problem() -> None:
    from megatron_sapo.megatron.engine import LossConfig
    from megatron_sapo.utils.typed_config import ConfigError

    logp, old, _, mask, adv = _inputs()
    with pytest.raises(ValueError, match="engine_logp"):
        compute_policy_loss("sapo", logp, old, adv, mask, rollout_correction="tis")
    with pytest.raises(ValueError, match="cap must be > 1"):
        rollout_correction_weights(old, old, mask, mode="tis", cap=1.0)
    with pytest.raises(ConfigError, match="rollout_correction"):
        LossConfig(rollout_correction="is")
    with pytest.raises(ConfigError, match="rollout_correction_cap"):
        LossConfig(rollout_correction="tis", rollout_correction_cap=0.5)


def test_collate_places_engine_logprobs_on_response_positions() -> None:
    from megatron_sapo.megatron.batching import Sample, collate

    a = Sample(
        torch.arange(6), response_start=3, advantage=1.0, engine_logprobs=torch.tensor([-1.0, -2.0, -3.0])
    )
    b = Sample(torch.arange(4), response_start=2, advantage=1.0, engine_logprobs=torch.tensor([-4.0, -5.0]))
    batch = collate([a, b])
    # position p predicts token p + 1: response token j of a sample sits at response_start − 1 + j
    assert batch.engine_logprobs.tolist() == [[0, 0, -1, -2, -3], [0, -4, -5, 0, 0]]
    assert collate([Sample(torch.arange(3), response_start=1, advantage=0.0)]).engine_logprobs is None
    with pytest.raises(ValueError, match="engine_logprobs"):
        Sample(torch.arange(4), response_start=2, advantage=0.0, engine_logprobs=torch.zeros(3))
