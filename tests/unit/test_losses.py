"""Policy-loss library against closed forms (SAPO Eq. 7–8, GRPO/GSPO indicators) and invariances.

Run: python -m pytest tests/unit/test_losses.py -q
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest
import torch

from megatron_sapo.losses import LOSSES, compute_policy_loss, count_for_normalizer, group_advantages


def _batch(seed: int = 0, b: int = 6, t: int = 9, spread: float = 0.3):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=torch.float64) * 3
    logp = (old + spread * torch.randn(b, t, generator=g, dtype=torch.float64)).float().requires_grad_()
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.randn(b, generator=g)
    return logp, old.float(), adv, mask


def _grad(name: str, logp, old, adv, mask, **kw) -> torch.Tensor:
    loss, _ = compute_policy_loss(name, logp, old, adv, mask, **kw)
    (g,) = torch.autograd.grad(loss, logp)
    return g


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


# ---------------------------------------------------------------- closed forms


def test_sapo_gradient_matches_closed_form_with_padding():
    logp, old, adv, mask = _batch(1)
    grad = _grad("sapo", logp, old, adv, mask)
    r = np.exp(_np(logp) - _np(old))
    a = _np(adv)[:, None]
    tau = np.where(a > 0, 1.0, 1.05)
    p = 1.0 / (1.0 + np.exp(-tau * (r - 1.0)))
    w = 4.0 * p * (1.0 - p)
    m = _np(mask)
    n_tok = m.sum(1, keepdims=True)
    expected = -(1.0 / logp.shape[0]) * (1.0 / n_tok) * w * r * a * m
    np.testing.assert_allclose(_np(grad), expected, atol=1e-6, rtol=1e-5)
    assert np.all(_np(grad)[~mask.numpy()] == 0.0)


def test_sapo_loss_value_matches_closed_form():
    logp, old, adv, mask = _batch(2)
    loss, _ = compute_policy_loss("sapo", logp, old, adv, mask, tau_pos=0.7, tau_neg=1.3)
    r = np.exp(_np(logp) - _np(old))
    a = _np(adv)[:, None]
    tau = np.where(a > 0, 0.7, 1.3)
    f = 4.0 / tau / (1.0 + np.exp(-tau * (r - 1.0)))
    m = _np(mask)
    expected = -np.mean((f * a * m).sum(1) / m.sum(1))
    assert loss.item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_sapo_equals_grpo_gradient_on_policy():
    logp, _, adv, mask = _batch(3)
    old = logp.detach().clone()
    np.testing.assert_allclose(
        _np(_grad("sapo", logp, old, adv, mask)), _np(_grad("grpo", logp, old, adv, mask)), atol=1e-7
    )


def test_sapo_weight_times_ratio_bound():
    # w·r peaks at ≈1.575 (r≈2.06) for τ=1 and ≈1.536 (r≈1.99) for τ=1.05 (SAPO.md).
    r = torch.linspace(0.01, 6.0, 20001)
    logp = r.log()[None, :].clone().requires_grad_()
    old = torch.zeros_like(logp)
    mask = torch.ones_like(logp, dtype=torch.bool)
    for adv, peak, at in ((1.0, 1.575, 2.06), (-1.0, 1.536, 1.99)):
        g = _grad("sapo", logp, old, torch.tensor([adv]), mask)[0] * r.numel() * -adv  # = w·r
        i = int(torch.argmax(g))
        assert float(g[i]) == pytest.approx(peak, abs=2e-3)
        assert float(r[i]) == pytest.approx(at, abs=0.02)


def test_grpo_gradient_is_clip_indicator():
    logp, old, adv, mask = _batch(4, spread=0.5)
    grad = _grad("grpo", logp, old, adv, mask, eps_low=0.2, eps_high=0.27)
    r = np.exp(_np(logp) - _np(old))
    a = _np(adv)[:, None]
    active = ~(((r > 1.27) & (a > 0)) | ((r < 0.8) & (a < 0)))
    m = _np(mask)
    expected = -(1.0 / logp.shape[0]) / m.sum(1, keepdims=True) * r * a * active * m
    np.testing.assert_allclose(_np(grad), expected, atol=1e-6, rtol=1e-5)
    assert (~active & mask.numpy()).sum() > 0  # the batch really exercises clipping


@pytest.mark.parametrize("name", ["gspo", "gspo_token"])
def test_gspo_gradient_closed_form(name):
    logp, old, adv, mask = _batch(5, spread=1e-3)
    grad = _grad(name, logp, old, adv, mask)
    m = _np(mask)
    lr = (_np(logp) - _np(old)) * m
    s = np.exp(lr.sum(1) / m.sum(1))[:, None]
    a = _np(adv)[:, None]
    active = ~(((s > 1 + 4e-4) & (a > 0)) | ((s < 1 - 3e-4) & (a < 0)))
    expected = -(1.0 / logp.shape[0]) / m.sum(1, keepdims=True) * s * a * active * m
    np.testing.assert_allclose(_np(grad), expected, atol=1e-6, rtol=1e-5)
    assert active.any() and (~active).any()


def test_one_off_policy_token_kills_gspo_sequence_but_not_sapo():
    """SAPO's claim (§4): GSPO's hard sequence band zeroes the whole sequence for one outlier token;
    SAPO only down-weights that token and keeps the others at their on-policy gradient."""
    t = 16
    g = torch.Generator().manual_seed(7)
    old = -torch.rand(1, t, generator=g) * 2
    logp = (old + 1e-4 * torch.randn(1, t, generator=g)).clone()
    logp[0, 5] += 3.0  # one strongly off-policy token
    logp.requires_grad_()
    adv = torch.tensor([1.0])
    mask = torch.ones(1, t, dtype=torch.bool)
    on_policy = _grad("sapo", logp, logp.detach(), adv, mask)  # r = 1 everywhere: plain PG
    sapo = _grad("sapo", logp, old, adv, mask)
    gspo = _grad("gspo", logp, old, adv, mask)
    others = torch.arange(t) != 5
    assert torch.all(gspo == 0)
    rel = (sapo[0, others] - on_policy[0, others]).abs() / on_policy[0, others].abs()
    assert float(rel.max()) < 0.01
    assert abs(float(sapo[0, 5])) < 0.01 * abs(float(on_policy[0, 5]))  # outlier token is gated off


# ---------------------------------------------------------------- aggregation


def test_token_mean_aggregation_is_honoured():
    logp, old, adv, mask = _batch(8)
    loss, _ = compute_policy_loss(
        "grpo", logp, old, adv, mask, aggregation="token-mean", eps_low=10, eps_high=10
    )
    r = np.exp(_np(logp) - _np(old))
    m = _np(mask)
    expected = -(r * _np(adv)[:, None] * m).sum() / m.sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    seq, _ = compute_policy_loss("grpo", logp, old, adv, mask, eps_low=10, eps_high=10)
    assert abs(seq.item() - loss.item()) > 1e-4  # the two modes differ on ragged lengths


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_micro_batch_split_gives_the_same_gradient(name, aggregation):
    logp, old, adv, mask = _batch(9, b=8, spread=0.2 if name in ("sapo", "grpo") else 2e-4)
    full = _grad(name, logp, old, adv, mask, aggregation=aggregation)
    norm = count_for_normalizer(mask, aggregation)
    acc = torch.zeros_like(logp)
    for idx in (slice(0, 3), slice(3, 4), slice(4, 8)):
        part = logp.detach()[idx].clone().requires_grad_()
        loss, _ = compute_policy_loss(
            name, part, old[idx], adv[idx], mask[idx], aggregation=aggregation, normalizer=norm
        )
        loss.backward()
        acc[idx] = part.grad
    torch.testing.assert_close(acc, full, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padding_content_and_width_do_not_matter(name):
    logp, old, adv, mask = _batch(10)
    loss, _ = compute_policy_loss(name, logp, old, adv, mask)
    pad = 4
    logp2 = torch.cat([logp.detach(), torch.full((logp.shape[0], pad), 1e4)], 1)
    logp2 = torch.where(
        torch.cat([mask, torch.zeros_like(mask[:, :pad])], 1), logp2, torch.full_like(logp2, 1e4)
    )
    logp2.requires_grad_()
    old2 = torch.cat([old, torch.full((old.shape[0], pad), -1e4)], 1)
    mask2 = torch.cat([mask, torch.zeros_like(mask[:, :pad])], 1)
    loss2, _ = compute_policy_loss(name, logp2, old2, adv, mask2)
    assert loss2.item() == pytest.approx(loss.item(), rel=1e-6, abs=1e-7)
    (g2,) = torch.autograd.grad(loss2, logp2)
    torch.testing.assert_close(g2[:, : logp.shape[1]], _grad(name, logp, old, adv, mask), atol=1e-7, rtol=0)
    assert torch.isfinite(g2).all()


# ---------------------------------------------------------------- metrics, options, errors


def test_metrics_match_their_definitions():
    logp, old, adv, mask = _batch(11, spread=0.8)
    _, m = compute_policy_loss("sapo", logp, old, adv, mask)
    lr = _np(logp) - _np(old)
    valid = mask.numpy()
    a = np.broadcast_to(_np(adv)[:, None], lr.shape)
    tau = np.where(a > 0, 1.0, 1.05)
    p = 1 / (1 + np.exp(-tau * (np.exp(lr) - 1)))
    w = 4 * p * (1 - p)
    assert m["sapo/gate_mean"] == pytest.approx(p[valid].mean(), rel=1e-5)
    assert m["sapo/w_mean"] == pytest.approx(w[valid].mean(), rel=1e-5)
    assert m["sapo/w_below_half_frac"] == pytest.approx((w[valid] < 0.5).mean(), abs=1e-6)
    assert m["log_ratio/abs_mean"] == pytest.approx(np.abs(lr[valid]).mean(), rel=1e-5)
    variances = [lr[i][valid[i]].var() for i in range(lr.shape[0])]
    assert m["log_ratio/seq_var_mean"] == pytest.approx(np.mean(variances), rel=1e-4)
    assert m["log_ratio/seq_var_max"] == pytest.approx(np.max(variances), rel=1e-4)
    _, mg = compute_policy_loss("grpo", logp, old, adv, mask)
    r = np.exp(lr)
    clipped = ((r > 1.27) & (a > 0)) | ((r < 0.8) & (a < 0))
    assert mg["grpo/clip_frac"] == pytest.approx(clipped[valid].mean(), abs=1e-6)


def test_kl_and_entropy_terms():
    logp, old, adv, mask = _batch(12)
    ref = old + 0.05
    ent = torch.rand_like(old)
    base, _ = compute_policy_loss("sapo", logp, old, adv, mask)
    loss, metrics = compute_policy_loss(
        "sapo", logp, old, adv, mask, kl_coef=0.1, ref_logp=ref, entropy_coef=0.01, entropy=ent
    )
    d = _np(ref) - _np(logp)
    k3 = np.exp(d) - d - 1
    m = _np(mask)
    seq_mean = lambda x: np.mean((x * m).sum(1) / m.sum(1))  # noqa: E731
    expected = base.item() + 0.1 * seq_mean(k3) - 0.01 * seq_mean(_np(ent))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert metrics["kl"] == pytest.approx((k3 * m).sum() / m.sum(), rel=1e-5)
    with pytest.raises(ValueError, match="ref_logp"):
        compute_policy_loss("sapo", logp, old, adv, mask, kl_coef=0.1)


def test_per_token_advantages_choose_tau_per_token():
    logp, old, _, mask = _batch(13)
    adv_tok = torch.randn(logp.shape)
    grad = _grad("sapo", logp, old, adv_tok, mask, tau_pos=1.0, tau_neg=2.0)
    r = np.exp(_np(logp) - _np(old))
    a = _np(adv_tok)
    tau = np.where(a > 0, 1.0, 2.0)
    p = 1 / (1 + np.exp(-tau * (r - 1)))
    m = _np(mask)
    expected = -(1 / logp.shape[0]) / m.sum(1, keepdims=True) * 4 * p * (1 - p) * r * a * m
    np.testing.assert_allclose(_np(grad), expected, atol=1e-6, rtol=1e-5)


def test_bad_inputs_name_the_problem():
    logp, old, adv, mask = _batch(14)
    with pytest.raises(ValueError, match="unknown policy loss 'ppo'"):
        compute_policy_loss("ppo", logp, old, adv, mask)
    with pytest.raises(TypeError, match=r"unknown parameter\(s\) \['eps_low'\]"):
        compute_policy_loss("sapo", logp, old, adv, mask, eps_low=0.1)
    with pytest.raises(ValueError, match="advantages"):
        compute_policy_loss("sapo", logp, old, adv[:-1], mask)
    with pytest.raises(ValueError, match="aggregation"):
        compute_policy_loss("sapo", logp, old, adv, mask, aggregation="sum")


# ---------------------------------------------------------------- advantages


def test_group_advantages_reference():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.5, -1.0, 3.0, 0.0])
    adv = group_advantages(rewards, group_size=4, eps=1e-6)
    expected = []
    for grp in rewards.numpy().reshape(-1, 4):
        expected.extend((grp - grp.mean()) / (grp.std(ddof=1) + 1e-6))
    np.testing.assert_allclose(adv.numpy(), np.array(expected), rtol=1e-6, atol=1e-6)
    assert torch.all(adv[4:8] == 0)
    assert torch.all(group_advantages(rewards, group_size=1) == 0)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(rewards, group_size=5)


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7, 1 / 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_equal_partial_credit_rewards_give_exactly_zero_advantage(value, dtype):
    # fp32 means of eight 0.7s are 1 ulp off 0.7; divided by std + eps that was ±0.056 before the fix
    rewards = torch.full((8,), value, dtype=dtype)
    assert torch.equal(group_advantages(rewards, group_size=8), torch.zeros(8))


def test_mixed_groups_equal_ones_zero_others_the_closed_form():
    groups = [[0.7] * 4, [0.1, 0.3, 0.7, 1 / 3], [1 / 3] * 4, [0.0, 0.5, 0.5, 1.0]]
    rewards = torch.tensor([r for g in groups for r in g], dtype=torch.float32)
    adv = group_advantages(rewards, group_size=4, eps=1e-6)
    for i, group in enumerate(groups):
        got = adv[4 * i : 4 * (i + 1)]
        if len(set(group)) == 1:
            assert torch.equal(got, torch.zeros(4))
            continue
        fp32 = [float(torch.tensor(r, dtype=torch.float32)) for r in group]  # the rewards as given
        mean, std = statistics.fmean(fp32), statistics.stdev(fp32)
        expected = [(r - mean) / (std + 1e-6) for r in fp32]
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_extreme_log_ratios_give_finite_loss_and_gradient():
    for name in LOSSES:
        logp = torch.tensor([[50.0, -50.0, 0.0, 30.0]], requires_grad=True)
        old = torch.zeros(1, 4)
        for a in (1.0, -1.0):
            loss, metrics = compute_policy_loss(
                name, logp, old, torch.tensor([a]), torch.ones(1, 4, dtype=torch.bool)
            )
            (g,) = torch.autograd.grad(loss, logp)
            assert math.isfinite(loss.item()) and torch.isfinite(g).all(), name
            assert all(math.isfinite(v) for v in metrics.values()), name
