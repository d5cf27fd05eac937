"""Benchmark: data-parallel scaling of the trainer's policy update on CPU (gloo), same global batch.

The trainer's step (`megatron_sapo.train.loop._update_policy`: rank 0's samples → `PolicyEngine.scatter`
→ π_old pass → `gather` → `train_step`) on one tiny dense GPT at DP1, DP2 and DP4 (1, 2, 4 processes),
every layout on the same `--samples` sequences (48–128 tokens) and `--mini-batches`. "replicated" runs
what the trainer did before shares: every rank computes π_old and the updates on the whole batch. A
forward pre-hook on the embedding counts the tokens each rank feeds its model per step (π_old pass +
updates); time is the wall time of one step, median over `--reps` after one untimed warm-up step.
Reported: tokens per rank per step (max over ranks) and its ratio to DP1 (1/DP expected for "scatter"),
step time and its ratio to DP1. On a 2-core machine shared with other jobs the processes compete for
the same cores, so the time ratios say little about a cluster; the token ratios are exact.

    python benchmarks/bench_scaling.py --reps 3

Weight sync at PP 1/2/4 (bytes per stage, through rank 0, seconds): `python benchmarks/bench_weight_sync.py --pp 1 2 4`.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_train_step import (  # this folder (sys.path[0])
    SEQ_MAX,
    VOCAB,
    bench_parser,
    random_samples,
    tiny_engine,
)

from megatron_sapo.utils.spawn import run_on_ranks

LAYOUTS = [("scatter", 1), ("scatter", 2), ("scatter", 4), ("replicated", 2), ("replicated", 4)]


def _bench(rank: int, world_size: int, mode: str, args: dict) -> dict:
    from megatron_sapo.train.loop import _update_policy

    engine = tiny_engine(args, world_size)
    seen = [0]
    engine.model[0].module.embedding.word_embeddings.register_forward_pre_hook(
        lambda _, inputs: seen.__setitem__(0, seen[0] + int((inputs[0] != 0).sum()))
    )
    samples = random_samples(args["samples"], first_token=1)  # 0 is padding: not counted

    def step() -> None:
        if mode == "scatter":
            _update_policy(engine, samples if rank == 0 else None)
        else:  # before shares: every rank ran the whole batch, gradients then averaged over DP
            engine.train_step(samples, engine.compute_logprobs(samples))

    step()  # warm-up
    times, tokens = [], []
    for _ in range(args["reps"]):
        start, t0 = seen[0], time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        tokens.append(seen[0] - start)
    return dict(times=times, tokens=tokens)


def main() -> None:
    args = vars(bench_parser(__doc__).parse_args())
    print(
        f"samples={args['samples']} (48-{SEQ_MAX} tokens) mini_batches={args['mini_batches']} "
        f"budget={args['budget']} reps={args['reps']} threads={args['threads']} vocab={VOCAB} "
        "hidden=64 layers=4, dense; tokens = fed to the model per step (pi_old + updates)"
    )
    print(
        f"{'mode':<10} {'DP':>2} {'tokens/rank':>11} {'ratio':>6} {'step s (median)':>15} {'ratio':>6}  "
        "all reps (s)"
    )
    base_tokens = base_time = None
    for mode, world in LAYOUTS:
        results = run_on_ranks(_bench, world_size=world, args=(mode, args), timeout=900)
        tokens = max(statistics.median(r["tokens"]) for r in results)
        seconds = statistics.median(max(ts) for ts in zip(*(r["times"] for r in results)))
        if base_tokens is None:
            base_tokens, base_time = tokens, seconds
        reps = ", ".join(f"{max(ts):.2f}" for ts in zip(*(r["times"] for r in results)))
        print(
            f"{mode:<10} {world:>2} {tokens:>11.0f} {tokens / base_tokens:>6.3f} {seconds:>15.2f} "
            f"{seconds / base_time:>6.2f}  {reps}"
        )


if __name__ == "__main__":
    main()
