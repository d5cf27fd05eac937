"""GSPO: Group Sequence Policy Optimization (arXiv 2507.18071), sequence-level and token form.

    s_i = exp(mean_t log r_{i,t})                         (length-normalised sequence ratio)
    per-sequence loss = −min(s_i · Â_i, clip(s_i, 1 − ε_low, 1 + ε_high) · Â_i)

"gspo" gives every token of sequence i that same value, so the token mean is the sequence loss.
"gspo_token" uses s_{i,t} = sg[s_i] · π_θ(y_t) / sg[π_θ(y_t)]: equal in value and in gradient to
"gspo" for sequence-level advantages, but it admits per-token advantages.
"""

from __future__ import annotations

import torch

from megatron_sapo.losses.diagnostics import masked_mean
from megatron_sapo.losses.registry import register_loss


def _seq_log_ratio(log_ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean of the valid tokens' log-ratio, `[B, 1]`."""
    summed = torch.where(mask, log_ratio, torch.zeros_like(log_ratio)).sum(-1, keepdim=True)
    return summed / mask.sum(-1, keepdim=True).clamp(min=1)


def _clipped(ratio: torch.Tensor, adv: torch.Tensor, eps_low: float, eps_high: float) -> torch.Tensor:
    return -torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)


def _metrics(
    prefix: str,
    seq_ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps_low: float,
    eps_high: float,
) -> dict[str, float]:
    with torch.no_grad():
        clipped = ((seq_ratio > 1.0 + eps_high) & (adv > 0)) | ((seq_ratio < 1.0 - eps_low) & (adv < 0))
        has = mask.any(-1)
        return {
            f"{prefix}/clip_frac": masked_mean(clipped.float(), mask),
            f"{prefix}/seq_clip_frac": float(clipped.any(-1)[has].float().mean()) if has.any() else 0.0,
            f"{prefix}/seq_ratio_mean": float(seq_ratio[:, 0][has].mean()) if has.any() else 0.0,
        }


@register_loss("gspo")
def gspo_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Sequence-level GSPO; every token of a sequence carries that sequence's loss. Needs `[B]`-shaped
    (per-sequence) advantages: the first valid token's advantage stands for its sequence."""
    seq_ratio = _seq_log_ratio(log_ratio, mask).exp()
    first = mask.float().argmax(-1, keepdim=True)
    seq_adv = advantages.gather(-1, first)
    per_seq = _clipped(seq_ratio, seq_adv, eps_low, eps_high)
    per_token = per_seq.expand_as(log_ratio)
    return per_token, _metrics(
        "gspo", seq_ratio.expand_as(log_ratio), seq_adv.expand_as(log_ratio), mask, eps_low, eps_high
    )


@register_loss("gspo_token")
def gspo_token_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 3e-4,
    eps_high: float = 4e-4,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO-token: s_{i,t} = sg[s_i] · exp(log r_t − sg[log r_t]); per-token advantages allowed."""
    seq_ratio = _seq_log_ratio(log_ratio, mask).detach().exp()
    token_ratio = seq_ratio * (log_ratio - log_ratio.detach()).exp()
    per_token = _clipped(token_ratio, advantages, eps_low, eps_high)
    return per_token, _metrics("gspo_token", token_ratio.detach(), advantages, mask, eps_low, eps_high)
