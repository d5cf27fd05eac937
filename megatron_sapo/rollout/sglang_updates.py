"""The engine side of a weight update on SGLang servers: one method per transport, all validated first.

    up = SGLangWeightUpdater(engine)                     # every server (or endpoints=[...]: some)
    up.begin()                                           # /begin_weight_update on every server
    up.load_tensors(bucket)                               # colocated: shared memory / CUDA IPC handles
    up.request_join(endpoint, address=..., port=..., group_name=g, backend="gloo")  # each server, while
    pg = new_external_group(address, port, world_size=1 + sum(up.tp_sizes), ...)     # the sender joins
    up.request_receive(endpoint, metas, g)                # each server; the sender broadcasts on `pg`
    up.broadcast(bucket, pg)                              # or both at once, from the sender's process
    up.end()
    up.finish("7")                                        # after the last bucket: version + cache flush
    up.load_disk("/ckpt/hf-step7", version="7")           # fallback: the servers read the files

Every bucket is checked against the served checkpoint's names, shapes and dtypes before anything is sent
(SGLang accepts unknown names silently — e.g. transformers-5 fused expert names — and a malformed
payload can kill its scheduler). Qwen3-VL-MoE checkpoints hold fused experts; their per-expert names
pass too (shapes from `bridge/fused_experts.py`), never both forms in one check. A bucket travels as
SGLang's "flattened_bucket": one byte buffer plus (name, dtype, shape, offsets) per tensor, so one
shared-memory segment / one broadcast per bucket.
Any trainer rank may run one (the weight sync gives every pipeline stage's sender its own, with one
group per server); begin/end/finish are rank 0's. Trainer-side orchestration (export, buckets,
versions, retries) is `rollout/weight_sync.py`.
Tests: tests/unit/test_weight_manifest.py, tests/e2e/test_sglang_engine.py, tests/e2e/test_vlm_sglang.py.
"""

from __future__ import annotations

import base64
import io
import itertools
import logging
import threading
from collections.abc import Sequence
from datetime import timedelta
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as torch_mp

from megatron_sapo.bridge.fused_experts import FUSED_SUFFIXES, PARTS, PER_EXPERT, FusedExpertAliases
from megatron_sapo.bridge.safetensors_io import DTYPES, SafetensorsReader
from megatron_sapo.rollout.client import Endpoint, SGLangEngine
from megatron_sapo.rollout.types import RolloutError

log = logging.getLogger(__name__)

Bucket = Sequence[tuple[str, torch.Tensor]]


class WeightManifest:
    """name -> (shape, dtype) of the checkpoint a server loaded, read from safetensors headers only."""

    def __init__(self, entries: dict[str, tuple[tuple[int, ...], torch.dtype | None]], where: str) -> None:
        self.entries, self.where = entries, where

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> WeightManifest:
        try:
            reader = SafetensorsReader(path)
        except FileNotFoundError:
            raise RolloutError(f"no safetensors files in {path}") from None
        headers = {name: reader.header(name) for name in reader.names()}
        entries = {name: (h.shape, DTYPES.get(h.dtype)) for name, h in headers.items()}
        # Fused experts (Qwen3-VL-MoE files): SGLang's loader also takes them expert by expert, the form
        # an expert-parallel export has without gathering a layer's experts. Its loader transposes fused
        # tensors unconditionally, so a file it serves is in the official orientation [E, H, 2I].
        aliases = FusedExpertAliases(reader, transposed=True)
        for name, (shape, dtype) in list(entries.items()):
            if name.endswith(FUSED_SUFFIXES) and len(shape) == 3:
                prefix, fused = name.rsplit(".", 1)
                for e, proj in itertools.product(range(shape[0]), PARTS[fused]):
                    entries[f"{prefix}.{e}.{proj}.weight"] = (
                        aliases.shape(f"{prefix}.{e}.{proj}.weight"),
                        dtype,
                    )
        return cls(entries, str(path))

    def check(self, bucket: Bucket) -> None:
        self.check_metas([(name, tuple(t.shape), t.dtype) for name, t in bucket])

    def check_metas(self, metas: Sequence[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        """`check` from names, shapes and dtypes alone (a plan of buckets not exported yet)."""
        problems = []
        names = [name for name, _, _ in metas]
        if any(n.endswith(FUSED_SUFFIXES) for n in names) and any(PER_EXPERT.match(n) for n in names):
            # SGLang's Qwen3-VL-MoE loader switches to its fused-name table at the first fused name of
            # a request and then drops every per-expert name after it ("not found", no error). Checked
            # per bucket or per plan of buckets: one form per sync is what an export produces anyway.
            problems.append("fused and per-expert expert names together (send one form only)")
        for name, shape, dtype in metas:
            if name not in self.entries:
                problems.append(f"{name}: not a tensor of the served checkpoint")
            elif tuple(shape) != self.entries[name][0]:
                problems.append(f"{name}: shape {tuple(shape)}, server has {self.entries[name][0]}")
            elif not dtype.is_floating_point:
                problems.append(f"{name}: dtype {dtype} is not floating point")
        if problems:
            raise RolloutError(
                f"weight update rejected before sending ({len(problems)} problems vs {self.where}): "
                + "; ".join(problems[:5])
            )


def flat_order(items: Sequence[Any], dtype_of: Any) -> list[Any]:
    """The order of tensors in a flattened bucket: wider dtypes first (stable), so every tensor starts at
    a multiple of its item size (SGLang checks it)."""
    return sorted(items, key=lambda item: -dtype_of(item).itemsize)


def flatten_bucket(bucket: Bucket) -> tuple[torch.Tensor, list[SimpleNamespace]]:
    """One uint8 buffer holding every tensor's bytes back to back, in SGLang's flattened_bucket layout
    (`flat_order`)."""
    ordered = flat_order(bucket, lambda nt: nt[1].dtype)
    total = sum(t.numel() * t.element_size() for _, t in ordered)
    flat = torch.empty(total, dtype=torch.uint8, device=ordered[0][1].device if ordered else "cpu")
    metadata, offset = [], 0
    for name, tensor in ordered:
        size = tensor.numel() * tensor.element_size()
        flat[offset : offset + size].copy_(tensor.detach().contiguous().view(-1).view(torch.uint8))
        metadata.append(
            SimpleNamespace(
                name=name,
                shape=torch.Size(tensor.shape),
                dtype=tensor.dtype,
                start_idx=offset,
                end_idx=offset + size,
                numel=size,
            )
        )
        offset += size
    return flat, metadata


def _serialize(obj: Any) -> str:
    # CPU storages travel as shared-memory files: the default fd-passing strategy needs a live socket
    # between the two processes, which HTTP does not give (the scheduler dies unpickling it).
    torch_mp.set_sharing_strategy("file_system")
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


class SGLangWeightUpdater:
    """Weight-update calls to the servers of an `SGLangEngine` (all, or the `endpoints` given)."""

    def __init__(
        self,
        engine: SGLangEngine,
        *,
        group_name: str = "megatron_sapo_weights",
        endpoints: Sequence[Endpoint] | None = None,
        manifest: WeightManifest | None = None,
    ) -> None:
        """`group_name`: the update group `broadcast` uses. `endpoints`: the servers this updater talks
        to (default: all of the engine's)."""
        self.engine = engine
        self.endpoints = list(engine.endpoints if endpoints is None else endpoints)
        self.group_name = group_name
        self.manifest = manifest or WeightManifest.from_hf_dir(engine.model_path)
        self.tp_sizes = [self._tp_size(e) for e in self.endpoints]

    def _tp_size(self, endpoint: Endpoint) -> int:
        if endpoint.server is not None:
            return endpoint.server.config.tp_size
        return int(self.engine.request(endpoint, "GET", "/server_info").get("tp_size", 1))

    def _post_all(self, path: str, payload: dict | None = None) -> None:
        for endpoint in self.endpoints:
            out = self.engine.request(endpoint, "POST", path, payload or {}, retry=False)
            if isinstance(out, dict) and out.get("success") is False:
                raise RolloutError(f"SGLang {endpoint.url}{path} failed: {out.get('message')}")

    def begin(self) -> None:
        self._post_all("/begin_weight_update")

    def end(self) -> None:
        self._post_all("/end_weight_update")

    def finish(self, version: str) -> None:
        """After the last bucket: every server reports `version` and drops its prefix cache (whose KV
        entries were computed with the old weights)."""
        self._post_all("/update_weight_version", {"new_version": version, "abort_all_requests": False})
        self._post_all("/flush_cache")

    def load_tensors(self, bucket: Bucket) -> None:
        """Colocated transport: the servers map the bucket's memory (CPU shared memory / CUDA IPC)."""
        self.manifest.check(bucket)
        if not bucket:
            return
        flat, metadata = flatten_bucket(bucket)
        payload_one = _serialize({"flattened_tensor": flat, "metadata": metadata})
        for endpoint, tp in zip(self.endpoints, self.tp_sizes, strict=True):
            self.engine.request(
                endpoint,
                "POST",
                "/update_weights_from_tensor",
                {
                    "serialized_named_tensors": [payload_one] * tp,
                    "load_format": "flattened_bucket",
                    "flush_cache": False,  # once, in `finish`
                },
                retry=False,
            )
        del flat  # the servers copied it into their parameters; the shared segment goes with it

    def broadcast(self, bucket: Bucket, group: dist.ProcessGroup) -> None:
        """Distributed transport: names/shapes over HTTP while the bytes go over `group` (one broadcast)."""
        self.manifest.check(bucket)
        if bucket:
            self.broadcast_flat(*flatten_bucket(bucket), group)

    def broadcast_flat(
        self, flat: torch.Tensor, metadata: list[SimpleNamespace], group: dist.ProcessGroup
    ) -> None:
        """`broadcast` of a bucket already checked and flattened (one buffer for several updaters)."""
        payload = {
            "names": [m.name for m in metadata],
            "dtypes": [str(m.dtype).removeprefix("torch.") for m in metadata],
            "shapes": [list(m.shape) for m in metadata],
            "group_name": self.group_name,
            "load_format": "flattened_bucket",
            "flush_cache": False,  # once, in `finish`
        }
        errors: list[Exception] = []

        def post(endpoint: Endpoint) -> None:
            try:
                self.engine.request(
                    endpoint, "POST", "/update_weights_from_distributed", payload, retry=False
                )
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=post, args=(e,), daemon=True) for e in self.endpoints]
        for t in threads:
            t.start()
        dist.broadcast(flat, src=0, group=group)
        for t in threads:
            t.join()
        if errors:
            raise RolloutError(f"update_weights_from_distributed failed: {errors[0]}")

    def request_join(
        self, endpoint: Endpoint, *, address: str, port: int, group_name: str, backend: str
    ) -> None:
        """Ask one server to join `group_name`, whose rank 0 (a sender on any trainer rank) listens at
        `address:port`, with every server of this updater in it (ranks 1.. in endpoint order). Returns
        when the group is formed, so the sender must be joining at the same time."""
        index = self.endpoints.index(endpoint)
        self.engine.request(
            endpoint,
            "POST",
            "/init_weights_update_group",
            {
                "master_address": address,
                "master_port": port,
                "rank_offset": 1 + sum(self.tp_sizes[:index]),
                "world_size": 1 + sum(self.tp_sizes),
                "group_name": group_name,
                "backend": backend,
            },
            retry=False,
        )

    def request_receive(
        self, endpoint: Endpoint, metas: Sequence[tuple[str, tuple[int, ...], torch.dtype]], group_name: str
    ) -> None:
        """Ask one server to receive one flattened bucket (`metas` in export order) broadcast on
        `group_name` by its sender; returns when the server has loaded it."""
        ordered = flat_order(metas, lambda m: m[2])
        out = self.engine.request(
            endpoint,
            "POST",
            "/update_weights_from_distributed",
            {
                "names": [m[0] for m in ordered],
                "dtypes": [str(m[2]).removeprefix("torch.") for m in ordered],
                "shapes": [list(m[1]) for m in ordered],
                "group_name": group_name,
                "load_format": "flattened_bucket",
                "flush_cache": False,  # once, in `finish`
            },
            retry=False,
        )
        if isinstance(out, dict) and out.get("success") is False:
            raise RolloutError(f"SGLang {endpoint.url} update_weights_from_distributed: {out.get('message')}")

    def load_disk(self, model_dir: str | Path, *, version: str) -> None:
        """Disk transport: every server reloads from `model_dir`; a restarted server starts from it too."""
        WeightManifest.from_hf_dir(model_dir)  # readable safetensors before asking the servers
        for endpoint in self.endpoints:
            self.engine.request(
                endpoint,
                "POST",
                "/update_weights_from_disk",
                {"model_path": str(model_dir), "weight_version": version, "flush_cache": True},
                retry=False,
            )
            if endpoint.server is not None:
                endpoint.server.model_path, endpoint.server.weight_version = str(model_dir), version


def new_external_group(
    master_address: str,
    master_port: int,
    *,
    world_size: int,
    backend: str,
    group_name: str,
    rank: int = 0,
    timeout: timedelta = timedelta(minutes=10),
) -> dist.ProcessGroup:
    """A process group outside this process's default world (the trainer's own ranks are not in it).

    torch's public `new_group` only subgroups the default world, so this builds one from a TCP store the
    way torch itself does for the default group; SGLang's servers join the same store from their side.
    """
    from torch.distributed import distributed_c10d as c10d

    store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    # SGLang prefixes its side of the store with the group name (sglang init_custom_process_group).
    store = dist.PrefixStore(group_name, store)
    # The group name prefixes the rendezvous keys, so both sides must use the same one.
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), store, group_name=group_name, timeout=timeout
    )
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group
