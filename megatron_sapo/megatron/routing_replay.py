"""MoE routing replay for megatron-core: R2 (replay the old policy's experts) and R3 (replay the rollout's).

R2 (GSPO paper): record the experts each MoE router picks in the trainer's old-log-prob pass and replay
them in the update passes. R3 (arXiv 2510.11370): replay the experts the rollout engine picked. In both
the router logits are still computed and the weights of the chosen experts come from the *current*
router, gathered at the replayed indices with the router's own normalisation (topk-then-softmax,
softmax-then-topk, sigmoid + renormalise, scaling factor), so the router keeps its gradient.

    replay = RoutingReplay(model_chunks)        # finds every TopKRouter; validates the config
    with replay:                                # installs per-router hooks; removed on exit
        replay.mode = "record"
        logits = model(...); routing = replay.pop_recorded()    # [L, S*B, k]
        replay.mode = "replay"
        replay.set_routing(routing); logits = model(...)        # same experts, current probabilities

Hook point: megatron-core (>= 0.16) routes through `topk_routing_with_score_function(...,
router_replay=router.router_replay)`, which asks `router_replay.get_replay_topk(scores, ...)` for the
top-k. We set that attribute on each router instance to a `_LayerHook` (no module-level patch, no config
flag, none of megatron's class-global `RouterReplay` registry, which leaks across models); `detach()`
restores the previous value. Replaying at the router means expert parallelism needs nothing more:
routing is decided on every rank before the token dispatch.

Layout. Routing for one forward call is a tensor `[L, T, k]` of expert ids: L = number of MoE layers of
the *whole* model (global order, counting across pipeline stages), T = tokens this rank's routers see,
k = `moe_router_topk`. Megatron feeds a MoE layer hidden states `[S, B, H]` flattened sequence-major, so
token t = s * B + b (with sequence parallelism S is this TP rank's sequence shard; with packed THD
inputs B = 1). Rows for MoE layers not on this rank are -1 in what `pop_recorded` returns and ignored by
replay. `split_by_sample` / `merge_samples` convert to and from per-sample `[L, S_b, k]` so that the
update passes may regroup samples into different micro-batches than the old-log-prob pass; padded
positions get experts 0..k-1 (any distinct ids are valid: padded tokens' outputs are masked anyway).

Not supported (checked in `RoutingReplay.__init__`): the fused TE router and sinkhorn routing (both
bypass the hook), megatron's own `moe_enable_routing_replay`, and router recomputation under pipeline
parallelism (1F1B runs later forwards before the recomputing backward, so the routing set for the
current forward would be the wrong one; at PP=1 each micro-batch's backward follows its forward, so
recomputation replays the right routing). Auxiliary losses still use the router's own top-k.

Tests: `python -m pytest tests/unit/test_routing_replay.py tests/distributed/test_routing_replay.py`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

Mode = Literal["off", "record", "replay"]


def moe_layer_ordinals(config: TransformerConfig) -> dict[int, int]:
    """Global decoder layer number (1-based, as `router.layer_number`) -> index among the MoE layers."""
    freq = config.moe_layer_freq
    pattern = [int(i % freq == 0) for i in range(config.num_layers)] if isinstance(freq, int) else list(freq)
    moe_layers = [i + 1 for i, is_moe in enumerate(pattern) if is_moe]
    return {layer: ordinal for ordinal, layer in enumerate(moe_layers)}


class _LayerHook:
    """Stands in for megatron's per-router `RouterReplay`: decides the top-k of one MoE layer."""

    def __init__(self, owner: RoutingReplay, ordinal: int) -> None:
        self.owner = owner
        self.ordinal = ordinal

    def get_replay_topk(
        self,
        scores: torch.Tensor,
        topk: int,
        num_groups: int | None,
        group_topk: int | None,
        default_compute_topk: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k `(values [T, k], indices [T, k])` of `scores [T, E]`: computed, recorded or replayed."""
        mode = self.owner.mode
        if mode == "replay":
            indices = self.owner.layer_routing(self.ordinal, num_tokens=scores.shape[0], topk=topk)
            indices = indices.to(device=scores.device, dtype=torch.long)
            # Values come from the current scores, so softmax/renormalisation downstream (and the
            # router gradient) see the current router at the replayed experts.
            return scores.gather(1, indices), indices
        values, indices = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
        if mode == "record":
            self.owner.recorded[self.ordinal] = indices.detach()
        return values, indices


def _check_supported(config: TransformerConfig) -> None:
    if "router_replay" not in inspect.signature(moe_utils.topk_routing_with_score_function).parameters:
        raise NotImplementedError(
            "this megatron-core has no router_replay hook in topk_routing_with_score_function (added in "
            "0.16); routing replay needs megatron-core >= 0.16"
        )
    if config.moe_router_fusion:
        raise ValueError("routing replay needs moe_router_fusion=False (the fused TE router bypasses it)")
    if config.moe_router_load_balancing_type == "sinkhorn":
        raise ValueError("routing replay does not support sinkhorn routing (it bypasses the top-k hook)")
    if config.moe_enable_routing_replay:
        raise ValueError(
            "moe_enable_routing_replay (megatron's global replay) and RoutingReplay exclude each other"
        )
    recomputes_router = config.recompute_granularity == "full" or (
        config.recompute_granularity == "selective" and "moe" in (config.recompute_modules or [])
    )
    if recomputes_router and config.pipeline_model_parallel_size > 1:
        raise ValueError(
            "routing replay with router recomputation needs pipeline_model_parallel_size == 1: under 1F1B "
            "the recomputing backward runs after later micro-batches' forwards"
        )


class RoutingReplay:
    """Record / replay the top-k expert choice of every MoE router in `model_chunks`.

    `mode` is "off" (router decides; the hooks only forward to megatron's top-k), "record" (router
    decides; `pop_recorded` returns what it chose), or "replay" (experts from `set_routing`).
    """

    def __init__(self, model_chunks: Iterable[torch.nn.Module]) -> None:
        self.routers: list[TopKRouter] = [
            m for chunk in model_chunks for m in chunk.modules() if isinstance(m, TopKRouter)
        ]
        if not self.routers:
            raise ValueError("no megatron TopKRouter in the given model chunks")
        config = self.routers[0].config
        _check_supported(config)
        ordinals = moe_layer_ordinals(config)
        self.num_moe_layers = len(ordinals)
        self.topk = config.moe_router_topk
        self.hooks = [_LayerHook(self, ordinals[r.layer_number]) for r in self.routers]
        self._mode: Mode = "off"
        self.recorded: dict[int, torch.Tensor] = {}
        self._routing: torch.Tensor | None = None
        self._saved: list[object] | None = None

    @property
    def mode(self) -> Mode:
        """ "off", "record" or "replay"; applies to every forward call until changed."""
        return self._mode

    @mode.setter
    def mode(self, mode: Mode) -> None:
        if mode not in ("off", "record", "replay"):
            raise ValueError(f"mode must be 'off', 'record' or 'replay', got {mode!r}")
        self._mode = mode

    # -- installation ------------------------------------------------------------------------------
    def attach(self) -> RoutingReplay:
        """Install the hooks on the routers (replacing `router.router_replay`, restored by `detach`)."""
        if self._saved is None:
            self._saved = [r.router_replay for r in self.routers]
            for router, hook in zip(self.routers, self.hooks):
                router.router_replay = hook
        return self

    def detach(self) -> None:
        """Restore each router's previous `router_replay`; forget recorded and replayed routing."""
        if self._saved is not None:
            for router, saved in zip(self.routers, self._saved):
                router.router_replay = saved
            self._saved = None
        self.mode = "off"
        self.clear()

    def __enter__(self) -> RoutingReplay:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # -- per-forward routing -----------------------------------------------------------------------
    def set_routing(self, routing: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Routing for the next forward call(s) in "replay" mode.

        `routing`: `[L, T, k]` expert ids (any integer dtype, any device), or L tensors `[T, k]`; L = the
        model's MoE layers, T = tokens in the forward (index s * B + b, see module docstring).
        """
        if not torch.is_tensor(routing):
            routing = torch.stack(list(routing))
        if routing.dim() != 3 or routing.shape[0] != self.num_moe_layers or routing.shape[2] != self.topk:
            raise ValueError(
                f"routing must be [num_moe_layers={self.num_moe_layers}, T, topk={self.topk}], "
                f"got {tuple(routing.shape)}"
            )
        self._routing = routing

    def layer_routing(self, ordinal: int, *, num_tokens: int, topk: int) -> torch.Tensor:
        """The `[T, k]` expert ids set for MoE layer `ordinal` (called from the router hook)."""
        if self._routing is None:
            raise RuntimeError("RoutingReplay is in 'replay' mode but set_routing() was not called")
        indices = self._routing[ordinal]
        if indices.shape != (num_tokens, topk):
            raise ValueError(
                f"replayed routing for MoE layer {ordinal} is {tuple(indices.shape)}, the router sees "
                f"{num_tokens} tokens x top-{topk} (token order s * B + b over [S, B])"
            )
        return indices

    def pop_recorded(self) -> torch.Tensor:
        """Expert ids chosen since the last pop, `[L, T, k]` int64; -1 rows for layers that did not run."""
        if not self.recorded:
            raise RuntimeError("nothing recorded: set mode='record' and run a forward first")
        first = next(iter(self.recorded.values()))
        out = first.new_full((self.num_moe_layers, *first.shape), -1)
        for ordinal, indices in self.recorded.items():
            out[ordinal] = indices
        self.recorded.clear()
        return out

    def clear(self) -> None:
        """Drop recorded routing and the routing set for replay."""
        self.recorded.clear()
        self._routing = None


def split_by_sample(
    routing: torch.Tensor, batch_size: int, lengths: Sequence[int] | None = None
) -> list[torch.Tensor]:
    """`[L, S*B, k]` (token s * B + b) -> B tensors `[L, S_b, k]`, cut to `lengths[b]` when given."""
    num_layers, num_tokens, topk = routing.shape
    per_sample = routing.view(num_layers, num_tokens // batch_size, batch_size, topk).permute(2, 0, 1, 3)
    return [
        per_sample[b, :, : (lengths[b] if lengths is not None else None)].contiguous()
        for b in range(batch_size)
    ]


def merge_samples(samples: Sequence[torch.Tensor], seq_len: int) -> torch.Tensor:
    """B tensors `[L, S_b, k]` (S_b <= seq_len) -> `[L, seq_len*B, k]`, padded positions -> experts 0..k-1."""
    num_layers, _, topk = samples[0].shape
    out = torch.arange(topk, device=samples[0].device, dtype=samples[0].dtype)
    out = out.expand(num_layers, seq_len, len(samples), topk).clone()
    for b, sample in enumerate(samples):
        out[:, : sample.shape[1], b] = sample
    return out.view(num_layers, seq_len * len(samples), topk)
