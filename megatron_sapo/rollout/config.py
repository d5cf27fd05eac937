"""The `rollout:` section of a run config: which engine, how many samples, sampling, servers, weight sync.

`ServerOptions` is `ServerConfig` (server.py) without its run-time `model_path`; `SamplingParams`
(types.py) and `WeightSyncConfig` (weight_sync.py) are used as they are. Tests: tests/unit/test_config.py.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Literal

from megatron_sapo.rollout.server import DEVICES, ServerConfig
from megatron_sapo.rollout.types import SamplingParams
from megatron_sapo.rollout.weight_sync import WeightSyncConfig
from megatron_sapo.utils.typed_config import check, check_choice, check_min, without_fields

ServerOptions = without_fields(
    ServerConfig,
    "model_path",
    name="ServerOptions",
    module=__name__,
    doc="How to launch each SGLang server (ServerConfig without `model_path`, which is set at run time).",
)


@dataclass
class RolloutConfig:
    """Generation: which engine, how many samples, sampling settings, servers and weight sync."""

    engine: Literal["sglang", "transformers"] = "sglang"
    """"sglang" (HTTP servers) or "transformers" (in-process, for small CPU runs and tests)."""
    prompts_per_step: int = 8
    """Prompts per rollout batch (per RL step)."""
    samples_per_prompt: int = 8
    """Responses sampled per prompt (the group size G / n for group-normalised advantages)."""
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=32))
    """Sampling settings of the training rollouts."""
    server: ServerOptions = field(default_factory=ServerOptions)
    """How each launched SGLang server runs (ignored when `urls` are given)."""
    urls: list[str] = field(default_factory=list)
    """Running SGLang servers (http://host:port) to use instead of launching `num_engines` ones; their
    keys come from the environment, never from the config: MEGATRON_SAPO_ENGINE_API_KEY (their --api-key)
    and MEGATRON_SAPO_ENGINE_ADMIN_KEY (their --admin-api-key; unset = the api key)."""
    num_engines: int = 1
    """SGLang servers to launch (each `server.tp_size` devices)."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """How the trainer's weights reach the engines after every update."""
    guard_threshold: float = 0.05
    """Largest mean |engine − trainer| log-prob difference accepted after a weight sync: by the probes, and
    by every step's rollout (its engine log-probs against the trainer's pi_old, before any update)."""
    guard_prompts: int = 2
    """Prompts sampled to probe a weight sync right after it (0 = no check at all, the rollout's included)."""
    guard_every: int = 1
    """Probe every N-th sync (always before an eval and after the last sync); between probes each step's
    own rollout checks the sync before it, for free. 1 = probe every sync."""
    dynamic_sampling: bool = False
    """Drop prompt groups whose rewards are all equal (zero advantage) and sample more prompts."""
    max_refill_rounds: int = 3
    """With `dynamic_sampling`, extra generation rounds per step before training on what there is."""
    max_staleness: int = 0
    """Asynchronous rollouts: while step t trains, the engines already generate steps t+1..t+k with the
    weights they hold (k = this); a sample of weight version v trains at step t only if t − v ≤ k (else
    dropped, counted in rollout/dropped_stale). 0 = synchronous (each step generates after the last sync).
    docs/async.md."""
    partial: bool = False
    """Partial rollouts (needs max_staleness >= 1): a sync interrupts the generation in flight instead of
    waiting for it; each unfinished sample keeps its tokens and continues under the new weights, every
    token recording the version that generated it (rollout/partial_samples, rollout/token_staleness_mean;
    the rollout correction weighs each token by its own version's log-prob). Token-id prompts only (not
    image prompts). docs/async.md."""

    def __post_init__(self) -> None:
        check_min(self, "prompts_per_step", "samples_per_prompt", "num_engines", "guard_every")
        check_min(self, "guard_prompts", "max_refill_rounds", "max_staleness", minimum=0)
        check(self.guard_threshold > 0, "guard_threshold", f"must be > 0, got {self.guard_threshold}")
        check_choice(self.server.device, DEVICES, "server.device")
        for i, url in enumerate(self.urls):
            check(
                re.match(r"https?://[^/\s]+", url) is not None, f"urls[{i}]", f"not an http(s) URL: {url!r}"
            )
        check(not self.urls or self.engine == "sglang", "urls", "only for rollout.engine 'sglang'")
        check(
            not self.partial or self.max_staleness >= 1,
            "partial",
            "interrupts generations that run beside training: needs max_staleness >= 1",
        )

    def server_config(self, model_path: str) -> ServerConfig:
        """The `ServerConfig` of one launched server that loads `model_path`."""
        return ServerConfig(model_path=model_path, **dataclasses.asdict(self.server))
