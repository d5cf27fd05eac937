"""Aggregation invariance over data parallelism: 2 gloo ranks, each holding half of a batch and the global
sequence (or token) count as normalizer, all-reduce (SUM) their gradients; the result must equal the
single-process gradient of the whole batch (≤ 1e-6).

Run: python -m pytest tests/distributed/test_loss_dp.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from megatron_sapo.losses import compute_policy_loss, count_for_normalizer
from megatron_sapo.utils.spawn import run_on_ranks

NAMES = ("sapo", "grpo", "gspo", "gspo_token")
AGGREGATIONS = ("seq-mean-token-mean", "token-mean")


def _batch(b: int = 8, t: int = 11):
    g = torch.Generator().manual_seed(123)
    old = -torch.rand(b, t, generator=g) * 3
    logp = old + 0.3 * torch.randn(b, t, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return logp, old, torch.randn(b, generator=g), mask


def _dp_grads(rank: int, world_size: int) -> dict:
    logp, old, adv, mask = _batch()
    # Uneven split on purpose: rank 0 gets 3 sequences, rank 1 gets 5.
    idx = slice(0, 3) if rank == 0 else slice(3, 8)
    out = {}
    for name in NAMES:
        for agg in AGGREGATIONS:
            local = torch.tensor(float(count_for_normalizer(mask[idx], agg)))
            dist.all_reduce(local)  # the global count, as the trainer computes it
            part = logp[idx].clone().requires_grad_()
            loss, _ = compute_policy_loss(
                name, part, old[idx], adv[idx], mask[idx], aggregation=agg, normalizer=local.item()
            )
            loss.backward()
            full = torch.zeros_like(logp)
            full[idx] = part.grad
            dist.all_reduce(full)
            total = loss.detach().clone()
            dist.all_reduce(total)
            out[(name, agg)] = (full, total.item())
    return out


@pytest.mark.timeout(180)
def test_dp2_gradient_equals_single_process():
    results = run_on_ranks(_dp_grads, world_size=2)
    logp, old, adv, mask = _batch()
    for name in NAMES:
        for agg in AGGREGATIONS:
            lp = logp.clone().requires_grad_()
            loss, _ = compute_policy_loss(name, lp, old, adv, mask, aggregation=agg)
            loss.backward()
            for rank_out in results:
                grad, total = rank_out[(name, agg)]
                torch.testing.assert_close(grad, lp.grad, atol=1e-6, rtol=0, msg=f"{name}/{agg}")
                assert abs(total - loss.item()) <= 1e-6, (name, agg)
