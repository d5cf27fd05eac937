"""Per-token log-prob of the chosen token (and entropy) from vocab-parallel logits, chunked over tokens.

Each tensor-parallel rank holds logits ``[T, V/tp]`` for the contiguous vocab slice
``[rank·V/tp, (rank+1)·V/tp)`` (megatron's vocab-parallel convention). We return, for every token,

    logp_t = z_{t,y_t} − logsumexp_v z_{t,v}          H_t = −Σ_v p_{t,v} log p_{t,v}       (z = logits / τ)

in fp32, without ever building a full ``[T, V]`` fp32 log_softmax: tokens are processed in chunks of
``chunk_size`` rows, each chunk is upcast to fp32 on its own, and the backward pass recomputes the
softmax chunk by chunk from three saved ``[T]`` statistics. Gradients, with E_t = Σ_v p_{t,v} z_{t,v}:

    ∂logp_t/∂z_{t,v} = 1[v = y_t] − p_{t,v}            ∂H_t/∂z_{t,v} = −p_{t,v} (z_{t,v} − E_t)

Communication: two all-reduces in forward over ``[T]``-sized tensors (MAX of the per-rank maxima, then
SUM of the rescaled partial sums), none in backward. The backward needs no all-reduce because the only
global quantities in the gradient (the normaliser logsumexp and E) are saved from forward, and every
rank receives the same upstream gradient (the loss is computed redundantly on each TP rank), so each
rank's local gradient is exactly its slice of the full-vocab gradient, as in megatron's
``vocab_parallel_cross_entropy``.

Vocab padding: megatron pads the vocab to a multiple of TP (``models.padded_vocab_size``). Given the real
vocab size V, the columns at global ids >= V (at the end of the last rank(s)' shards) are left out of every
max and sum and get zero gradient, so the sums over v run over the HF model's V columns, as transformers'
and SGLang's log-probs do, and the padded output rows are never trained. Real logits must be finite. Usage::

    from megatron_sapo.megatron.logprobs import vocab_parallel_logprobs
    logp, ent = vocab_parallel_logprobs(logits, target, group=tp_group, vocab_size=V, return_entropy=True)

Tests: ``python -m pytest tests/unit/test_logprobs.py tests/distributed/test_logprobs_tp.py
tests/distributed/test_vocab_padding.py -q``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["DEFAULT_CHUNK_SIZE", "vocab_parallel_logprobs"]

DEFAULT_CHUNK_SIZE = 256
"""Tokens per chunk: 256 x 151,936 fp32 is ~155 MB per temporary, small next to any [T, V] tensor."""


def _group_size_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _chunk_fp32(logits: torch.Tensor, out: torch.Tensor, inv_temperature: float) -> torch.Tensor:
    """``logits / τ`` in fp32, written into a reused workspace (never aliasing the logits, so the in-place
    ops below cannot modify them, and no [chunk, V/tp] buffer is allocated and page-faulted per chunk)."""
    z = out[: logits.shape[0]].copy_(logits)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        group: dist.ProcessGroup | None,
        vocab_start: int,
        v_real: int,
        chunk_size: int,
        return_entropy: bool,
        temperature: float,
        inplace_backward: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, v_local = logits.shape
        inv_t = 1.0 / temperature
        # Targets outside this rank's slice contribute 0 to the target logit; the SUM all-reduce below
        # then picks the one rank that owns it (x + 0 is exact, so this is bit-identical to a gather).
        local_target = target - vocab_start
        owned = (local_target >= 0) & (local_target < v_local)
        local_target = torch.where(owned, local_target, torch.zeros_like(local_target))

        f32 = dict(dtype=torch.float32, device=logits.device)
        # Only this shard's first v_real columns are real vocab; a shard of padding only has no max
        # of its own (-inf, kept out of the rescaling below) and zero partial sums.
        local_max = torch.full((n,), -torch.inf, **f32)
        # Rows: [sum exp(z - m_local), sum exp(z - m_local)(z - m_local), z_target]. Keeping the entropy
        # sum relative to the max avoids cancellation in H = logsumexp - E when |z| is large (~1e4).
        partial = torch.zeros(3, n, **f32)
        rows = min(chunk_size, n)
        work = torch.empty(rows, v_real, **f32)
        work2 = torch.empty(rows, v_real, **f32) if return_entropy else None
        for s in range(0, n if v_real else 0, chunk_size):
            e = min(s + chunk_size, n)
            z = _chunk_fp32(logits[s:e, :v_real], work, inv_t)
            m = z.amax(dim=-1)
            local_max[s:e] = m
            zt = z.gather(-1, local_target[s:e, None]).squeeze(-1)
            partial[2, s:e] = torch.where(owned[s:e], zt, torch.zeros_like(zt))
            z.sub_(m[:, None])
            if work2 is not None:
                ez = torch.exp(z, out=work2[: e - s])
                partial[0, s:e] = ez.sum(dim=-1)
                partial[1, s:e] = ez.mul_(z).sum(dim=-1)
            else:
                partial[0, s:e] = z.exp_().sum(dim=-1)
        del work, work2

        global_max = local_max.clone()
        world, _ = _group_size_rank(group)
        if world > 1:
            dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        # Rescale each rank's partial sums from its own max to the global one before summing.
        shift = local_max - global_max if v_real else torch.zeros_like(global_max)
        scale = torch.exp(shift)
        partial[1].add_(shift * partial[0]).mul_(scale)
        partial[0].mul_(scale)
        if world > 1:
            dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=group)

        log_sum = torch.log(partial[0])
        logp = partial[2] - global_max - log_sum
        # E - max, with E = sum_v p_v z_v; entropy = logsumexp - E = log_sum - (E - max).
        e_minus_max = partial[1] / partial[0]
        entropy = log_sum - e_minus_max

        ctx.save_for_backward(logits, local_target, owned, global_max, log_sum, e_minus_max)
        ctx.chunk_size = chunk_size
        ctx.v_real = v_real
        ctx.inplace_backward = inplace_backward
        ctx.inv_t = inv_t
        ctx.set_materialize_grads(False)
        if not return_entropy:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: torch.Tensor | None, grad_ent: torch.Tensor | None):
        logits, local_target, owned, global_max, log_sum, e_minus_max = ctx.saved_tensors
        n, v_real = logits.shape[0], ctx.v_real
        inv_t = ctx.inv_t
        # The chain rule through z = logits / τ is folded into the upstream gradients (scaled by 1/τ).
        if grad_logp is not None:
            g_lp = grad_logp.float() * inv_t
            g_tgt = torch.where(owned, g_lp, torch.zeros_like(g_lp))
        # In place: chunk s is read into the fp32 workspace before its gradient overwrites it, so
        # writing the gradient into the logits' own storage is safe and saves a [T, V/tp] tensor.
        grad_logits = logits if ctx.inplace_backward else torch.empty_like(logits)
        f32 = dict(dtype=torch.float32, device=logits.device)
        rows = min(ctx.chunk_size, n)
        work = torch.empty(rows, v_real, **f32)
        work2 = torch.empty(rows, v_real, **f32) if grad_ent is not None else None
        for s in range(0, n if v_real else 0, ctx.chunk_size):
            e = min(s + ctx.chunk_size, n)
            # z - max, then - log_sum: two exact-ish subtractions, not one with a rounded logsumexp,
            # which would cost ~ulp(max) of accuracy in every entry when |logits| is large.
            z = _chunk_fp32(logits[s:e, :v_real], work, inv_t).sub_(global_max[s:e, None])
            if work2 is not None:
                p = torch.sub(z, log_sum[s:e, None], out=work2[: e - s]).exp_()
                # -p * (g_lp + g_H (z - E)), built in place in z.
                z.sub_(e_minus_max[s:e, None]).mul_(grad_ent[s:e, None].float() * inv_t)
                if grad_logp is not None:
                    z.add_(g_lp[s:e, None])
                g = z.mul_(p).neg_()
            else:
                g = z.sub_(log_sum[s:e, None]).exp_().mul_(-g_lp[s:e, None])
            if grad_logp is not None:
                g.scatter_add_(-1, local_target[s:e, None], g_tgt[s:e, None])
            grad_logits[s:e, :v_real].copy_(g)
        # Padded columns are not in the softmax: no gradient (the padded output rows stay untrained).
        grad_logits[:, v_real:].zero_()
        return grad_logits, None, None, None, None, None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    target: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    vocab_start_index: int | None = None,
    vocab_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_entropy: bool = False,
    temperature: float = 1.0,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of ``target`` (and optionally the entropy) under ``softmax(logits / temperature)``.

    Args:
        logits: ``[*, T, V_pad/tp]`` this rank's vocab shard, any float dtype (bf16/fp16/fp32). Columns
            of real vocab ids must be finite.
        target: ``[*, T]`` global vocab ids (integer); must lie in ``[0, vocab_size)``.
        group: tensor-parallel group the vocab is sharded over; ``None`` or size 1 means unsharded.
        vocab_start_index: first global id of this rank's shard; default ``rank(group) · V_pad/tp``.
        vocab_size: the real (unpadded) vocab size V: columns at global ids >= V are megatron's padding,
            excluded from the softmax (zero gradient). ``None``: every column is real (V = V_pad).
        chunk_size: tokens processed at once; workspace is 1 (2 with entropy) fp32 ``[chunk_size, V/tp]``.
        return_entropy: also return the per-token entropy (differentiable).
        temperature: logits are divided by this before the softmax.
        inplace_backward: write the gradient into ``logits``' own storage (as megatron's
            ``vocab_parallel_cross_entropy`` does), saving one ``[T, V/tp]`` tensor. Only when nothing
            else reads ``logits`` after this call: the trainer's logits are a temporary, so it sets this.

    Returns:
        ``logp`` ``[*, T]`` fp32, or ``(logp, entropy)`` both ``[*, T]`` fp32. Gradients flow to
        ``logits`` in its own dtype. With ``group`` of size > 1 the result is identical on every rank,
        and the upstream gradient must be too (compute the loss redundantly on each TP rank).
    """
    if logits.dim() < 2 or logits.shape[:-1] != target.shape:
        raise ValueError(f"logits [*, T, V/tp] and target [*, T] disagree: {logits.shape} vs {target.shape}")
    if chunk_size < 1 or temperature <= 0:
        raise ValueError(f"need chunk_size >= 1 and temperature > 0, got {chunk_size}, {temperature}")
    lead = target.shape
    v_local = logits.shape[-1]
    if vocab_start_index is None:
        vocab_start_index = _group_size_rank(group)[1] * v_local
    v_real = v_local if vocab_size is None else min(v_local, max(0, vocab_size - vocab_start_index))
    logp, entropy = _VocabParallelLogprobs.apply(
        logits.reshape(-1, v_local),
        target.reshape(-1).long(),
        group,
        vocab_start_index,
        v_real,
        chunk_size,
        return_entropy,
        float(temperature),
        inplace_backward,
    )
    if return_entropy:
        return logp.view(lead), entropy.view(lead)
    return logp.view(lead)
