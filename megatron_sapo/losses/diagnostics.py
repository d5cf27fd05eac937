"""Diagnostics shared by every policy loss: statistics of the token log-ratio log r = logp − old_logp.

SAPO §4.1: sequence coherence relies on a small per-sequence variance Var_t(log r_{i,t}); the paper saw
< 0.02 on dense models and wider on MoE. All values are plain floats (for logging).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean of `x` over the valid tokens of `mask` (0.0 when there are none)."""
    n = mask.sum()
    if n == 0:
        return 0.0
    return float(torch.where(mask, x, torch.zeros_like(x)).sum() / n)


@torch.no_grad()
def log_ratio_metrics(log_ratio: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """mean |log r|, mean r, and mean / max over sequences of the per-sequence Var_t(log r)."""
    mask = mask.bool()
    lr = torch.where(mask, log_ratio.float(), torch.zeros_like(log_ratio, dtype=torch.float32))
    n_tok = mask.sum(dim=-1)
    has = n_tok > 0
    n = n_tok.clamp(min=1).float()
    mean = lr.sum(-1) / n
    # Population variance over each sequence's valid tokens (a 1-token sequence has variance 0).
    var = (torch.where(mask, (lr - mean[:, None]) ** 2, torch.zeros_like(lr)).sum(-1) / n)[has]
    return {
        "log_ratio/abs_mean": masked_mean(lr.abs(), mask),
        "ratio/mean": masked_mean(lr.exp(), mask),
        "log_ratio/seq_var_mean": float(var.mean()) if var.numel() else 0.0,
        "log_ratio/seq_var_max": float(var.max()) if var.numel() else 0.0,
    }
