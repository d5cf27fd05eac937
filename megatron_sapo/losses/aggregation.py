"""Reduce a per-token loss `[B, T]` to the scalar that is back-propagated.

Two modes:
- "seq-mean-token-mean" (default, SAPO/GSPO papers): Σ_i mean_t(loss_{i,t}) / N_seq
- "token-mean": Σ_{i,t} loss_{i,t} / N_tok

`normalizer` is the *global* N_seq (resp. N_tok) of the whole mini-batch. When a mini-batch is split
into micro-batches or over data-parallel ranks, every piece passes the same global normalizer, and the
sum of the pieces' losses (and gradients) equals the unsplit batch's exactly. Left as None, it is this
batch's own count (sequences with at least one valid token, resp. valid tokens).
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("seq-mean-token-mean", "token-mean")


def count_for_normalizer(mask: torch.Tensor, aggregation: str) -> int:
    """This batch's contribution to the global normalizer: sequences with ≥1 token, or valid tokens."""
    _check(aggregation)
    if aggregation == "token-mean":
        return int(mask.sum().item())
    return int((mask.sum(dim=-1) > 0).sum().item())


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    aggregation: str = "seq-mean-token-mean",
    normalizer: float | None = None,
) -> torch.Tensor:
    """Scalar from `per_token` `[B, T]` over the valid tokens of `mask` `[B, T]` (bool or 0/1)."""
    _check(aggregation)
    m = mask.to(per_token.dtype)
    # torch.where (not a multiply) so that inf/nan in padded positions cannot leak into the sum.
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if normalizer is None:
        normalizer = max(count_for_normalizer(mask, aggregation), 1)
    if aggregation == "token-mean":
        return masked.sum() / normalizer
    seq_mean = masked.sum(dim=-1) / m.sum(dim=-1).clamp(min=1.0)
    return seq_mean.sum() / normalizer


def _check(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}")
