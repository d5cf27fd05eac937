"""Benchmark: tokens/s, MFU and peak memory of one SAPO update (`PolicyEngine.train_step`) on GPU.

A ~1B-parameter Qwen3-shaped dense model (default: hidden 2048, 16 layers, SwiGLU 6144, 16 query /
8 KV heads of 128, vocab 151,936 tied; random megatron init) on the Transformer Engine layer spec in
bf16, built by `megatron_sapo.megatron.models`, at TP=`--tp` (one GPU per rank, NCCL; TP>1 turns on
sequence parallelism). The rollout batch is `--samples` sequences of exactly `--seq` positions; one
untimed warm-up step, then `--reps` timed `train_step`s (CUDA-synchronised wall time).

    tokens/s = samples · seq / step time           (positions fed through the model, all mini-batches)
    MFU      = 6 · N · tokens/s / (peak · GPUs)     N = parameters (the tied embedding counted once, as
                                                     the LM head's matmul); attention's T² FLOPs are not
                                                     counted, so MFU understates long sequences.

`--peak-tflops` is one GPU's dense bf16 peak (H100 SXM: 989). Reports numbers, asserts nothing.

    python benchmarks/bench_train_step_gpu.py --reps 3
    python benchmarks/bench_train_step_gpu.py --layers 4 --seq 1024 --tp 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_sapo.utils.spawn import run_on_ranks


def _bench(rank: int, world_size: int, args: dict) -> dict:
    from megatron.core import parallel_state, tensor_parallel
    from transformers import Qwen3Config

    from megatron_sapo.megatron.batching import Sample
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.models import build_gpt_model, transformer_config_from_hf

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world_size)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    hf_config = Qwen3Config(
        vocab_size=args["vocab"],
        hidden_size=args["hidden"],
        intermediate_size=args["ffn"],
        num_hidden_layers=args["layers"],
        num_attention_heads=args["heads"],
        num_key_value_heads=args["kv_heads"],
        head_dim=args["head_dim"],
        max_position_embeddings=args["seq"],
        tie_word_embeddings=True,
    )
    config = transformer_config_from_hf(hf_config, tp=world_size)

    def provider(pre_process: bool, post_process: bool, vp_stage: int | None = None) -> torch.nn.Module:
        return build_gpt_model(
            hf_config, pre_process, post_process, vp_stage=vp_stage, spec="te", config=config
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
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=6144, help="SwiGLU intermediate size")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--seq", type=int, default=2048, help="positions per sequence")
    parser.add_argument("--samples", type=int, default=16, help="sequences per rollout batch")
    parser.add_argument("--mini-batches", type=int, default=2, help="optimizer steps per train_step")
    parser.add_argument("--micro-batch-tokens", type=int, default=8192, help="padded tokens per micro-batch")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size = GPUs used")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="one GPU's dense bf16 peak")
    args = vars(parser.parse_args())
    if not torch.cuda.is_available():
        sys.exit("bench_train_step_gpu.py needs a CUDA device")
    result = run_on_ranks(_bench, world_size=args["tp"], args=(args,), timeout=1800, backend="nccl")[0]
    tokens = args["samples"] * args["seq"]
    step = statistics.median(result["times"])
    tokens_per_s = tokens / step
    mfu = 6 * result["params"] * tokens_per_s / (args["peak_tflops"] * 1e12 * args["tp"])
    print(
        f"{torch.cuda.get_device_name(0)} x{args['tp']} (TP={args['tp']}), bf16, TE spec; "
        f"N={result['params'] / 1e9:.3f}B params, hidden={args['hidden']} layers={args['layers']} "
        f"seq={args['seq']} samples={args['samples']} mini_batches={args['mini_batches']} "
        f"micro_batch_tokens={args['micro_batch_tokens']}"
    )
    print("step times (s): " + ", ".join(f"{t:.3f}" for t in result["times"]))
    print(
        f"tokens/s {tokens_per_s:,.0f} (median step {step:.3f} s)   MFU {100 * mfu:.1f}% "
        f"of {args['peak_tflops']:.0f} TFLOP/s per GPU   peak memory {result['peak_gib']:.1f} GiB (rank 0)"
    )


if __name__ == "__main__":
    main()
