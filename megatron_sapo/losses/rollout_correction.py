"""Rollout correction: weight the policy-gradient term by how far the engine μ was from the trainer's π_old.

Three policies meet in an update (../shared/SAPO.md, docs/async.md): μ, the rollout engine that sampled
the tokens (SGLang's log-probs: other kernels, another dtype, and once rollouts run ahead, older weights);
π_old, the trainer's own policy at the start of the step (the π_old pass), against which every loss takes
its ratio r = π_θ / π_old; and π_θ, the policy being optimised. The loss's ratio is always against π_old;
the correction re-weights each token's loss by the detached importance weight of π_old against μ:

    ρ_t = π_old(y_t) / μ(y_t) = exp(log π_old − log μ)
    "tis": w_t = min(ρ_t, C)                              token-level truncated importance sampling
    "mis": w_t = 0 for every token of a sequence whose mean_t |log π_old − log μ| > log C, else 1
                                                          sequence-level masked importance sampling

The same C (`loss.rollout_correction_cap`, default 2) bounds both: TIS never up-weights a token by more
than C; MIS drops a sequence whose typical token probability differs by more than a factor C between
engine and trainer. A masked sequence keeps its place in the loss's 1/N (its tokens contribute zero, as a
zero advantage would), so aggregation stays independent of data-parallel size and micro-batching.
With μ = π_old (an exact engine, synchronous rollouts) every weight is 1 and the loss is unchanged.

    weights, metrics = rollout_correction_weights(old_logp, engine_logp, mask, mode="tis", cap=2.0)

Tests: tests/unit/test_rollout_correction.py (closed forms, identity at μ = π_old, the gradient).
"""

from __future__ import annotations

import math

import torch

from megatron_sapo.losses.diagnostics import masked_mean

MODES = ("off", "tis", "mis")
"""`loss.rollout_correction` values."""


def rollout_correction_weights(
    old_logp: torch.Tensor,
    engine_logp: torch.Tensor,
    mask: torch.Tensor,
    *,
    mode: str,
    cap: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Detached `[B, T]` fp32 token weights for the policy-gradient term, and their metrics.

    Args:
        old_logp: `[B, T]` log π_old of the sampled tokens (the trainer, start of the step).
        engine_logp: `[B, T]` log μ of the same tokens (the rollout engine's).
        mask: `[B, T]` bool, True on response tokens that count.
        mode: "tis" or "mis" (see the module docstring); "off" returns ones.
        cap: C > 1.
    Metrics (token means over `mask`): rollout_correction/weight_mean, /abs_log_ratio_mean
    (|log π_old − log μ|), /truncated_fraction (tis: tokens with ρ > C) or /masked_fraction (mis: tokens
    of masked sequences).
    """
    if mode not in MODES:
        raise ValueError(f"rollout correction must be one of {MODES}, got {mode!r}")
    if not cap > 1.0:
        raise ValueError(f"rollout correction cap must be > 1, got {cap}")
    if old_logp.shape != engine_logp.shape or old_logp.shape != mask.shape:
        raise ValueError(
            f"old_logp, engine_logp and mask must share one [B, T] shape; got {tuple(old_logp.shape)}, "
            f"{tuple(engine_logp.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.bool()
    if mode == "off":
        return torch.ones_like(old_logp, dtype=torch.float32), {}
    # Padding positions may hold anything: zero the log-ratio there before exp / means.
    log_rho = torch.where(mask, old_logp.detach().float() - engine_logp.detach().float(), 0.0)
    metrics = {"rollout_correction/abs_log_ratio_mean": masked_mean(log_rho.abs(), mask)}
    if mode == "tis":
        # exp of a clamped log: ρ above C is truncated anyway, and exp never overflows.
        rho = log_rho.clamp(max=math.log(cap)).exp()
        metrics["rollout_correction/truncated_fraction"] = masked_mean(
            (log_rho > math.log(cap)).float(), mask
        )
        weights = rho
    else:
        counts = mask.sum(-1)
        seq_dev = log_rho.abs().sum(-1) / counts.clamp(min=1)
        keep = (seq_dev <= math.log(cap)) | (counts == 0)
        weights = keep[:, None].expand_as(log_rho).float()
        metrics["rollout_correction/masked_fraction"] = masked_mean(1.0 - weights, mask)
    weights = torch.where(mask, weights, 0.0)
    metrics["rollout_correction/weight_mean"] = masked_mean(weights, mask)
    return weights, metrics
