"""Push a Megatron policy's weights into the rollout engine after an update: tensor / distributed / disk.

    sync = WeightSync(engine, model_chunks, hf_config, WeightSyncConfig(transport="tensor"))
    metrics = sync.sync(version="12")      # every trainer rank calls it (the export is collective)

Every trainer rank runs the bridge's bucketed export (`bridge.export_hf_weights`: full tensors under
Hugging Face checkpoint names, per-expert names for MoE, buckets bounded by `bucket_bytes`); only global
rank 0 receives the tensors and talks to the engine:
- "tensor": colocated engines map each bucket (CPU shared memory here; CUDA IPC handles on GPU);
- "distributed": rank 0 and the engines' ranks form one extra process group (gloo on CPU, NCCL on GPU),
  each bucket is one broadcast;
- "disk": rank 0 writes a safetensors snapshot (+ config and tokenizer) and the engines reload it.
Each update sits between begin/end_weight_update, carries the weight version and flushes the prefix cache.
A restarted server gets the current weights again before its in-flight rollout is retried (single-process
trainers); with several trainer ranks the interrupted call raises `EngineRestarted` and the trainer re-syncs
on every rank and redoes it (`resync_on_restart`, trainer `_with_resync`).
Tests: tests/e2e/test_weight_sync.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_sapo.bridge import export_hf_weights
from megatron_sapo.bridge.snapshot import write_hf_snapshot
from megatron_sapo.rollout.client import SGLangEngine
from megatron_sapo.rollout.types import RolloutEngine
from megatron_sapo.utils.spawn import free_port

log = logging.getLogger(__name__)

TRANSPORTS = ("tensor", "distributed", "disk")


@dataclass
class WeightSyncConfig:
    """How trainer weights reach the rollout engine."""

    transport: str = "tensor"
    """"tensor" (colocated, shared memory / CUDA IPC), "distributed" (broadcast over an extra process
    group) or "disk" (safetensors snapshot the engines reload)."""
    bucket_bytes: int = 512 << 20
    """Upper bound on the bytes of one bucket (a larger single tensor travels alone)."""
    disk_dir: str | None = None
    """Where "disk" writes its snapshot (the previous one is replaced); required for "disk"."""
    master_address: str = "127.0.0.1"
    """"distributed": address of trainer rank 0 that the engines connect to."""
    master_port: int = 0
    """"distributed": port for the weight-update group's store; 0 picks a free one."""
    backend: str = "auto"
    """"distributed": "gloo", "nccl", or "auto" (nccl when the model is on CUDA, else gloo)."""

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(
                f"WeightSyncConfig.transport must be one of {TRANSPORTS}, got {self.transport!r}"
            )
        if self.transport == "disk" and not self.disk_dir:
            raise ValueError("WeightSyncConfig.disk_dir is required for transport 'disk'")
        if self.bucket_bytes <= 0:
            raise ValueError(f"WeightSyncConfig.bucket_bytes must be > 0, got {self.bucket_bytes}")


class WeightSync:
    """Trainer side of weight sync; construct on every trainer rank with the same arguments."""

    def __init__(
        self,
        engine: RolloutEngine | None,
        model: Any,
        hf_config: Any,
        config: WeightSyncConfig,
        *,
        groups: Any = None,
    ) -> None:
        self.engine, self.model, self.hf_config, self.config, self.groups = (
            engine,
            model,
            hf_config,
            config,
            groups,
        )
        self.is_driver = not dist.is_initialized() or dist.get_rank() == 0
        self._updater = None
        self._group: dist.ProcessGroup | None = None
        self.version: str | None = None
        if not self.is_driver:
            return
        if engine is None:
            raise ValueError("WeightSync: global rank 0 needs the rollout engine")
        if isinstance(engine, SGLangEngine):
            from megatron_sapo.rollout.sglang_updates import SGLangWeightUpdater

            self._updater = SGLangWeightUpdater(engine)
        elif config.transport == "distributed":
            raise ValueError(f"transport 'distributed' needs SGLang servers, not {type(engine).__name__}")

    def _buckets(self) -> Iterator[list[tuple[str, torch.Tensor]]]:
        return export_hf_weights(
            self.model, self.hf_config, bucket_bytes=self.config.bucket_bytes, groups=self.groups
        )

    def sync(self, version: str) -> dict[str, float]:
        """Export and load the current weights; returns sync/seconds, sync/bytes, sync/gb_per_s (rank 0)."""
        start = time.perf_counter()
        buckets = self._buckets()
        if not self.is_driver:
            for _ in buckets:
                pass
            return {}
        for_engine = _counting(buckets)
        transport = self.config.transport
        if transport == "disk":
            self._sync_disk(for_engine, version)
        elif self._updater is None:  # in-process engine
            self.engine.update_weights_from_tensors(chain.from_iterable(for_engine), version=version)
        else:
            self._sync_sglang(for_engine, version)
        nbytes = for_engine.nbytes
        self.version = version
        seconds = time.perf_counter() - start
        log.info("weight sync v%s (%s): %.1f MiB in %.2f s", version, transport, nbytes / 2**20, seconds)
        return {"sync/seconds": seconds, "sync/bytes": float(nbytes), "sync/gb_per_s": nbytes / 1e9 / seconds}

    def _sync_sglang(self, buckets: Iterator[list], version: str) -> None:
        up = self._updater
        if self.config.transport == "distributed" and self._group is None:
            self._group = up.init_group(
                self.config.master_address,
                self.config.master_port or free_port(),
                backend=self._backend(),
            )
        up.begin()
        try:
            # each bucket goes as soon as it is exported and is dropped before the next is gathered
            # (no look-ahead for "the last one": one bucket alive at a time); the version and the
            # cache flush follow the last bucket
            for bucket in buckets:
                if self.config.transport == "tensor":
                    up.load_tensors(bucket)
                else:
                    up.broadcast(bucket, self._group)
                del bucket
        finally:
            up.end()
        up.finish(version)

    def _sync_disk(self, buckets: Iterator[list], version: str) -> None:
        source = getattr(self.engine, "model_path", None)  # config + tokenizer of the served model
        target = write_hf_snapshot(
            chain.from_iterable(buckets), Path(self.config.disk_dir) / "current", assets_from=source
        )
        if source is None:
            self.hf_config.save_pretrained(target)
        if self._updater is None:
            self.engine.update_weights_from_disk(str(target), version=version)
        else:
            self._updater.load_disk(target, version=version)

    def _backend(self) -> str:
        if self.config.backend != "auto":
            return self.config.backend
        return "nccl" if next(self.model_params()).is_cuda else "gloo"

    def model_params(self) -> Iterator[torch.Tensor]:
        chunks = self.model if isinstance(self.model, list) else [self.model]
        return (p for c in chunks for p in c.parameters())

    def resync_on_restart(self) -> None:
        """Rank 0: make sure a restarted server never serves stale weights.

        Single process: a restart hook pushes the last synced weights before the interrupted request is
        retried. Several trainer ranks: the export is collective, so a hook on rank 0 alone cannot run it;
        the engine raises `EngineRestarted` instead of retrying, and the caller runs `sync` on every rank
        and redoes the interrupted work (trainer `_with_resync`).
        """
        if not isinstance(self.engine, SGLangEngine) or self.config.transport == "disk":
            return  # a restarted server loads the latest disk snapshot itself
        collective = dist.is_initialized() and dist.get_world_size() > 1

        def hook(endpoint: Any) -> None:
            self._group = None  # the restarted server left the old group
            if not collective and self.version is not None:
                self.sync(self.version)

        self.engine.on_restart.append(hook)
        if collective:
            self.engine.retry_after_restart = False


class _counting:
    """Iterate buckets while summing their bytes."""

    def __init__(self, buckets: Iterator[list]) -> None:
        self._it, self.nbytes = buckets, 0

    def __iter__(self) -> Iterator[list]:
        for bucket in self._it:
            self.nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            yield bucket
            del bucket  # not held while the export gathers the next one
