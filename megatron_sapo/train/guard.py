"""After a weight sync, prove the engine serves the trainer's weights: compare log-probs on fresh samples.

    metrics = check_weight_sync(engine, policy, probe_prompts, version="12", threshold=0.05)
    # {"sync/logprob_diff_mean": ..., "sync/logprob_diff_max": ...}; raises WeightSyncMismatch above

The engine samples a few responses at the trainer's temperature (`policy.temperature`, so
both sides' log-probs are of softmax(logits / T)); the trainer (`PolicyEngine.compute_logprobs`, any
TP/PP/EP layout) scores the same tokens. Every trainer rank calls this (scoring is collective); rank 0
generates and broadcasts the samples, so all ranks reach the same verdict. A sync that "succeeded" but
left stale or misnamed weights (e.g. MoE experts sent under names the engine ignores) shows up here as a
large difference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from megatron_sapo.megatron.batching import Sample
from megatron_sapo.rollout.types import Prompt, RolloutEngine, RolloutError, SamplingParams

log = logging.getLogger(__name__)


class WeightSyncMismatch(RolloutError):
    """The engine's log-probs do not match the trainer's after a weight sync."""


def check_weight_sync(
    engine: RolloutEngine | None,
    policy: Any,
    prompts: Sequence[Prompt],
    *,
    version: str | None = None,
    threshold: float = 0.05,
    max_new_tokens: int = 16,
    seed: int = 0,
) -> dict[str, float]:
    """Mean and max |engine logp − trainer logp| over the generated tokens; raise above `threshold` (mean).

    `engine` is only used on global rank 0 (pass None elsewhere); `policy` has `compute_logprobs(samples)`
    and `temperature` (a `PolicyEngine`).
    """
    temperature = policy.temperature
    driver = not dist.is_initialized() or dist.get_rank() == 0
    payload: list[Any] = [None]
    if driver:
        try:
            gens = engine.generate(
                prompts,
                SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed),
                n=1,
            )
            payload = [
                [(g.prompt_ids, g.token_ids, g.logprobs, g.weight_version) for g in gens if g.token_ids]
            ]
        except RolloutError as exc:  # e.g. EngineRestarted: raised on every rank, none left in the broadcast
            payload = [exc]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], RolloutError):
        raise payload[0]
    probes = payload[0]
    if not probes:
        raise WeightSyncMismatch("weight-sync check: the engine generated no tokens for the probe prompts")
    stale = sorted({v for *_, v in probes if version is not None and v != version})
    samples = [
        Sample(tokens=torch.tensor(p + r), response_start=len(p), advantage=0.0) for p, r, _, _ in probes
    ]
    trainer = policy.compute_logprobs(samples)
    diffs = torch.cat(
        [(t.float() - torch.tensor(e, dtype=torch.float32)).abs() for t, (_, _, e, _) in zip(trainer, probes)]
    )
    metrics = {"sync/logprob_diff_mean": diffs.mean().item(), "sync/logprob_diff_max": diffs.max().item()}
    if stale:
        raise WeightSyncMismatch(
            f"the engine answered with weight version(s) {stale}, expected {version!r}: the update did not "
            "reach it (failed or unflushed sync, or a restarted server without a re-sync)"
        )
    if metrics["sync/logprob_diff_mean"] > threshold:
        raise WeightSyncMismatch(
            f"engine and trainer log-probs differ after the weight sync: mean |Δ| "
            f"{metrics['sync/logprob_diff_mean']:.4g} > threshold {threshold} (max "
            f"{metrics['sync/logprob_diff_max']:.4g}, {diffs.numel()} tokens). Likely stale or misnamed "
            "weights: a tensor the engine ignored (unknown HF name, e.g. fused expert names), a missed "
            "bucket, or a layout/mapping bug in the bridge."
        )
    return metrics
