"""Weight-sync throughput into a real SGLang server: seconds per GB per transport, vs `from_disk`.

    python benchmarks/bench_weight_sync.py                       # ~0.7 GB fp32 Qwen3, TP=1 trainer, CPU
    python benchmarks/bench_weight_sync.py --tp 2 --hidden 768   # smaller model, TP=2 trainer
    python benchmarks/bench_weight_sync.py --pp 1 2 4            # pipeline stages sending in parallel
    python benchmarks/bench_weight_sync.py --device cuda --hidden 2048 --json sync.json   # CUDA server

`--device cuda` (the default where CUDA is present): the server runs SGLang's GPU flags in bf16 with
`--mem-fraction` of the GPU (it shares the GPU with the trainer), the trainer ranks are NCCL ranks with
a bf16 megatron model (rank r on GPU r), "tensor" sends CUDA IPC handles. "distributed" joins trainer
and server in one process group: NCCL refuses two ranks on one GPU and the server shares GPU 0 with
trainer rank 0, so it runs over gloo (on CUDA tensors) here and the table says so. `--json PATH` writes
the results as JSON.

`--pp`: the same model at PP1, PP2 and PP4 (1, 2, 4 processes), per transport: bytes each stage sent,
bytes through global rank 0, seconds; against "via rank 0" (what the sync did before every stage sent
its own share: the export sends every stage's tensors to rank 0, which alone pushes them), measured in
the same run on the same server. Every sync carries changed weights, and the guard checks the last one.

A random dense Qwen3 is written as an HF checkpoint, served by one SGLang server (CPU flags on CPU, GPU
flags with `--device cuda`) and loaded into a megatron policy (gloo ranks on CPU, NCCL ranks on GPU).
Each transport syncs `--repeats` times (versions bumped, the engine's weight version checked after
each); the median is reported, with the ratio to `from_disk` measured in the same run. The mismatch guard runs once per
transport so a fast-but-wrong sync cannot pass. Results and commands: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from transformers import AutoConfig, Qwen3Config

from megatron_sapo.rollout.server import ServerConfig, SGLangServer
from megatron_sapo.utils.spawn import run_on_ranks
from megatron_sapo.utils.tiny import save_tiny_model, train_tokenizer

TRANSPORTS = ("disk", "tensor", "distributed")


def _setup(rank: int, url: str, key, model_dir: str, **layout):
    """The policy loaded from `model_dir` at `layout` (tp=, pp=), its HF config, and (rank 0) the engine."""
    from megatron_sapo.bridge.load import load_hf_weights
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu
    from megatron_sapo.rollout.client import Endpoint, SGLangEngine

    init_megatron_cpu(**layout)
    config = AutoConfig.from_pretrained(model_dir)
    policy = PolicyEngine(partial(build_gpt_model, config), OptimConfig(lr=1e-3), LossConfig())
    load_hf_weights(policy.model, config, model_dir)
    engine = SGLangEngine([Endpoint(url, key)], model_path=model_dir) if rank == 0 else None
    return policy, config, engine


def _bench(rank, world, url, key, model_dir, disk_dir, tp, repeats, bucket_mib, sync_backend="auto"):
    from megatron_sapo.rollout.weight_sync import WeightSync, WeightSyncConfig
    from megatron_sapo.train.guard import check_weight_sync

    policy, config, engine = _setup(rank, url, key, model_dir, tp=tp)
    out = {}
    for transport in TRANSPORTS:
        cfg = WeightSyncConfig(
            transport=transport, disk_dir=disk_dir, bucket_bytes=bucket_mib << 20, backend=sync_backend
        )
        sync = WeightSync(engine, policy.model, config, cfg)
        runs = []
        for i in range(repeats):
            torch.distributed.barrier()
            runs.append(sync.sync(version=f"{transport}-{i}"))
        guard = check_weight_sync(engine, policy, [[5, 6, 7], [8, 9]], version=f"{transport}-{repeats - 1}")
        if rank == 0:
            seconds = statistics.median(r["sync/seconds"] for r in runs)
            out[transport] = {
                "seconds": seconds,
                "gb": runs[0]["sync/bytes"] / 1e9,
                "s_per_gb": seconds / (runs[0]["sync/bytes"] / 1e9),
                "logprob_diff_max": guard["sync/logprob_diff_max"],
            }
    return out


def _via_rank0(sync, version: str) -> tuple[float, list[int]]:
    """The sync before parallel export (baseline): every stage's tensors to rank 0, which pushes them."""
    import torch.distributed as dist

    from megatron_sapo.bridge import export_hf_weights

    start = time.perf_counter()
    buckets = export_hf_weights(sync.model, sync.hf_config, bucket_bytes=sync.config.bucket_bytes)
    received = 0
    if dist.get_rank() != 0:
        for _ in buckets:
            pass
    else:
        up = sync._updater
        up.begin()
        for bucket in buckets:
            received += sum(t.numel() * t.element_size() for _, t in bucket)
            if sync.config.transport == "tensor":
                up.load_tensors(bucket)
            else:  # on stage 0's update group (every server is in it)
                up.group_name = sync._names[0]
                up.broadcast(bucket, sync._group)
            del bucket
        up.end()
        up.finish(version)
    dist.barrier()
    return time.perf_counter() - start, [received]


@torch.no_grad()
def _nudge(policy, seed: int) -> None:
    """Change every weight a little (same seed on every rank: replicated parameters stay identical)."""
    g = torch.Generator().manual_seed(seed)
    for chunk in policy.model:
        for p in chunk.parameters():
            p.add_((torch.randn(p.shape, generator=g) * 1e-3).to(p.device, p.dtype))


def _bench_pp(rank, world, url, key, model_dir, disk_dir, repeats, bucket_mib):
    import torch.distributed as dist

    from megatron_sapo.rollout.weight_sync import WeightSync, WeightSyncConfig
    from megatron_sapo.train.guard import check_weight_sync

    policy, config, engine = _setup(rank, url, key, model_dir, pp=world)
    out = {}
    for transport in ("tensor", "distributed", "disk"):
        cfg = WeightSyncConfig(transport=transport, disk_dir=disk_dir, bucket_bytes=bucket_mib << 20)
        sync = WeightSync(engine, policy.model, config, cfg)
        modes = ["parallel"] + (["via rank 0"] if transport != "disk" and world > 1 else [])
        for mode in modes:
            runs = []
            for i in range(repeats + 1):  # the first one makes the update groups: not timed
                _nudge(policy, seed=i)  # every sync carries new weights: the guard below sees a stale engine
                dist.barrier()
                if mode == "parallel":
                    start = time.perf_counter()
                    sync.sync(version=f"{transport}-{i}")
                    dist.barrier()
                    runs.append((time.perf_counter() - start, list(sync.stage_bytes)))
                else:
                    runs.append(_via_rank0(sync, f"{transport}-r0-{i}"))
            version = f"{transport}-{repeats}" if mode == "parallel" else f"{transport}-r0-{repeats}"
            guard = check_weight_sync(engine, policy, [[5, 6, 7], [8, 9]], version=version)
            per_stage = runs[-1][1]
            out[(transport, mode)] = {
                "seconds": statistics.median(t for t, _ in runs[1:]),
                "stage_bytes": per_stage,
                "rank0_bytes": per_stage[0],
                "logprob_diff_max": guard.get("sync/logprob_diff_max"),
            }
    return out


def _pp_sweep(args, server, model_dir, work) -> None:
    print(
        f"{'PP':>2} {'transport':<12} {'mode':<11} {'seconds':>8} {'vs rank 0':>9} {'rank 0 MB':>13}  "
        "MB sent per stage  max|dlogp|"
    )
    for pp in args.pp:
        res = run_on_ranks(
            _bench_pp,
            world_size=pp,
            args=(
                server.url,
                server.key,
                str(model_dir),
                str(work / f"disk{pp}"),
                args.repeats,
                args.bucket_mib,
            ),
            timeout=1800,
        )[0]
        for (transport, mode), r in res.items():
            base = res.get((transport, "via rank 0"), r)["seconds"]
            stages = " ".join(f"{b / 1e6:.0f}" for b in r["stage_bytes"])
            print(
                f"{pp:>2} {transport:<12} {mode:<11} {r['seconds']:8.2f} {base / r['seconds']:8.2f}x "
                f"{r['rank0_bytes'] / 1e6:13.0f}  {stages:<17}  {r['logprob_diff_max']:.1e}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bucket-mib", type=int, default=512)
    p.add_argument(
        "--pp", type=int, nargs="+", help="pipeline sizes to sweep (one process per stage) instead of --tp"
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if present")
    p.add_argument("--mem-fraction", type=float, default=0.3, help="cuda: the server's share of GPU memory")
    p.add_argument("--json", type=Path, help="also write the results (not --pp) here as JSON")
    args = p.parse_args()
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    if device == "cuda" and args.pp:
        raise SystemExit("--pp sweeps the CPU (gloo) trainer; use --tp with --device cuda")
    work = Path(tempfile.mkdtemp(prefix="bench_sync-"))
    config = Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 256),
        head_dim=64,
        intermediate_size=3 * args.hidden,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model_dir = save_tiny_model(work / "hf", config, train_tokenizer(vocab_size=300), seed=0)
    server_config = ServerConfig(model_path=str(model_dir), device=device, log_dir=str(work))
    backend, sync_backend, dtype = "gloo", "auto", "fp32"
    if device == "cuda":
        backend, dtype = "nccl", "bf16"
        # the trainer holds the same GPU; CUDA graphs only speed decoding, not measured here
        server_config.mem_fraction_static = args.mem_fraction
        server_config.extra_args = ["--disable-cuda-graph"]
        sync_backend = "gloo"  # NCCL refuses two ranks on one GPU: the server and trainer rank 0 share GPU 0
    server = SGLangServer(server_config)
    t0 = time.perf_counter()
    server.start()
    start_s = time.perf_counter() - t0
    if args.pp:
        print(
            f"model: dense Qwen3, {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}, fp32, {device}"
        )
        try:
            _pp_sweep(args, server, model_dir, work)
        finally:
            server.stop()
        return
    try:
        res = run_on_ranks(
            _bench,
            world_size=args.tp,
            args=(
                server.url,
                server.key,
                str(model_dir),
                str(work / "disk"),
                args.tp,
                args.repeats,
                args.bucket_mib,
                sync_backend,
            ),
            timeout=1800,
            backend=backend,
        )[0]
    finally:
        server.stop()
    disk = res["disk"]["s_per_gb"]
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else ""
    print(
        f"model {res['disk']['gb']:.2f} GB {dtype}, trainer TP={args.tp}, {device}{f' ({gpu})' if gpu else ''}, "
        f"server start {start_s:.0f} s"
    )
    print(f"{'transport':<12} {'s/GB':>8} {'GB/s':>8} {'vs disk':>8} {'max|dlogp|':>11}")
    for name in TRANSPORTS:
        r = res[name]
        label = f"{name}({sync_backend})" if name == "distributed" and sync_backend != "auto" else name
        print(
            f"{label:<12} {r['s_per_gb']:8.2f} {1 / r['s_per_gb']:8.2f} {disk / r['s_per_gb']:7.2f}x "
            f"{r['logprob_diff_max']:11.2e}"
        )
    print(json.dumps(res))
    if args.json:
        summary = dict(device=device, gpu=gpu, dtype=dtype, tp=args.tp, server_start_s=start_s)
        summary.update(distributed_backend=sync_backend, transports=res)
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
