"""Weight sync from a sharded megatron policy into real SGLang servers (and the in-process engine).

For each transport (tensor, distributed, disk), at TP=2 (dense Qwen3) and EP=2 (Qwen3-MoE): change the
policy's weights -> the mismatch guard sees the engine is stale -> sync -> the engine's log-probs equal
the trainer's (`PolicyEngine.compute_logprobs`, an independent forward) and it reports the new version.
Then: a server killed mid-rollout is restarted, re-synced, and the rollout completes.
Run: `python -m pytest tests/e2e/test_weight_sync.py -q` (~3 min on 2 cores).
"""

from __future__ import annotations

import threading
import time
from functools import partial

import pytest
import torch

from megatron_sapo.rollout.server import ServerConfig, SGLangServer
from megatron_sapo.utils.spawn import run_on_ranks

PROBES = [[5, 6, 7], [8, 9, 10, 11], [20, 21], [30, 31, 32, 33, 34]]
TRANSPORTS = ("tensor", "distributed", "disk")


def _policy(model_dir: str, *, tp: int, ep: int, pp: int = 1):
    from transformers import AutoConfig

    from megatron_sapo.bridge.load import load_hf_weights
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu

    init_megatron_cpu(tp=tp, ep=ep, pp=pp)
    config = AutoConfig.from_pretrained(model_dir)
    policy = PolicyEngine(partial(build_gpt_model, config), OptimConfig(lr=1e-3), LossConfig())
    load_hf_weights(policy.model, config, model_dir)
    return policy, config


@torch.no_grad()
def _perturb(policy, seed: int) -> None:
    # same seed on every rank: TP-replicated parameters (norms) must stay identical across ranks
    g = torch.Generator().manual_seed(seed)
    for chunk in policy.model:
        for p in chunk.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _sync_all_transports(rank, world, url, key, model_dir, disk_dir, tp, ep, pp):
    from megatron_sapo.rollout.client import Endpoint, SGLangEngine
    from megatron_sapo.rollout.hf_engine import TransformersEngine
    from megatron_sapo.rollout.weight_sync import WeightSync, WeightSyncConfig
    from megatron_sapo.train.guard import WeightSyncMismatch, check_weight_sync

    policy, config = _policy(model_dir, tp=tp, ep=ep, pp=pp)
    engines = {"sglang": SGLangEngine([Endpoint(url, key)], model_path=model_dir) if rank == 0 else None}
    engines["in-process"] = TransformersEngine(model_dir) if rank == 0 else None
    out = {}
    for name, engine in engines.items():
        for i, transport in enumerate(TRANSPORTS):
            if name == "in-process" and transport == "distributed":
                continue
            _perturb(policy, seed=10 * i + len(name))
            try:
                check_weight_sync(engine, policy, PROBES, threshold=1e-3)
                stale = "not detected"
            except WeightSyncMismatch as exc:
                stale = str(exc)
            cfg = WeightSyncConfig(transport=transport, disk_dir=f"{disk_dir}/{name}", bucket_bytes=32 << 10)
            sync = WeightSync(engine, policy.model, config, cfg)
            metrics = sync.sync(version=f"v-{transport}")
            after = check_weight_sync(engine, policy, PROBES, version=f"v-{transport}", threshold=1e-4)
            out[(name, transport)] = {
                "stale": stale,
                "stage_bytes": sync.stage_bytes,
                "senders": getattr(sync, "senders", [0]),
                **metrics,
                **after,
            }
    return out


def _stage_share(model_dir, pp: int) -> list[int]:
    """Independent reference: bytes of the checkpoint's tensors each pipeline stage holds (even layer
    split; embeddings on the first stage, final norm and output layer on the last)."""
    from megatron_sapo.bridge.safetensors_io import DTYPES, SafetensorsReader

    reader = SafetensorsReader(model_dir)
    layers = 1 + max(int(n.split(".")[2]) for n in reader.names() if n.startswith("model.layers."))
    share = [0] * pp
    for name in reader.names():
        header = reader.header(name)
        nbytes = torch.Size(header.shape).numel() * DTYPES[header.dtype].itemsize
        if name.startswith("model.layers."):
            share[int(name.split(".")[2]) // (layers // pp)] += nbytes
        else:
            share[0 if name.startswith("model.embed_tokens.") else pp - 1] += nbytes
    return share


@pytest.mark.parametrize(
    "name,tp,ep,pp",
    [("dense", 2, 1, 1), ("moe", 1, 2, 1), ("dense", 1, 1, 2)],
    ids=["dense-tp2", "moe-ep2", "dense-pp2"],
)
def test_every_transport_makes_engine_match_trainer(
    name, tp, ep, pp, reset_weights, tiny_models, tmp_path
) -> None:
    engine = reset_weights(name)
    url, key = engine.endpoints[0].url, engine.endpoints[0].key
    results = run_on_ranks(
        _sync_all_transports,
        world_size=2,
        args=(url, key, str(tiny_models[name]), str(tmp_path), tp, ep, pp),
        timeout=900,
    )[0]
    assert len(results) == 5
    share = _stage_share(tiny_models[name], pp)
    for (engine_name, transport), r in results.items():
        key = (engine_name, transport)
        # before the sync the guard must see the stale engine ...
        assert "differ after the weight sync" in r["stale"], (key, r["stale"])
        # ... after it, fp32 engine and trainer agree to float noise (bf16 tolerance would be ~1e-2)
        assert r["sync/logprob_diff_max"] < 1e-4, (key, r)
        assert r["sync/bytes"] == sum(share), (key, r["sync/bytes"], share)
        if engine_name == "sglang":  # every stage sends its own share; rank 0 carries stage 0's only
            assert r["stage_bytes"] == share, (key, r["stage_bytes"], share)
            assert r["sync/bytes_rank0"] == share[0], key
            assert r["senders"] == list(range(pp)), key  # stage s's lowest rank: rank s here
        else:  # the in-process engine lives on rank 0: everything goes through it
            assert r["sync/bytes_rank0"] == sum(share), key


def _restart_mid_rollout(rank, world, model_dir, log_dir):
    from megatron_sapo.rollout.client import SGLangEngine
    from megatron_sapo.rollout.server import ServerConfig, SGLangServer
    from megatron_sapo.rollout.types import SamplingParams
    from megatron_sapo.rollout.weight_sync import WeightSync, WeightSyncConfig
    from megatron_sapo.train.guard import check_weight_sync

    policy, config = _policy(model_dir, tp=1, ep=1)
    server = SGLangServer(ServerConfig(model_path=model_dir, log_dir=log_dir))
    server.start()
    try:
        engine = SGLangEngine([server], request_batch=4, max_concurrency=2)
        _perturb(policy, seed=5)
        sync = WeightSync(engine, policy.model, config, WeightSyncConfig(transport="tensor"))
        sync.sync(version="1")
        sync.resync_on_restart()
        box: dict = {}
        params = SamplingParams(max_new_tokens=64, stop_token_ids=[])

        def rollout() -> None:
            box["gens"] = engine.generate([[5, 6, 7, i] for i in range(32)], params, n=2)

        worker = threading.Thread(target=rollout)
        worker.start()
        time.sleep(1.5)
        in_flight = worker.is_alive()
        server.kill()
        worker.join(600)
        after = check_weight_sync(engine, policy, PROBES, version="1", threshold=1e-4)
        gens = box.get("gens", [])
        return {
            "in_flight": in_flight,
            "restarts": server.restarts,
            "n": len(gens),
            "versions": sorted({g.weight_version for g in gens}),
            "after": after,
        }
    finally:
        server.stop()


def test_killed_server_restarts_resyncs_and_rollout_completes(tiny_models, tmp_path) -> None:
    r = run_on_ranks(
        _restart_mid_rollout, world_size=1, args=(str(tiny_models["dense"]), str(tmp_path)), timeout=900
    )[0]
    assert r["in_flight"], "the server was killed after the rollout had finished: test did not test anything"
    assert r["restarts"] == 1
    assert r["n"] == 64
    # samples that finished before the kill and those retried after the restart all saw the synced weights
    assert r["versions"] == ["1"]
    assert r["after"]["sync/logprob_diff_max"] < 1e-4


def _two_engines(rank, world, urls, keys, model_dir):
    from megatron_sapo.rollout.client import Endpoint, SGLangEngine
    from megatron_sapo.rollout.weight_sync import WeightSync, WeightSyncConfig
    from megatron_sapo.train.guard import check_weight_sync

    # PP 2: both stages send to both servers at once (the case where two stages could wait on each other)
    policy, config = _policy(model_dir, tp=1, ep=1, pp=2)
    # request_batch=1: each probe is its own request, alternating between the two servers
    endpoints = [Endpoint(url, key) for url, key in zip(urls, keys, strict=True)]
    engine = SGLangEngine(endpoints, model_path=model_dir, request_batch=1) if rank == 0 else None
    out = {}
    for i, transport in enumerate(("distributed", "tensor")):
        _perturb(policy, seed=40 + i)
        cfg = WeightSyncConfig(transport=transport, bucket_bytes=16 << 10)  # several buckets per stage
        WeightSync(engine, policy.model, config, cfg).sync(version=transport)
        out[transport] = check_weight_sync(engine, policy, PROBES, version=transport, threshold=1e-4)
    return out


def test_two_servers_behind_one_client(sglang_servers, reset_weights, tiny_models, tmp_path) -> None:
    first = sglang_servers["dense"]
    reset_weights("dense")
    second = SGLangServer(ServerConfig(model_path=str(tiny_models["dense"]), log_dir=str(tmp_path)))
    with second:
        before = [s.log_path.read_text().count("Prefill batch") for s in (first, second)]
        r = run_on_ranks(
            _two_engines,
            world_size=2,
            args=([first.url, second.url], [first.key, second.key], str(tiny_models["dense"])),
            timeout=600,
        )[0]
        served = [s.log_path.read_text().count("Prefill batch") - b for s, b in zip((first, second), before)]
    assert all(m["sync/logprob_diff_max"] < 1e-4 for m in r.values()), r  # both servers got the weights
    assert min(served) >= 2, served  # round-robin: each server answered probes of both checks


def _server_dies_mid_sync(rank, world, model_dir, log_dir, disk_dir):
    """Every transport in turn, on one launched server (each kill restarts it: one server start per
    transport instead of two)."""
    import megatron_sapo.rollout.weight_sync as weight_sync
    from megatron_sapo.rollout.client import SGLangEngine
    from megatron_sapo.rollout.weight_sync import WeightSync, WeightSyncConfig
    from megatron_sapo.train.guard import check_weight_sync

    policy, config = _policy(model_dir, tp=1, ep=1, pp=2)
    server = engine = None
    if rank == 0:  # a server this rank launched: the sync may restart it
        server = SGLangServer(ServerConfig(model_path=model_dir, log_dir=log_dir))
        server.start()
        engine = SGLangEngine([server])
    export, out = weight_sync.export_hf_weights, {}
    try:
        for i, transport in enumerate(TRANSPORTS):
            if engine is not None:
                engine.on_restart.clear()  # the previous transport's hook
            cfg = WeightSyncConfig(transport=transport, disk_dir=disk_dir, bucket_bytes=16 << 10)
            sync = WeightSync(engine, policy.model, config, cfg)
            sync.resync_on_restart()
            _perturb(policy, seed=7 + i)
            restarts = server.restarts if server else 0
            if rank == 0:  # kill the server once stage 0's first bucket is out (stage 1 sends at once)
                killed = []

                def killing_export(*args, killed=killed, **kwargs):
                    for j, bucket in enumerate(export(*args, **kwargs)):
                        yield bucket
                        if j == 0 and not killed:
                            killed.append(server.kill())

                weight_sync.export_hf_weights = killing_export
            metrics = sync.sync(version=str(i + 1))
            weight_sync.export_hf_weights = export
            after = check_weight_sync(engine, policy, PROBES, version=str(i + 1), threshold=1e-4)
            out[transport] = {
                "attempts": sync.attempts,
                "restarts": server.restarts - restarts if server else None,
                **metrics,
                **after,
            }
        return out
    finally:
        weight_sync.export_hf_weights = export
        if server is not None:
            server.stop()


def test_server_killed_during_sync_is_restarted_and_sync_redone_on_every_rank(tiny_models, tmp_path) -> None:
    """PP2, for each transport: both stages send at once; the server dies after stage 0's first bucket.
    Every rank sees the failure, rank 0 restarts the server, both stages send again (fresh groups), and
    the served weights are the trainer's (each transport's policy is perturbed anew)."""
    results = run_on_ranks(
        _server_dies_mid_sync,
        world_size=2,
        args=(str(tiny_models["dense"]), str(tmp_path), str(tmp_path / "disk")),
        timeout=900,
    )[0]
    assert list(results) == list(TRANSPORTS)
    for transport, r in results.items():
        assert r["restarts"] == 1 and r["attempts"] == 2, (transport, r)
        assert r["sync/logprob_diff_max"] < 1e-4, (transport, r)
