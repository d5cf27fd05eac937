"""Property tests (hypothesis) for the loss library: shapes, masks, extreme ratios.

Run: python -m pytest tests/unit/test_losses_properties.py -q
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import torch
from hypothesis import given, settings

from megatron_sapo.losses import LOSSES, compute_policy_loss, group_advantages

names = st.sampled_from(sorted(LOSSES))
aggregations = st.sampled_from(["seq-mean-token-mean", "token-mean"])


@st.composite
def batches(draw, max_b: int = 5, max_t: int = 12, max_abs_log_ratio: float = 50.0):
    b = draw(st.integers(1, max_b))
    t = draw(st.integers(1, max_t))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g) * 5
    scale = draw(st.floats(0.0, max_abs_log_ratio))
    logp = (old + scale * (2 * torch.rand(b, t, generator=g) - 1)).requires_grad_()
    mask = torch.rand(b, t, generator=g) < draw(st.floats(0.0, 1.0))
    adv = torch.randn(b, generator=g) * draw(st.floats(0.0, 10.0))
    return logp, old, adv, mask


@settings(max_examples=150, deadline=None)
@given(batch=batches(), name=names, aggregation=aggregations)
def test_finite_and_masked(batch, name, aggregation):
    logp, old, adv, mask = batch
    loss, metrics = compute_policy_loss(name, logp, old, adv, mask, aggregation=aggregation)
    (g,) = torch.autograd.grad(loss, logp)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    assert g.shape == logp.shape and torch.isfinite(g).all()
    assert torch.all(g[~mask] == 0)  # padding never receives gradient
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    if not mask.any():
        assert loss.item() == 0.0


@settings(max_examples=100, deadline=None)
@given(batch=batches(max_abs_log_ratio=3.0), tau=st.floats(0.1, 5.0))
def test_sapo_weight_is_bounded(batch, tau):
    # |∂loss/∂logp| ≤ max_r(w·r) · |Â| / (B · |y_i|), and max_r 4σ(1−σ)·r ≤ 1 + 2/τ (loose, closed form).
    logp, old, adv, mask = batch
    loss, _ = compute_policy_loss("sapo", logp, old, adv, mask, tau_pos=tau, tau_neg=tau)
    (g,) = torch.autograd.grad(loss, logp)
    n_tok = mask.sum(-1, keepdim=True).clamp(min=1)
    n_seq = max(int((mask.sum(-1) > 0).sum()), 1)
    bound = (1 + 2 / tau) * adv.abs()[:, None] / (n_seq * n_tok) + 1e-6
    assert torch.all(g.abs() <= bound)


@settings(max_examples=100, deadline=None)
@given(
    groups=st.integers(1, 6),
    size=st.integers(2, 8),
    shift=st.floats(-100, 100),
    scale=st.floats(0.1, 100),
    seed=st.integers(0, 1000),
)
def test_group_advantages_are_shift_and_scale_invariant(groups, size, shift, scale, seed):
    r = torch.randn(groups * size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()
    a = group_advantages(r, size, eps=0.0)
    b = group_advantages(r * scale + shift, size, eps=0.0)
    torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)
    sums = a.view(groups, size).sum(-1)
    assert torch.all(sums.abs() < 1e-4)
