"""Single-process tests of ``vocab_parallel_logprobs`` against a full-vocab ``log_softmax`` reference.

The reference is computed by plain autograd through ``torch.log_softmax`` in float64 (so the measured
difference is the chunked fp32 path's own error): values and gradients of the chosen-token log-prob
and of the entropy, for chunk sizes that do and do not divide T, leading batch dims, bf16 logits,
temperature, and hypothesis property tests over random shapes and extreme logits.

    python -m pytest tests/unit/test_logprobs.py -q
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_sapo.megatron.logprobs import vocab_parallel_logprobs


def _reference(
    logits: torch.Tensor, target: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    logp_all = torch.log_softmax(logits.double() / temperature, dim=-1)
    logp = logp_all.gather(-1, target[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def _grads(fn, logits: torch.Tensor, target: torch.Tensor, w: torch.Tensor, u: torch.Tensor | None):
    """Values and d/dlogits of sum(logp * w) + sum(entropy * u) for an implementation ``fn``."""
    x = logits.detach().clone().requires_grad_()
    logp, ent = fn(x, target)
    loss = (logp.double() * w).sum()
    if u is not None:
        loss = loss + (ent.double() * u).sum()
    loss.backward()
    return logp.detach(), None if ent is None else ent.detach(), x.grad


def _inputs(shape: tuple[int, ...], vocab: int, dtype=torch.float32, scale: float = 3.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=g) * scale).to(dtype)
    target = torch.randint(0, vocab, shape, generator=g)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    u = torch.randn(shape, generator=g, dtype=torch.float64)
    return logits, target, w, u


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 1000])
@pytest.mark.parametrize("shape", [(64,), (3, 21)])
def test_logprobs_and_entropy_match_reference(chunk_size: int, shape: tuple[int, ...]) -> None:
    logits, target, w, u = _inputs(shape, vocab=301)
    got = _grads(
        lambda x, t: vocab_parallel_logprobs(x, t, chunk_size=chunk_size, return_entropy=True),
        logits,
        target,
        w,
        u,
    )
    ref = _grads(_reference, logits, target, w, u)
    assert got[0].dtype == torch.float32 and got[0].shape == shape
    assert got[2].dtype == torch.float32 and got[2].shape == logits.shape
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [5, 32])
def test_logprob_only_gradient(chunk_size: int) -> None:
    logits, target, w, _ = _inputs((2, 30), vocab=257, seed=1)
    got = _grads(
        lambda x, t: (vocab_parallel_logprobs(x, t, chunk_size=chunk_size), None), logits, target, w, None
    )
    ref = _grads(_reference, logits, target, w, None)
    torch.testing.assert_close(got[0].double(), ref[0].double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2].double(), ref[2].double(), rtol=0, atol=1e-5)


def test_entropy_only_gradient() -> None:
    """Only the entropy feeds the loss: logp gets no upstream gradient at all."""
    logits, target, _, u = _inputs((40,), vocab=129, seed=2)
    x = logits.clone().requires_grad_()
    _, ent = vocab_parallel_logprobs(x, target, chunk_size=9, return_entropy=True)
    (ent.double() * u).sum().backward()
    ref = _grads(_reference, logits, target, torch.zeros_like(u), u)
    torch.testing.assert_close(x.grad.double(), ref[2].double(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_temperature(temperature: float) -> None:
    logits, target, w, u = _inputs((50,), vocab=200, seed=3)
    got = _grads(
        lambda x, t: vocab_parallel_logprobs(
            x, t, chunk_size=16, return_entropy=True, temperature=temperature
        ),
        logits,
        target,
        w,
        u,
    )
    ref = _grads(lambda x, t: _reference(x, t, temperature), logits, target, w, u)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-5)


def test_bf16_logits() -> None:
    logits, target, w, u = _inputs((4, 33), vocab=500, dtype=torch.bfloat16, seed=4)
    got = _grads(
        lambda x, t: vocab_parallel_logprobs(x, t, chunk_size=10, return_entropy=True), logits, target, w, u
    )
    # The reference sees the same bf16-rounded logits, so values agree to fp32 accuracy; the gradient
    # is rounded to bf16 on return (relative 2^-8 of entries bounded by ~|w| + |u|·|z - E|).
    ref = _grads(_reference, logits, target, w, u)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), ref[0].double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[1].double(), ref[1].double(), rtol=0, atol=1e-5)
    torch.testing.assert_close(got[2].double(), ref[2].to(torch.bfloat16).double(), rtol=1e-2, atol=1e-3)


def test_no_full_vocab_fp32_copy_is_returned_and_logits_untouched() -> None:
    logits, target, w, u = _inputs((20,), vocab=64, seed=5)
    before = logits.clone()
    x = logits.requires_grad_()
    logp, ent = vocab_parallel_logprobs(x, target, chunk_size=3, return_entropy=True, temperature=0.5)
    ((logp * w.float()).sum() + (ent * u.float()).sum()).backward()
    assert torch.equal(logits.detach(), before)


def test_explicit_vocab_start_index_on_a_shard() -> None:
    """A vocab shard alone, with the max and sum over the other shards absent, equals the softmax over
    the shard; ids outside it give a target logit of 0, so check one inside."""
    logits, _, _, _ = _inputs((12,), vocab=90, seed=6)
    shard = logits[:, 30:60]
    target = torch.arange(12) + 35
    got = vocab_parallel_logprobs(shard, target, vocab_start_index=30)
    ref = torch.log_softmax(shard.double(), -1).gather(-1, (target - 30)[:, None]).squeeze(-1)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        vocab_parallel_logprobs(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        vocab_parallel_logprobs(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), chunk_size=0)
    with pytest.raises(ValueError):
        vocab_parallel_logprobs(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), temperature=0.0)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    tokens=st.integers(1, 40),
    vocab=st.integers(1, 300),
    chunk_size=st.integers(1, 50),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_random_shapes_and_extreme_logits(
    batch: int, tokens: int, vocab: int, chunk_size: int, scale: float, temperature: float, seed: int
) -> None:
    logits, target, w, u = _inputs((batch, tokens), vocab, scale=scale, seed=seed)
    got = _grads(
        lambda x, t: vocab_parallel_logprobs(
            x, t, chunk_size=chunk_size, return_entropy=True, temperature=temperature
        ),
        logits,
        target,
        w,
        u,
    )
    ref = _grads(lambda x, t: _reference(x, t, temperature), logits, target, w, u)
    for a in got:
        assert torch.isfinite(a).all()
    logp, ent = got[0].double(), got[1].double()
    assert (logp <= 1e-6).all() and (ent >= -1e-6).all()
    assert (ent <= torch.log(torch.tensor(float(vocab), dtype=torch.float64)) + 1e-4).all()
    # fp32 relative error on logits of magnitude |z| ~ scale / temperature.
    atol = 1e-5 * max(1.0, scale / temperature)
    torch.testing.assert_close(logp, ref[0].double(), rtol=0, atol=atol)
    torch.testing.assert_close(ent, ref[1].double(), rtol=0, atol=atol)
    torch.testing.assert_close(got[2].double(), ref[2].double(), rtol=0, atol=atol)


@pytest.mark.parametrize("return_entropy", [False, True])
def test_inplace_backward_writes_the_reference_gradient_into_non_leaf_logits(return_entropy: bool) -> None:
    # As in training: the logits are a non-leaf output of the output layer; the gradient reaching the
    # layer's input must equal the out-of-place path, and the logits' storage holds the gradient.
    _, target, w, u = _inputs((40,), vocab=97, seed=5)
    hidden = torch.randn(40, 16, dtype=torch.float64).float()
    weight = torch.randn(97, 16) * 0.3

    def run(inplace: bool):
        h = hidden.clone().requires_grad_()
        z = h @ weight.t()
        out = vocab_parallel_logprobs(
            z, target, chunk_size=16, return_entropy=return_entropy, inplace_backward=inplace
        )
        logp, ent = out if return_entropy else (out, None)
        loss = (logp.double() * w).sum() + (0 if ent is None else (ent.double() * u).sum())
        loss.backward()
        return h.grad, z

    ref_grad, _ = run(False)
    got_grad, z = run(True)
    torch.testing.assert_close(got_grad, ref_grad, rtol=0, atol=1e-6)
    z_ref = (hidden @ weight.t()).detach().clone().requires_grad_()
    out = vocab_parallel_logprobs(z_ref, target, return_entropy=return_entropy)
    logp, ent = out if return_entropy else (out, None)
    ((logp.double() * w).sum() + (0 if ent is None else (ent.double() * u).sum())).backward()
    torch.testing.assert_close(z.detach(), z_ref.grad, rtol=0, atol=1e-6)
