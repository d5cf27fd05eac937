"""Loss registry and the one public entry point, `compute_policy_loss`.

A policy loss is one function in its own file, registered by name:

    @register_loss("name")
    def my_loss(log_ratio, advantages, mask, *, my_param=...) -> (per_token_loss [B, T], metrics)

It receives the fp32, clamped token log-ratio `log r = logp − old_logp` `[B, T]` (with grad), the
advantages broadcast to `[B, T]`, and the bool mask `[B, T]`; it returns the per-token loss (−f(r)·Â)
and a dict of float metrics. Everything shared — dtype, clamping, aggregation, rollout correction, KL /
entropy terms, log-ratio diagnostics — happens here, once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from megatron_sapo.losses.aggregation import aggregate
from megatron_sapo.losses.diagnostics import log_ratio_metrics, masked_mean
from megatron_sapo.losses.rollout_correction import rollout_correction_weights

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float]]]
LOSSES: dict[str, LossFn] = {}


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Decorator registering a policy loss under `name` (a duplicate name is an error)."""

    def wrap(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"policy loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return wrap


def compute_policy_loss(
    name: str,
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    aggregation: str = "seq-mean-token-mean",
    normalizer: float | None = None,
    log_ratio_clamp: float = 20.0,
    rollout_correction: str = "off",
    rollout_correction_cap: float = 2.0,
    engine_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    **params: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss (= −J, aggregated) and float metrics for the registered policy loss `name`.

    Args:
        logp: `[B, T]` log π_θ of the sampled tokens (carries the gradient).
        old_logp: `[B, T]` log π_old of the same tokens (no gradient).
        advantages: `[B]` (one per sequence) or `[B, T]` (per token).
        mask: `[B, T]` bool / 0-1, True on response tokens that count.
        aggregation: "seq-mean-token-mean" (mean over sequences of each sequence's token mean) or
            "token-mean" (mean over all valid tokens).
        normalizer: global number of sequences (resp. tokens) of the whole mini-batch when this call sees
            only a micro-batch or one data-parallel shard; None = this batch's own count.
        log_ratio_clamp: |logp − old_logp| is clamped to this before exp (numerical safety).
        rollout_correction, rollout_correction_cap, engine_logp: "tis" / "mis" weight each token's
            policy-gradient loss by π_old against the engine's `[B, T]` log μ (rollout_correction.py);
            "off" (default) leaves it unweighted.
        kl_coef, ref_logp: optional k3 KL penalty to a reference policy (off by default, as in SAPO).
        entropy_coef, entropy: optional entropy bonus from `[B, T]` token entropies (off by default).
        **params: the loss's own parameters (SAPO: tau_pos, tau_neg; GRPO/GSPO: eps_low, eps_high).
    """
    if name not in LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; registered: {sorted(LOSSES)}")
    fn = LOSSES[name]
    _check_params(name, fn, params)
    if logp.shape != old_logp.shape or logp.shape != mask.shape or logp.dim() != 2:
        raise ValueError(
            f"logp, old_logp and mask must share one [B, T] shape; got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    mask = mask.bool()
    adv = advantages.detach().to(torch.float32)
    if adv.shape == logp.shape[:1]:
        adv = adv[:, None].expand_as(logp)
    elif adv.shape != logp.shape:
        raise ValueError(f"advantages must be [B] or [B, T] = {tuple(logp.shape)}, got {tuple(adv.shape)}")

    # fp32 and clamped before exp: a bf16 log-ratio loses ~3 digits of r, and an unclamped one overflows.
    log_ratio = (logp.float() - old_logp.detach().float()).clamp(-log_ratio_clamp, log_ratio_clamp)
    per_token, metrics = fn(log_ratio, adv, mask, **params)
    if rollout_correction != "off":
        if engine_logp is None:
            raise ValueError(
                f"rollout_correction={rollout_correction!r} needs the engine's log-probs (engine_logp)"
            )
        weights, correction = rollout_correction_weights(
            old_logp, engine_logp, mask, mode=rollout_correction, cap=rollout_correction_cap
        )
        per_token = per_token * weights
        metrics.update(correction)
    pg_loss = aggregate(per_token, mask, aggregation, normalizer)
    loss = pg_loss
    metrics["pg_loss"] = float(pg_loss.detach())

    if kl_coef != 0.0:
        if ref_logp is None:
            raise ValueError("kl_coef is non-zero but no ref_logp was given")
        # k3 estimator of KL(π_θ ‖ π_ref): exp(d) − d − 1 with d = log π_ref − log π_θ; ≥ 0, unbiased.
        d = (ref_logp.detach().float() - logp.float()).clamp(-log_ratio_clamp, log_ratio_clamp)
        kl = d.exp() - d - 1.0
        loss = loss + kl_coef * aggregate(kl, mask, aggregation, normalizer)
        metrics["kl"] = masked_mean(kl.detach(), mask)
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy_coef is non-zero but no entropy was given")
        loss = loss - entropy_coef * aggregate(entropy.float(), mask, aggregation, normalizer)
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.detach().float(), mask)

    metrics.update(log_ratio_metrics(log_ratio.detach(), mask))
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def loss_parameters(name: str) -> dict[str, float | None]:
    """The registered loss `name`'s own keyword parameters and their defaults (None: it has none)."""
    params = inspect.signature(LOSSES[name]).parameters.values()
    return {
        p.name: None if p.default is p.empty else float(p.default) for p in params if p.kind is p.KEYWORD_ONLY
    }


def _check_params(name: str, fn: LossFn, params: dict[str, float]) -> None:
    accepted = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise TypeError(f"policy loss {name!r} got unknown parameter(s) {unknown}; it accepts {accepted}")
