"""What every rollout engine takes and returns: sampling settings in, one `Generation` per sample out.

The SGLang HTTP client (`rollout/client.py`) and the in-process transformers engine
(`rollout/hf_engine.py`) both implement `RolloutEngine`, so the trainer, the weight-sync guard and the
tests do not care which one runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch

from megatron_sapo.data.vision import ImagePrompt

Prompt = str | Sequence[int] | ImagePrompt
"""Text (tokenized by the engine), token ids, or a rendered vision-language prompt (`data/vision.py`)."""


class RolloutError(RuntimeError):
    """A rollout engine refused a request or failed; the message names the engine and the cause."""


class PolicyDiverged(RolloutError):
    """The policy's next-token distribution is not finite (NaN / inf logits or log-probs): training blew up.

    Raised by an engine that samples from it and by the trainer when it scores a rollout; `step` is the
    RL step (metrics.jsonl numbering) once the loop knows it. Stopping beats training on garbage: the
    last checkpoint is the last good policy.
    """

    def __init__(self, detail: str, step: int | None = None) -> None:
        super().__init__(detail, step)  # both in args: pickles (broadcast to the other ranks) as it is
        self.detail, self.step = detail, step

    def __str__(self) -> str:
        return f"policy diverged{f' at step {self.step}' if self.step is not None else ''}: {self.detail}"


@dataclass
class SamplingParams:
    """Per-request sampling settings (names follow SGLang's `sampling_params`)."""

    max_new_tokens: int = 128
    """Upper bound on generated tokens per sample; hitting it gives finish_reason "length"."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (training rollouts need > 0). Log-probs are of
    log_softmax(logits / temperature) (raw logits when greedy), as SGLang reports them and as the trainer
    recomputes them (`PolicyEngine(..., temperature=T)`)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1.0 disables it (RL needs the full distribution to match the trainer)."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 disables it."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (not included in the response)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Extra token ids that end a sample (the tokenizer's EOS always does)."""
    seed: int | None = None
    """Sampling seed (each sample gets its own, derived from it). The in-process engine always honours it;
    SGLang 0.5.23 only when the server runs with --enable-deterministic-inference, else it is ignored."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")

    def to_sglang(self) -> dict:
        """The dict SGLang's /generate expects in `sampling_params`."""
        out = asdict(self)
        if out.pop("seed") is not None:
            out["sampling_seed"] = self.seed
        if not out["stop"]:
            out.pop("stop")
        if not out["stop_token_ids"]:
            out.pop("stop_token_ids")
        return out


def prompt_budgets(count: int, sampling: SamplingParams, max_new_tokens: Sequence[int] | None) -> list[int]:
    """Each of `count` prompts' token budget: `max_new_tokens` (one per prompt, each >= 1) when given, else
    `sampling.max_new_tokens` for all (`RolloutEngine.generate`)."""
    budgets = [sampling.max_new_tokens] * count if max_new_tokens is None else list(max_new_tokens)
    if len(budgets) != count or min(budgets, default=1) < 1:
        raise RolloutError(f"max_new_tokens needs one budget >= 1 per prompt ({count}), got {budgets}")
    return budgets


@dataclass
class Generation:
    """One sampled response. Lists are per generated token, in order."""

    prompt_index: int
    """Index of the prompt in the request's prompt list."""
    sample_index: int
    """0..n-1 among the n samples drawn for that prompt."""
    prompt_ids: list[int]
    """Prompt token ids as the engine tokenized them."""
    token_ids: list[int]
    """Response token ids, [R]."""
    logprobs: list[float]
    """Engine log-prob of each response token, log_softmax(logits / temperature), [R]."""
    finish_reason: str
    """"stop" (EOS / stop string / stop token), "length" (max_new_tokens) or "abort" (interrupted, see
    `RolloutEngine.interrupt`, or refused by the engine)."""
    weight_version: str
    """The engine's weight version when the sample finished (see weight sync)."""
    token_versions: list[str] | None = None
    """The weight version that generated each response token, [R], when they differ (a partial rollout
    continued under newer weights, `train/pipeline.py`); None: every token is `weight_version`'s."""
    text: str | None = None
    """Detokenized response, when the engine provides it."""
    routed_experts: np.ndarray | None = None
    """MoE routing captured by the engine, [prompt+response-1, layers, top_k], when asked for and offered."""


class RolloutEngine(Protocol):
    """The interface the trainer and the weight-sync code use (SGLangEngine, TransformersEngine)."""

    @property
    def weight_version(self) -> str: ...

    def generate(
        self,
        prompts: Sequence[Prompt],
        sampling: SamplingParams,
        *,
        n: int = 1,
        return_routed_experts: bool = False,
        max_new_tokens: Sequence[int] | None = None,
    ) -> list[Generation]:
        """n samples per prompt, ordered by (prompt_index, sample_index); `max_new_tokens`: a budget per
        prompt instead of `sampling.max_new_tokens` (a partial rollout's continuations)."""
        ...

    def interrupt(self) -> None:
        """Make the generations in flight return now with what they have (finish_reason "abort", the
        tokens and log-probs so far); called from another thread. A `generate` call that starts after it
        runs normally: the caller repeats `interrupt` until the call it meant has returned."""
        ...

    def update_weights_from_tensors(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, version: str
    ) -> None:
        """Load full tensors under Hugging Face checkpoint names (per-expert names for MoE)."""
        ...

    def update_weights_from_disk(self, model_dir: str, *, version: str) -> None:
        """Reload all weights from a Hugging Face directory (safetensors + config)."""
        ...

    def release_memory(self) -> None:
        """Lend the engine's accelerator memory (weights, KV cache) to colocated training."""
        ...

    def resume_memory(self) -> None:
        """Take back what `release_memory` lent (the weights must be synced again afterwards)."""
        ...

    def shutdown(self) -> None: ...
