"""Vocab-parallel ``vocab_parallel_logprobs`` on 2 gloo ranks vs a single-process full-vocab reference.

Each rank builds the same random logits ``[B, T, V]`` from a shared seed, keeps its contiguous vocab
half ``[B, T, V/2]``, and computes log-probs, entropy and the gradient of
``sum(logp · w) + sum(entropy · u)`` w.r.t. its shard. The parent process checks that both ranks return
the float64 ``log_softmax`` reference values and that each shard's gradient is the matching slice of the
reference gradient. One token row gets a spike on each rank so that the per-rank maxima differ a lot
(exercises the rescaling of partial sums to the global max).

    python -m pytest tests/distributed/test_logprobs_tp.py -q
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_sapo.megatron.logprobs import vocab_parallel_logprobs
from megatron_sapo.utils.spawn import run_on_ranks

BATCH, TOKENS, VOCAB = 2, 37, 240  # T not a multiple of the chunk sizes used below


def _inputs(seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(BATCH, TOKENS, VOCAB, generator=g) * 4.0
    logits[0, 0, 3] = 60.0  # rank 0 holds the max of this row, rank 1's partial sum is ~exp(-55)
    logits[1, 5, VOCAB - 2] = 45.0  # and rank 1 of this one
    target = torch.randint(0, VOCAB, (BATCH, TOKENS), generator=g)
    w = torch.randn(BATCH, TOKENS, generator=g, dtype=torch.float64)
    u = torch.randn(BATCH, TOKENS, generator=g, dtype=torch.float64)
    return logits, target, w, u


def _reference(seed: int, with_entropy: bool) -> tuple[torch.Tensor, ...]:
    logits, target, w, u = _inputs(seed)
    x = logits.double().requires_grad_()
    logp_all = torch.log_softmax(x, dim=-1)
    logp = logp_all.gather(-1, target[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    loss = (logp * w).sum() + ((entropy * u).sum() if with_entropy else 0.0)
    loss.backward()
    return logp.detach(), entropy.detach(), x.grad


def _tp_worker(rank: int, world_size: int, seed: int, chunk_size: int, with_entropy: bool):
    logits, target, w, u = _inputs(seed)
    v_local = VOCAB // world_size
    shard = logits[..., rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
    group = dist.new_group(list(range(world_size)))
    if with_entropy:
        logp, ent = vocab_parallel_logprobs(shard, target, group, chunk_size=chunk_size, return_entropy=True)
        loss = (logp.double() * w).sum() + (ent.double() * u).sum()
    else:
        logp, ent = vocab_parallel_logprobs(shard, target, group, chunk_size=chunk_size), None
        loss = (logp.double() * w).sum()
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), shard.grad


def _check(seed: int, chunk_size: int, with_entropy: bool) -> None:
    ref_logp, ref_ent, ref_grad = _reference(seed, with_entropy)
    results = run_on_ranks(_tp_worker, world_size=2, args=(seed, chunk_size, with_entropy))
    v_local = VOCAB // 2
    for rank, (logp, ent, grad) in enumerate(results):
        torch.testing.assert_close(logp.double(), ref_logp, rtol=0, atol=1e-5)
        if with_entropy:
            torch.testing.assert_close(ent.double(), ref_ent, rtol=0, atol=1e-5)
        assert grad.dtype == torch.float32 and grad.shape == (BATCH, TOKENS, v_local)
        ref_slice = ref_grad[..., rank * v_local : (rank + 1) * v_local]
        torch.testing.assert_close(grad.double(), ref_slice, rtol=0, atol=1e-5)


def test_tp2_logprobs_entropy_and_shard_gradients() -> None:
    _check(seed=0, chunk_size=16, with_entropy=True)


def test_tp2_logprobs_only() -> None:
    _check(seed=1, chunk_size=7, with_entropy=False)
