"""GRPO: PPO's token-level clipped surrogate with group advantages (the SAPO paper's baseline).

    per-token loss = −min(r · Â, clip(r, 1 − ε_low, 1 + ε_high) · Â)

The gradient is an indicator: zero where the clipped branch is the active minimum.
"""

from __future__ import annotations

import torch

from megatron_sapo.losses.diagnostics import masked_mean
from megatron_sapo.losses.registry import register_loss


@register_loss("grpo")
def grpo_loss(
    log_ratio: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.27,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token clipped-surrogate loss `[B, T]`."""
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        high = (ratio > 1.0 + eps_high) & (advantages > 0)
        low = (ratio < 1.0 - eps_low) & (advantages < 0)
        metrics = {
            "grpo/clip_frac": masked_mean((high | low).float(), mask),
            "grpo/clip_frac_high": masked_mean(high.float(), mask),
            "grpo/clip_frac_low": masked_mean(low.float(), mask),
        }
    return per_token, metrics
