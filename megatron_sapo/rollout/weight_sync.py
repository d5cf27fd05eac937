"""Push a Megatron policy's weights into the rollout engine after an update: tensor / distributed / disk.

    sync = WeightSync(engine, model_chunks, hf_config, WeightSyncConfig(transport="tensor"))
    metrics = sync.sync(version="12")      # every trainer rank calls it (the export is collective)

SGLang engines: every pipeline stage sends its own tensors, all stages at once. One rank per stage (its
lowest global rank; for "tensor", its lowest rank on the engines' node) is the stage's sender; the bridge's
export (`bridge.export_hf_weights(own_stage=True)`: full tensors under Hugging Face names, experts gathered
over EP inside the stage, buckets bounded by `bucket_bytes`) runs its collectives inside the stage only,
so nothing crosses between stages and global rank 0 carries 1/PP of the model:
- "tensor": colocated engines map each bucket (CPU shared memory here; CUDA IPC handles on GPU);
- "distributed": each stage's sender and every server's TP ranks form the stage's process group (gloo
  on CPU, NCCL on GPU), each bucket is one broadcast on it; rank 0 asks every server to receive the
  stages' buckets in one interleaved order (a server serves one update at a time: a common order keeps
  two stages from waiting on each other);
- "disk": each sender writes its stage's shard files into one snapshot; rank 0 writes the one index
  (+ config and tokenizer), renames it into place and the engines reload it once.
The engines see one update: rank 0 opens it (begin_weight_update), every rank waits for that, the
stages send, every rank agrees they all succeeded, and rank 0 closes it (end_weight_update, the one
version, one prefix-cache flush). A server that dies during a sync fails it on every rank together:
rank 0 restarts the servers it launched, every sender makes a fresh update group, and the whole sync is
redone (at most `SYNC_ATTEMPTS` times). The in-process engine lives on rank 0 alone: there every
stage's tensors go to rank 0 (`dst_ranks=(0,)`).

A server restarted outside a sync gets the current weights again before its in-flight rollout is retried
(single-process trainers); with several trainer ranks the interrupted call raises `EngineRestarted` and
the trainer re-syncs on every rank and redoes it (`resync_on_restart`, trainer `_with_resync`).
Tests: tests/e2e/test_weight_sync.py, tests/distributed/test_bridge.py (each stage's share).
"""

from __future__ import annotations

import logging
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_sapo.bridge import export_hf_weights
from megatron_sapo.bridge.snapshot import finish_stage_snapshot, write_hf_snapshot, write_stage_shards
from megatron_sapo.rollout.sglang_updates import new_external_group
from megatron_sapo.rollout.types import RolloutEngine, RolloutError
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
    """"distributed": address the engines connect to for the senders on trainer rank 0's node; senders
    on other nodes (pipeline stages there) give their node's host name."""
    master_port: int = 0
    """"distributed": first port of the stages' update-group stores (stage s: port + s); 0 picks free
    ones."""
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


SYNC_ATTEMPTS = 3
"""Tries of one sync when servers die during it (each failure restarts them and redoes the sync)."""
JOIN_TIMEOUT = timedelta(minutes=5)
"""How long a stage's sender waits for the servers to join its update group (and for each broadcast)."""


@dataclass(frozen=True)
class _EngineAccess:
    """What a sender on another rank needs to reach rank 0's SGLang servers (sent once, over the job's
    own process group: the keys never reach a log, a file or a command line)."""

    urls: tuple[str, ...]
    keys: tuple[Any, ...]
    model_path: str
    host: str


class WeightSync:
    """Trainer side of weight sync; construct on every trainer rank with the same arguments (collective)."""

    def __init__(
        self,
        engine: RolloutEngine | None,
        model: Any,
        hf_config: Any,
        config: WeightSyncConfig,
        *,
        groups: Any = None,
    ) -> None:
        self.engine, self.model, self.hf_config, self.config = engine, model, hf_config, config
        self.groups = groups
        self.multi = dist.is_initialized() and dist.get_world_size() > 1
        self.rank = dist.get_rank() if self.multi else 0
        self.is_driver = self.rank == 0
        self.version: str | None = None
        self.stage_bytes: list[int] = []
        """Bytes each pipeline stage sent in the last sync (every rank)."""
        self.attempts = 0
        self.export_seconds = 0.0
        self._updater: Any = None
        self._group: dist.ProcessGroup | None = None  # "distributed": this stage's update group
        self._names: list[str] = []  # "distributed": each stage's group name (rank 0 chooses)
        self._plans: dict[int, list] | None = None  # "distributed", rank 0: each stage's buckets
        self._my_plan: list[list[str]] = []  # "distributed", a sender: its buckets' names
        self._planned = False
        self._epoch = 0  # bumped by rank 0 when a server restarted: senders remake their groups
        self._group_epoch = -1
        self._syncing = False
        if self.is_driver:
            if engine is None:
                raise ValueError("WeightSync: global rank 0 needs the rollout engine")
            if config.transport == "distributed" and not hasattr(engine, "endpoints"):
                raise ValueError(f"transport 'distributed' needs SGLang servers, not {type(engine).__name__}")
        access = self._share_access()
        self.parallel = access is not None  # SGLang: every stage sends; in-process: through rank 0
        self.stage, self.num_stages, self.sender_stage = 0, 1, None
        if self.parallel:
            self._plan_senders(access)
            if self.sender_stage is not None:
                self._connect(access)
        else:
            self.sender_stage = 0 if self.is_driver else None

    # ---- set-up ---------------------------------------------------------------------------------
    def _share_access(self) -> _EngineAccess | None:
        access = None
        if self.is_driver and hasattr(self.engine, "endpoints"):
            access = _EngineAccess(
                tuple(e.url for e in self.engine.endpoints),
                tuple(e.key for e in self.engine.endpoints),
                self.engine.model_path,
                socket.gethostname(),
            )
        if self.multi:
            box = [access]
            dist.broadcast_object_list(box, src=0)
            access = box[0]
        return access

    def _plan_senders(self, access: _EngineAccess) -> None:
        from megatron_sapo.bridge.layout import ParallelGroups, group_rank, group_size

        groups = self.groups or ParallelGroups.from_parallel_state()
        self.stage, self.num_stages = group_rank(groups.pp), group_size(groups.pp)
        places = [(self.stage, socket.gethostname())]
        if self.multi:
            places = [None] * dist.get_world_size()
            dist.all_gather_object(places, (self.stage, socket.gethostname()))
        self.senders: list[int] = []
        for stage in range(self.num_stages):
            ranks = [r for r, (s, _) in enumerate(places) if s == stage]
            if self.config.transport == "tensor":  # shared memory / CUDA IPC: the engines' node only
                ranks = [r for r in ranks if places[r][1] == access.host]
                if not ranks:
                    raise ValueError(
                        f"rollout.weight_sync.transport 'tensor': pipeline stage {stage} has no rank on the "
                        f"engines' node {access.host}; use 'distributed' or 'disk'"
                    )
            self.senders.append(min(ranks))
        self.same_host = places[self.rank][1] == access.host
        if self.rank in self.senders:
            self.sender_stage = self.stage

    def _connect(self, access: _EngineAccess) -> None:
        from megatron_sapo.rollout.sglang_updates import SGLangWeightUpdater

        engine = self.engine
        if not self.is_driver:
            from megatron_sapo.rollout.client import Endpoint, SGLangEngine

            endpoints = [Endpoint(u, k) for u, k in zip(access.urls, access.keys, strict=True)]
            engine = SGLangEngine(endpoints, model_path=access.model_path)
        self._updater = SGLangWeightUpdater(engine, group_name=f"megatron_sapo_weights-pp{self.stage}")

    # ---- the sync -------------------------------------------------------------------------------
    def sync(self, version: str) -> dict[str, float]:
        """Export and load the current weights (every rank). Rank 0 returns sync/seconds, sync/bytes (all
        stages), sync/bytes_rank0, sync/stages, sync/attempts, sync/gb_per_s; the others {}."""
        start = time.perf_counter()
        self._syncing = True
        try:
            if self.parallel:
                self._sync_parallel(version)
            else:
                self._sync_via_rank0(version)
        finally:
            self._syncing = False
        self.version = version
        if not self.is_driver:
            return {}
        seconds = time.perf_counter() - start
        nbytes = sum(self.stage_bytes)
        log.info(
            "weight sync v%s (%s, %d stage(s)): %.1f MiB in %.2f s",
            version,
            self.config.transport,
            len(self.stage_bytes),
            nbytes / 2**20,
            seconds,
        )
        return {
            "sync/seconds": seconds,
            "sync/bytes": float(nbytes),
            "sync/bytes_rank0": float(self.stage_bytes[0] if self.parallel else nbytes),
            "sync/stages": float(len(self.stage_bytes)),
            "sync/attempts": float(self.attempts),
            "sync/gb_per_s": nbytes / 1e9 / seconds,
            # rank 0's time inside the bridge's export generator (its stage's gathers and packing); the
            # rest of sync/seconds is the transport, the engines' loading and the agreements
            "sync/export_s": self.export_seconds,
        }

    def _sync_via_rank0(self, version: str) -> None:
        """In-process engine (rank 0 only): every stage's tensors travel to rank 0."""
        buckets = export_hf_weights(
            self.model, self.hf_config, bucket_bytes=self.config.bucket_bytes, groups=self.groups
        )
        self.attempts = 1
        if not self.is_driver:
            for _ in buckets:
                pass
            return
        counted = _counting(buckets)
        if self.config.transport == "disk":
            target = write_hf_snapshot(
                chain.from_iterable(counted), Path(self.config.disk_dir) / "current", assets_from=None
            )
            self.hf_config.save_pretrained(target)
            self.engine.update_weights_from_disk(str(target), version=version)
        else:
            self.engine.update_weights_from_tensors(chain.from_iterable(counted), version=version)
        self.stage_bytes = [counted.nbytes]
        self.export_seconds = counted.seconds

    def _sync_parallel(self, version: str) -> None:
        for attempt in range(1, SYNC_ATTEMPTS + 1):
            self.attempts = attempt
            error = self._sync_once(version)
            if error is None:
                return
            if attempt == SYNC_ATTEMPTS:
                raise RolloutError(f"weight sync v{version} failed {attempt} times; last: {error}")
            log.warning("weight sync v%s failed (%s): restarting dead servers, redoing it", version, error)
            self._drop_group()  # its servers may have died: every stage makes a fresh one
            if self.is_driver:
                self._reset_servers()

    def _sync_once(self, version: str) -> str | None:
        """One try on every rank; returns the first error any rank met (the same on every rank)."""
        error = None
        if self.is_driver:
            error = _attempt(self._open, version)
        go = self._agree(error, extra=[self._epoch])
        if go.error is not None:
            return go.error
        if self.config.transport == "distributed" and self._group_epoch != go.epoch:
            made = self._agree(_attempt(self._make_groups))  # first sync, or a server restarted since
            if made.error is not None:
                self._drop_group()
                return made.error
            self._group_epoch = go.epoch
        sent, error = self._send_stage()
        done = self._agree(error, stage_bytes=sent)
        self.stage_bytes = done.stage_bytes
        if done.error is None and self.is_driver:
            error = _attempt(self._close, version)
            if error is not None:
                self._epoch += 1
        else:
            error = done.error
        return self._agree(error).error

    def _open(self, version: str) -> None:
        if self.config.transport == "disk":
            staging = self._staging()
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        else:
            self._updater.begin()

    def _close(self, version: str) -> None:
        if self.config.transport == "disk":
            target = Path(self.config.disk_dir) / "current"
            finish_stage_snapshot(self._staging(), target, assets_from=self.engine.model_path)
            self._updater.load_disk(target, version=version)
        else:
            self._updater.end()
            self._updater.finish(version)

    def _staging(self) -> Path:
        return Path(self.config.disk_dir) / "current.tmp"

    def _send_stage(self) -> tuple[int, str | None]:
        """Run this rank's part of the export; a sender sends its stage. After an error the export is still
        drained (it runs collectives with the stage's other ranks) but nothing more is sent."""
        buckets = export_hf_weights(
            self.model,
            self.hf_config,
            bucket_bytes=self.config.bucket_bytes,
            groups=self.groups,
            own_stage=True,
        )
        transport = self.config.transport
        posters = self._post_receives() if transport == "distributed" and self.is_driver else None
        error = None
        counted = _counting(buckets)
        if self.sender_stage is None:
            pass
        elif transport == "disk":
            error = _attempt(write_stage_shards, counted, self._staging(), self.stage)
        else:
            for i, bucket in enumerate(counted):
                if error is None:
                    if transport == "tensor":
                        error = _attempt(self._updater.load_tensors, bucket)
                    else:
                        error = _attempt(self._broadcast, bucket, i)
                del bucket
        for _ in counted:  # what a non-sender runs, or an error left: the stage's collectives
            pass
        if error is not None:
            self._drop_group()  # its servers stop waiting for this stage's next bucket
        if posters is not None:
            error = error or posters.join()
        self.export_seconds = counted.seconds
        return counted.nbytes if self.sender_stage is not None else 0, error

    # ---- "distributed": one group per stage, rank 0 tells the servers what to receive, in order -----
    def _make_groups(self) -> None:
        """Collective: each stage's sender forms an update group with every server's TP ranks.

        Rank 0 asks each server to join the stages' groups in stage order (one server thread each) while
        every sender joins its own: a server serves one request at a time, so all of them taking the
        groups (and later the buckets) in the same order is what keeps two stages from waiting on each
        other. Also gathers each stage's bucket plan on rank 0 (once) and checks it against the served
        checkpoint before anything is sent.
        """
        from megatron_sapo.bridge.export import own_stage_plan

        self._drop_group()
        sender = self.sender_stage is not None
        if not self._planned:  # every rank: the gather below is collective
            self._planned = True
            plan = None
            if sender:
                plan = own_stage_plan(
                    self.model, self.hf_config, bucket_bytes=self.config.bucket_bytes, groups=self.groups
                )
                self._my_plan = [[name for name, _, _ in bucket] for bucket in plan]
            plans = self._gather((self.sender_stage, plan) if sender else None)
            if self.is_driver:
                self._plans = {stage: p for stage, p in filter(None, plans)}
                self._updater.manifest.check_metas([m for p in self._plans.values() for b in p for m in b])
        where = None
        if sender:
            address = self.config.master_address if self.same_host else socket.gethostname()
            port = self.config.master_port + self.stage if self.config.master_port else free_port()
            where = (self.stage, address, port)
        places = {stage: (address, port) for stage, address, port in filter(None, self._gather(where))}
        names = [None]
        if self.is_driver:
            tag = uuid.uuid4().hex[:8]
            names = [[f"megatron_sapo_weights-pp{s}-{tag}" for s in range(self.num_stages)]]
        if self.multi:
            dist.broadcast_object_list(names, src=0)
        self._names = names[0]
        backend = self._backend()
        joins = None
        if self.is_driver:

            def join_all(endpoint: Any) -> None:
                for stage in range(self.num_stages):
                    address, port = places[stage]
                    self._updater.request_join(
                        endpoint, address=address, port=port, group_name=self._names[stage], backend=backend
                    )

            joins = _Threads(join_all, self._updater.endpoints)
        error = None
        if sender:
            address, port = places[self.stage]
            try:
                self._group = new_external_group(
                    address,
                    port,
                    world_size=1 + sum(self._updater.tp_sizes),
                    backend=backend,
                    group_name=self._names[self.stage],
                    timeout=JOIN_TIMEOUT,
                )
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
        if joins is not None:
            error = error or joins.join()
        if error:
            raise RolloutError(f"weight-update group: {error}")

    def _post_receives(self) -> _Threads:
        """Rank 0: ask each server (one thread each) to receive every stage's buckets, interleaved
        (stage 0's first, stage 1's first, ..., stage 0's second, ...) so that all stages export at once.
        A failed request does not stop the rest: each later one fails fast or succeeds, and every
        sender's broadcasts are met (none is left waiting)."""
        plans, names = self._plans, self._names
        order = [
            (stage, i)
            for i in range(max(len(p) for p in plans.values()))
            for stage in sorted(plans)
            if i < len(plans[stage])
        ]

        def receive_all(endpoint: Any) -> None:
            first = None
            for stage, i in order:
                try:
                    self._updater.request_receive(endpoint, plans[stage][i], names[stage])
                except Exception as exc:
                    first = first or exc
            if first is not None:
                raise first

        return _Threads(receive_all, self._updater.endpoints)

    def _broadcast(self, bucket: list, index: int) -> None:
        from megatron_sapo.rollout.sglang_updates import flatten_bucket

        names = [name for name, _ in bucket]
        if names != self._my_plan[index]:
            raise RolloutError(f"stage {self.stage} bucket {index}: exported {names[:3]}... not the plan")
        flat, _ = flatten_bucket(bucket)
        dist.broadcast(flat, src=0, group=self._group)

    def _gather(self, item: Any) -> list[Any]:
        if not self.multi:
            return [item]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, item)
        return out

    def _drop_group(self) -> None:
        if self._group is not None:
            try:
                dist.destroy_process_group(self._group)
            except Exception as exc:  # a group broken by a dead peer may not shut down cleanly
                log.debug("destroying the weight-update group: %s", exc)
            self._group = None
        self._group_epoch = -1

    def _agree(
        self, error: str | None, *, extra: list[int] | None = None, stage_bytes: int = 0
    ) -> _Agreement:
        """Every rank learns whether any rank failed (and rank 0's `extra`, each stage's bytes)."""
        extra = extra or []
        n = self.num_stages
        values = [1.0 if error else 0.0, *([0.0] * n), *(float(v) for v in extra)]
        if self.sender_stage is not None:
            values[1 + self.sender_stage] = float(stage_bytes)
        errors = [error]
        if self.multi:
            device = next(self.model_params()).device
            if device.type == "cuda" and dist.get_backend() != "nccl":
                device = torch.device("cpu")
            flags = torch.tensor(values, dtype=torch.float64, device=device)
            if not self.is_driver:
                flags[1 + n :] = 0.0
            dist.all_reduce(flags)
            values = flags.tolist()
            if values[0]:
                errors = [None] * dist.get_world_size()
                dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        return _Agreement(first, int(values[1 + n]) if extra else 0, [int(v) for v in values[1 : 1 + n]])

    def _reset_servers(self) -> None:
        """Rank 0 after a failed try: restart the launched servers that died; close the update session
        the live ones may still have open (SGLang refuses a second begin_weight_update)."""
        self._epoch += 1
        for endpoint in self.engine.endpoints:
            if endpoint.server is not None and not endpoint.server.healthy(timeout=5.0):
                self.engine.recover(endpoint)
            elif self.config.transport != "disk":
                try:
                    self.engine.request(endpoint, "POST", "/end_weight_update", {}, retry=False)
                except RolloutError as exc:
                    log.debug("end_weight_update on %s: %s", endpoint.url, exc)

    def _backend(self) -> str:
        if self.config.backend != "auto":
            return self.config.backend
        return "nccl" if next(self.model_params()).is_cuda else "gloo"

    def model_params(self) -> Iterator[torch.Tensor]:
        chunks = self.model if isinstance(self.model, list) else [self.model]
        return (p for c in chunks for p in c.parameters())

    def resync_on_restart(self, *, retry: bool = True) -> None:
        """Rank 0: make sure a restarted server never serves stale weights.

        Single process: a restart hook pushes the last synced weights before the interrupted request is
        retried. Several trainer ranks: the export is collective, so a hook on rank 0 alone cannot run it;
        the engine raises `EngineRestarted` instead of retrying, and the caller runs `sync` on every rank
        and redoes the interrupted work (trainer `_with_resync`). Either way every sender makes a fresh
        update group at the next sync (the restarted server left the old ones).
        `retry=False` raises `EngineRestarted` in a single process too: with asynchronous rollouts the hook
        would run on the rollout thread while the trainer changes the weights it exports.
        """
        if not self.is_driver or not hasattr(self.engine, "on_restart"):
            return

        def hook(endpoint: Any) -> None:
            self._epoch += 1
            if retry and not self.multi and not self._syncing and self.version is not None:
                self.sync(self.version)

        self.engine.on_restart.append(hook)
        if self.multi or not retry:
            self.engine.retry_after_restart = False


@dataclass
class _Agreement:
    error: str | None
    epoch: int
    stage_bytes: list[int]


class _Threads:
    """`fn(item)` for each item in its own thread; `join` returns the first failure's description."""

    def __init__(self, fn: Any, items: Any) -> None:
        self.errors: list[str] = []

        def run(item: Any) -> None:
            error = _attempt(fn, item)
            if error is not None:
                self.errors.append(error)

        self.threads = [threading.Thread(target=run, args=(item,), daemon=True) for item in items]
        for t in self.threads:
            t.start()

    def join(self) -> str | None:
        for t in self.threads:
            t.join()
        return self.errors[0] if self.errors else None


def _attempt(call: Any, *args: Any) -> str | None:
    """Run `call`; a failure becomes its one-line description (shared with every rank)."""
    try:
        call(*args)
    except Exception as exc:  # every failure of a server or its transport; the sync decides what next
        log.debug("weight sync step failed", exc_info=True)
        return f"{type(exc).__name__}: {exc}"
    return None


class _counting:
    """Iterate buckets while summing their bytes and the seconds spent producing them (the export's share
    of the sync: gathers, name mapping, bucket packing; the rest is the transport and the engines)."""

    def __init__(self, buckets: Iterator[list]) -> None:
        self._it, self.nbytes, self.seconds = iter(buckets), 0, 0.0

    def __iter__(self) -> Iterator[list]:
        while True:
            start = time.perf_counter()
            bucket = next(self._it, None)
            self.seconds += time.perf_counter() - start
            if bucket is None:
                return
            self.nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            yield bucket
            del bucket  # not held while the export gathers the next one
