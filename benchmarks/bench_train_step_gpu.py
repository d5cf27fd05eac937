"""Benchmark: tokens/s, TFLOP/s per GPU, MFU and peak memory of one SAPO update on GPU.

`--model moe` (what benchmarks/gpu_check.sh runs): Qwen3-30B-A3B-shaped MoE layers (hidden 2048, 32 query
/ 4 KV heads of 128, 128 experts top-8 of SwiGLU 768, vocab 151,936 untied; `--layers` of its 48, default
4, which fit one 80 GB GPU with Adam state). `--model dense` (default): a ~1B Qwen3-shaped dense model
(hidden 2048, 16 layers, SwiGLU 6144, 16 / 8 heads of 128, vocab 151,936 tied). Random megatron init,
bf16, built by `megatron_sapo.megatron.models` on the `--spec` layer spec (Transformer Engine by default;
MoE experts then run as TE grouped GEMMs), at TP=`--tp` (one GPU per rank, NCCL; TP>1 turns on sequence
parallelism). The rollout batch is `--samples` sequences of exactly `--seq` positions; one untimed
warm-up `train_step`, then `--reps` timed ones (CUDA-synchronised wall time, median reported).

    tokens/s        = samples · seq / step time        (positions through the model, all mini-batches)
    FLOPs per token = 6 · N_active + 6 · L · heads · head_dim · seq
        N_active: matmul parameters one token passes through (attention projections, router, the top-k
        experts' or the dense MLP, LM head; not the embedding lookup); the second term is causal
        attention (QKᵀ and A·V, T/2 keys per query on average), forward + backward (×3)
    TFLOP/s per GPU = FLOPs per token · tokens/s / GPUs;   MFU = TFLOP/s per GPU / `--peak-tflops`

`--peak-tflops` is one GPU's dense bf16 peak (H100/H200 SXM: 989). `--json PATH` also writes the numbers.
Reports numbers, asserts nothing.

    python benchmarks/bench_train_step_gpu.py --model moe --layers 4 --reps 3 --json out.json
    python benchmarks/bench_train_step_gpu.py --layers 4 --seq 1024 --tp 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_sapo.utils.spawn import run_on_ranks

MODELS = {
    "dense": dict(hidden=2048, layers=16, ffn=6144, heads=16, kv_heads=8, head_dim=128, tied=True),
    # Qwen3-30B-A3B (config.json of Qwen/Qwen3-30B-A3B), all 48 layers MoE; only `layers` is cut.
    "moe": dict(
        hidden=2048, layers=4, ffn=6144, heads=32, kv_heads=4, head_dim=128, tied=False,
        experts=128, topk=8, moe_ffn=768,
    ),
}  # fmt: skip


def hf_config(args: dict[str, Any]) -> Any:
    """The transformers config of the benchmarked model (Qwen3Config or Qwen3MoeConfig)."""
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=args["vocab"],
        hidden_size=args["hidden"],
        intermediate_size=args["ffn"],
        num_hidden_layers=args["layers"],
        num_attention_heads=args["heads"],
        num_key_value_heads=args["kv_heads"],
        head_dim=args["head_dim"],
        max_position_embeddings=args["seq"],
        tie_word_embeddings=args["tied"],
    )
    if args["model"] == "dense":
        return Qwen3Config(**common)
    return Qwen3MoeConfig(
        **common,
        num_experts=args["experts"],
        num_experts_per_tok=args["topk"],
        moe_intermediate_size=args["moe_ffn"],
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def flops_per_token(args: dict[str, Any]) -> tuple[float, float]:
    """(FLOPs of one position's forward + backward, N_active) for the model in `args`; see the docstring."""
    h, q, kv = args["hidden"], args["heads"] * args["head_dim"], args["kv_heads"] * args["head_dim"]
    attention = h * q + 2 * h * kv + q * h
    if args["model"] == "moe":
        mlp = h * args["experts"] + args["topk"] * 3 * h * args["moe_ffn"]
    else:
        mlp = 3 * h * args["ffn"]
    n_active = args["layers"] * (attention + mlp) + h * args["vocab"]
    return 6 * n_active + 6 * args["layers"] * q * args["seq"], float(n_active)


def _bench(rank: int, world_size: int, args: dict) -> dict:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.transformer.moe import moe_utils

    from megatron_sapo.megatron.batching import Sample
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.models import build_gpt_model, transformer_config_from_hf

    if not moe_utils.HAVE_TE:
        # megatron-core 0.16.1 binds te_general_gemm only when TE imports, yet the router tests it
        # against None: a NameError on the local spec without TE (megatron/cpu.py does this on CPU).
        moe_utils.te_general_gemm = None
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    config_hf = hf_config(args)
    # TE's grouped GEMM runs all local experts in one kernel; the local spec has only SequentialMLP.
    overrides = {"moe_grouped_gemm": args["spec"] == "te"} if args["model"] == "moe" else {}
    config = transformer_config_from_hf(config_hf, tp=world_size, **overrides)

    def provider(pre_process: bool, post_process: bool, vp_stage: int | None = None) -> torch.nn.Module:
        return build_gpt_model(
            config_hf, pre_process, post_process, vp_stage=vp_stage, spec=args["spec"], config=config
        )

    engine = PolicyEngine(
        provider,
        OptimConfig(lr=1e-6),
        LossConfig(mini_batches=args["mini_batches"], micro_batch_tokens=args["micro_batch_tokens"]),
    )
    # TP-split parameters hold 1/tp of the tensor on each rank; replicated ones (norms) count once.
    params = sum(
        p.numel() * (world_size if getattr(p, "tensor_model_parallel", False) else 1)
        for p in engine.model[0].module.parameters()
    )
    generator = torch.Generator().manual_seed(0)
    samples = [
        Sample(
            torch.randint(0, args["vocab"], (args["seq"] + 1,), generator=generator),
            response_start=args["seq"] // 2,
            advantage=float(torch.randn((), generator=generator)),
        )
        for _ in range(args["samples"])
    ]
    old = engine.compute_logprobs(samples)
    engine.train_step(samples, old)  # warm-up: kernels, allocator, optimizer state
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args["reps"]):
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.train_step(samples, old)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return dict(params=params, times=times, peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="dense", help="layer shapes, see above")
    for name in ("hidden", "layers", "ffn", "heads", "kv-heads", "head-dim", "experts", "topk", "moe-ffn"):
        parser.add_argument(f"--{name}", type=int, help="default: the --model's")
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=2048, help="positions per sequence")
    parser.add_argument("--samples", type=int, default=16, help="sequences per rollout batch")
    parser.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per train_step")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192, help="padded tokens per micro-batch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size = GPUs used")
    parser.add_argument("--spec", choices=("te", "local"), default="te", help="layer spec")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="one GPU's dense bf16 peak")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = vars(parser.parse_args())
    for key, value in MODELS[args["model"]].items():
        if args.get(key) is None:
            args[key] = value
    if not torch.cuda.is_available():
        sys.exit("bench_train_step_gpu.py needs a CUDA device")
    result = run_on_ranks(_bench, world_size=args["tp"], args=(args,), timeout=1800, backend="nccl")[0]
    tokens = args["samples"] * args["seq"]
    step = statistics.median(result["times"])
    tokens_per_s = tokens / step
    per_token, n_active = flops_per_token(args)
    tflops = per_token * tokens_per_s / args["tp"] / 1e12
    out = dict(
        device=torch.cuda.get_device_name(0),
        gpus=args["tp"],
        model=args["model"],
        spec=args["spec"],
        dtype="bf16",
        params=result["params"],
        active_params=n_active,
        step_times_s=result["times"],
        step_s=step,
        tokens_per_s=tokens_per_s,
        tflops_per_gpu=tflops,
        mfu=tflops / args["peak_tflops"],
        peak_memory_gib=result["peak_gib"],
        args={k: v for k, v in args.items() if k != "json"},
    )
    moe = f" experts={args['experts']} top{args['topk']}x{args['moe_ffn']}" if args["model"] == "moe" else ""
    print(
        f"{out['device']} x{args['tp']} (TP={args['tp']}), bf16, {args['spec']} spec, {args['model']}; "
        f"N={result['params'] / 1e9:.3f}B params ({n_active / 1e9:.3f}B active), hidden={args['hidden']} "
        f"layers={args['layers']}{moe} seq={args['seq']} samples={args['samples']} "
        f"mini_batches={args['mini_batches']} micro_batch_tokens={args['micro_batch_tokens']}"
    )
    print("step times (s): " + ", ".join(f"{t:.3f}" for t in result["times"]))
    print(
        f"tokens/s {tokens_per_s:,.0f} (median step {step:.3f} s)   {tflops:.1f} TFLOP/s per GPU   "
        f"MFU {100 * out['mfu']:.1f}% of {args['peak_tflops']:.0f}   peak memory {result['peak_gib']:.1f} GiB "
        "(rank 0)"
    )
    if args["json"]:
        args["json"].write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
