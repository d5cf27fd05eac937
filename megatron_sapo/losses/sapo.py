"""SAPO: Soft Adaptive Policy Optimization (arXiv 2511.20347, Eq. 5–8).

    f(r) = σ(τ (r − 1)) · 4 / τ,   τ = τ_pos if Â > 0 else τ_neg,   per-token loss = −f(r) · Â

d f / d log π = w · r with w = 4 p (1 − p), p = σ(τ (r − 1)) = sech²(τ (r − 1) / 2): a smooth,
token-level trust region instead of a hard clip. At r = 1, w = 1 (plain policy gradient).
"""

from __future__ import annotations

import torch

from megatron_sapo.losses.diagnostics import masked_mean
from megatron_sapo.losses.registry import register_loss


@register_loss("sapo")
def sapo_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    tau_pos: float = 1.0,
    tau_neg: float = 1.05,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token SAPO loss `[B, T]` from the fp32 log-ratio `[B, T]` and advantages `[B, T]`."""
    if tau_pos <= 0 or tau_neg <= 0:
        raise ValueError(f"SAPO temperatures must be > 0, got tau_pos={tau_pos}, tau_neg={tau_neg}")
    ratio = log_ratio.exp()
    tau = torch.where(advantages > 0, torch.full_like(ratio, tau_pos), torch.full_like(ratio, tau_neg))
    gate = torch.sigmoid(tau * (ratio - 1.0))
    per_token = -(gate * (4.0 / tau)) * advantages
    with torch.no_grad():
        w = 4.0 * gate * (1.0 - gate)
        metrics = {
            "sapo/gate_mean": masked_mean(gate, mask),
            "sapo/w_mean": masked_mean(w, mask),
            "sapo/w_below_half_frac": masked_mean((w < 0.5).float(), mask),
        }
    return per_token, metrics
