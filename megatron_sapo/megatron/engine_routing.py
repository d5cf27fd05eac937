"""Routing replay (R2 / R3) wiring for `PolicyEngine`: per-sample routing in, per-micro-batch replay out.

`EngineRouting` wraps one `RoutingReplay` over the engine's model chunks. Routing is kept per sample,
for this rank's MoE layers only (`[L_local, S_i, k]`, uint8 / int16 on CPU: the ids need no more), and
re-merged into each micro-batch's `[L, T*B, k]` layout (`MicroBatch.routing`) whatever the grouping,
so the update passes may pack samples differently from the old-log-prob pass:

    routing = EngineRouting(model_chunks, "r2")
    routing.begin("record")                      # old-log-prob pass (R2)
    ... forward_step: routing.before_forward(batch); model(...); routing.after_forward(batch)
    routing.store(samples, groups, batches)      # sample -> [L_local, S_i, k]
    rows = routing.rows_for(samples)             # R2: stored; R3: from Sample.routing
    routing.attach_to(batch, [rows[i] for i in group])  # collate-time: MicroBatch.routing
    routing.begin("replay") ... routing.end()

`before_forward` / `after_forward` run inside megatron's forward_step_func, i.e. right around each
(micro-batch, model chunk) forward: under (virtual) pipeline parallelism chunks run micro-batches at
different times, and each call sets or collects exactly that micro-batch's routing.

Tests: ``python -m pytest tests/distributed/test_engine_routing_replay.py -q``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from megatron.core.transformer.moe.router import TopKRouter

from megatron_sapo.megatron.batching import MicroBatch, Sample
from megatron_sapo.megatron.routing_replay import (
    Mode,
    RoutingReplay,
    merge_samples,
    moe_layer_ordinals,
    split_by_sample,
)

REPLAY_MODES = ("off", "r2", "r3")


class EngineRouting:
    """R2 (record in the π_old pass, replay in updates) or R3 (replay `Sample.routing`) for an engine."""

    def __init__(self, model_chunks: Sequence[torch.nn.Module], mode: str) -> None:
        if mode not in ("r2", "r3"):
            raise ValueError(f"EngineRouting mode must be 'r2' or 'r3', got {mode!r}")
        config = model_chunks[0].config
        if not config.num_moe_experts:
            raise ValueError(f"LossConfig.routing_replay={mode!r} needs a MoE model (num_moe_experts unset)")
        if config.sequence_parallel:
            # Routers would see this TP rank's sequence shard: recording needs a TP all-gather and
            # replay a slice, neither of which has a test path on CPU yet.
            raise NotImplementedError("routing replay with sequence parallelism is not supported yet")
        self.mode = mode
        self.num_moe_layers = len(moe_layer_ordinals(config))
        self.topk = config.moe_router_topk
        self.num_experts = config.num_moe_experts
        self.dtype = torch.uint8 if self.num_experts <= 256 else torch.int16
        has_router = any(isinstance(m, TopKRouter) for c in model_chunks for m in c.modules())
        # A pipeline stage may hold no MoE layer (e.g. leading dense layers): nothing to hook there.
        self.replay = RoutingReplay(model_chunks).attach() if has_router else None
        self.local = sorted({h.ordinal for h in self.replay.hooks}) if self.replay else []
        self._stored: dict[int, tuple[Sample, torch.Tensor]] = {}
        self._pending: dict[int, dict[int, torch.Tensor]] = {}

    # -- per-sample routing ------------------------------------------------------------------------
    def rows_for(self, samples: Sequence[Sample], *, update: bool) -> list[torch.Tensor] | None:
        """Per-sample `[L_local, S_i, k]` routing to replay, or None when this pass records (R2 π_old).

        R3: `Sample.routing` (validated, cut to the `S_i = len(tokens) − 1` input positions). R2: what the
        last old-log-prob pass stored for these very `Sample` objects (`update=True` only).
        """
        if self.mode == "r2":
            if not update:
                return None
            return [self._stored[id(s)][1] for s in samples]
        return [self._external(s) for s in samples]

    def missing(self, samples: Sequence[Sample]) -> bool:
        """R2: whether some sample has no routing from an old-log-prob pass (stale ids do not count)."""
        return self.mode == "r2" and any(self._stored.get(id(s), (None,))[0] is not s for s in samples)

    def _external(self, sample: Sample) -> torch.Tensor:
        routing = sample.routing
        if routing is None:
            raise ValueError("LossConfig.routing_replay='r3' needs Sample.routing on every sample")
        if routing.shape[0] != self.num_moe_layers or routing.shape[2] != self.topk:
            raise ValueError(
                f"Sample.routing must be [num_moe_layers={self.num_moe_layers}, L-1 or L, "
                f"topk={self.topk}], got {tuple(routing.shape)}"
            )
        if routing.numel() and (int(routing.min()) < 0 or int(routing.max()) >= self.num_experts):
            raise ValueError(f"Sample.routing has expert ids outside [0, {self.num_experts})")
        return routing[self.local, : sample.seq_len].to(self.dtype)

    def attach_to(self, batch: MicroBatch, rows: Sequence[torch.Tensor]) -> None:
        """Set `batch.routing` `[L, T*B, k]` from its samples' rows (padding and filler rows: experts 0..k-1)."""
        b, t = batch.input_ids.shape
        local = [r.long() for r in rows]
        empty = torch.zeros(len(self.local), 0, self.topk, dtype=torch.long)
        merged = merge_samples(local + [empty] * (b - len(local)), t) if self.local else None
        # All MoE layers, as RoutingReplay.set_routing wants; rows of other stages' layers are never read.
        full = torch.arange(self.topk, dtype=torch.long).expand(self.num_moe_layers, t * b, self.topk).clone()
        if merged is not None:
            full[self.local] = merged
        batch.routing = full.to(self.dtype)

    def store(
        self, samples: Sequence[Sample], groups: Sequence[Sequence[int]], batches: Sequence[MicroBatch]
    ) -> None:
        """After a recording pass: keep each sample's `[L_local, S_i, k]` routing (replacing earlier ones)."""
        self._stored = {}
        for group, batch in zip(groups, batches):
            recorded = self._pending.pop(id(batch), {})
            if not group:
                continue
            b = batch.input_ids.shape[0]
            if self.local:
                stacked = torch.stack([recorded[o] for o in self.local]).to("cpu", self.dtype)
                rows = split_by_sample(stacked, b, [samples[i].seq_len for i in group])
            else:
                rows = [torch.zeros(0, samples[i].seq_len, self.topk, dtype=self.dtype) for i in group]
            for i, r in zip(group, rows):
                self._stored[id(samples[i])] = (samples[i], r)
        self._pending.clear()

    # -- around megatron's schedule ----------------------------------------------------------------
    def begin(self, mode: Mode) -> None:
        """Mode for the forward calls of the next schedule run ("record" or "replay")."""
        if self.replay is not None:
            self.replay.mode = mode

    def end(self) -> None:
        """Back to the router's own top-k, so forwards outside the engine's passes are untouched."""
        if self.replay is not None:
            self.replay.mode = "off"
            self.replay.clear()
        self._pending.clear()

    def before_forward(self, batch: MicroBatch) -> None:
        """Right before one (micro-batch, chunk) forward: set that micro-batch's routing for replay."""
        if self.replay is not None and self.replay.mode == "replay":
            self.replay.set_routing(batch.routing)

    def after_forward(self, batch: MicroBatch) -> None:
        """Right after one forward in record mode: file this chunk's layers under the micro-batch."""
        if self.replay is not None and self.replay.mode == "record":
            self._pending.setdefault(id(batch), {}).update(self.replay.recorded)
            self.replay.recorded.clear()
