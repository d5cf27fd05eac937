"""Benchmark: tokens/s of one SAPO update (`PolicyEngine.train_step`) on CPU at several parallel layouts.

A tiny dense GPT and a tiny 4-expert top-2 MoE, each run at TP1 (1 process), TP2 and PP2 (2 processes,
gloo); MoE with TP>1 needs sequence parallelism (no CPU path), so the MoE runs EP2 instead of TP2. Each
layout runs in fresh processes: one untimed warm-up `train_step`, then `--reps` timed ones on the same
rollout batch (`--samples` sequences of 48–128 tokens, `--mini-batches` optimizer steps, a micro-batch
token budget). Reported: tokens/s as measured by the engine (all tokens of the batch over the step's
wall time, median over reps). No target: for regression tracking. On 2 cores, 2-process layouts share
the cores, so they are expected to be slower than TP1 here.

    python benchmarks/bench_train_step.py --reps 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_sapo.utils.spawn import run_on_ranks

VOCAB, SEQ_MAX = 512, 128
LAYOUTS = [  # (model, name, world size, parallel sizes)
    ("dense", "TP1", 1, dict()),
    ("dense", "TP2", 2, dict(tp=2)),
    ("dense", "PP2", 2, dict(pp=2)),
    ("moe", "TP1", 1, dict()),
    ("moe", "EP2", 2, dict(ep=2)),
    ("moe", "PP2", 2, dict(pp=2)),
]


def bench_parser(doc: str) -> argparse.ArgumentParser:
    """The options of the CPU policy-update benchmarks (this file and bench_scaling.py)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--mini-batches", type=int, default=2)
    parser.add_argument("--budget", type=int, default=1024, help="micro-batch token budget")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="split over ranks")
    return parser


def random_samples(count: int, *, first_token: int = 0) -> list:
    """`count` seeded `Sample`s of 48–SEQ_MAX tokens drawn from [first_token, VOCAB), response from 16."""
    from megatron_sapo.megatron.batching import Sample

    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(count):
        length = int(torch.randint(48, SEQ_MAX + 1, (1,), generator=generator))
        tokens = torch.randint(first_token, VOCAB, (length,), generator=generator)
        samples.append(
            Sample(tokens, response_start=16, advantage=float(torch.randn((), generator=generator)))
        )
    return samples


def tiny_engine(args: dict, world_size: int, model: str = "dense", parallel: dict | None = None):
    """This rank's `PolicyEngine` of the 4-layer tiny GPT ("dense" or "moe": 4 experts top-2) under
    `parallel` sizes, torch threads split over the `world_size` processes (inside `run_on_ranks`)."""
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.testing import build_tiny_gpt, init_megatron_cpu, tiny_gpt_config

    torch.set_num_threads(max(1, args["threads"] // world_size))
    init_megatron_cpu(**(parallel or {}))
    config = tiny_gpt_config(
        num_layers=4, hidden_size=64, ffn_hidden_size=128, kv_channels=16,
        num_moe_experts=4 if model == "moe" else None,
    )  # fmt: skip

    def provider(pre_process: bool, post_process: bool, vp_stage: int | None = None) -> torch.nn.Module:
        # No virtual PP here: build_tiny_gpt derives the same pre/post flags from parallel_state.
        return build_tiny_gpt(config, vocab_size=VOCAB, max_seq_len=SEQ_MAX)

    return PolicyEngine(
        provider,
        OptimConfig(lr=1e-4),
        LossConfig(mini_batches=args["mini_batches"], micro_batch_tokens=args["budget"]),
    )


def _bench(rank: int, world_size: int, model: str, parallel: dict, args: dict) -> dict:
    from megatron.core import parallel_state

    from megatron_sapo.megatron.batching import shard_for_data_parallel

    engine = tiny_engine(args, world_size, model, parallel)
    samples = random_samples(args["samples"])
    local = shard_for_data_parallel(
        samples,
        mini_batches=args["mini_batches"],
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )
    old = engine.compute_logprobs(local)
    engine.train_step(local, old)  # warm-up
    return dict(tokens_per_s=[engine.train_step(local, old)["tokens_per_s"] for _ in range(args["reps"])])


def main() -> None:
    args = vars(bench_parser(__doc__).parse_args())
    print(
        f"samples={args['samples']} (48-{SEQ_MAX} tokens) mini_batches={args['mini_batches']} "
        f"budget={args['budget']} reps={args['reps']} threads={args['threads']} vocab={VOCAB} "
        "hidden=64 layers=4 (moe: 4 experts top-2)"
    )
    print(f"{'model':<6} {'layout':<6} {'procs':>5} {'tokens/s (median)':>18}  all reps")
    for model, name, world, parallel in LAYOUTS:
        result = run_on_ranks(_bench, world_size=world, args=(model, parallel, args), timeout=900)[0]
        rates = result["tokens_per_s"]
        print(
            f"{model:<6} {name:<6} {world:>5} {statistics.median(rates):>18.0f}  "
            + ", ".join(f"{r:.0f}" for r in rates)
        )


if __name__ == "__main__":
    main()
