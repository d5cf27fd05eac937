"""Train a tiny policy with `PolicyEngine` on CPU, checkpointing after every step; for test_checkpoint.py.

Dropout is on (hidden 0.1, attention 0.1), so a resume is exact only if the RNG states come back too.
The data of step s is drawn from a generator seeded by the data position stored in the checkpoint's
`extra`. Each rank writes its per-step losses and final parameters to `OUT/rank<r>.pt`.

    torchrun --nproc-per-node 2 --master-port 29555 tests/distributed/_resume_script.py \
        --ckpt /tmp/ck --out /tmp/out --steps 3 [--resume] [--kill-after-save 2 | --kill-mid-save 3]

`--kill-after-save k`: every rank SIGKILLs itself right after the step-k checkpoint is complete.
`--kill-mid-save k`: rank 0 SIGKILLs itself inside the step-k save, after every rank has written its files
and before the checkpoint is renamed into place (torchrun then takes the other rank down).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

VOCAB, SAMPLES_PER_STEP, MINI_BATCHES = 64, 8, 2


def _samples(position: int) -> list:
    from megatron_sapo.megatron.testing import random_samples

    return random_samples(SAMPLES_PER_STEP, vocab=VOCAB, seed=10_000 + position, lengths=(9, 20))


def _provider(pre_process: bool, post_process: bool, vp_stage: int | None = None) -> torch.nn.Module:
    from megatron_sapo.megatron.testing import build_tiny_gpt, randomize_weights, tiny_gpt_config

    config = tiny_gpt_config(hidden_dropout=0.1, attention_dropout=0.1)
    model = build_tiny_gpt(config, vocab_size=VOCAB)
    randomize_weights(model, seed=3)  # same on every rank (TP=1: DP replicas)
    return model


def _kill_inside_publish() -> None:
    from megatron_sapo.megatron import checkpoint

    def publish(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._publish = publish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-after-save", type=int)
    parser.add_argument("--kill-mid-save", type=int)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    from megatron.core import parallel_state

    from megatron_sapo.megatron.batching import shard_for_data_parallel
    from megatron_sapo.megatron.checkpoint import load_checkpoint, save_checkpoint
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.testing import init_megatron_cpu

    init_megatron_cpu()  # TP=PP=1: both ranks are data-parallel (ZeRO-sharded optimizer state)
    engine = PolicyEngine(
        _provider,
        OptimConfig(lr=1e-2, warmup_steps=1, decay_steps=8, weight_decay=0.01),
        LossConfig(mini_batches=MINI_BATCHES, micro_batch_tokens=40),
    )
    objects = dict(model_chunks=engine.model, optimizer=engine.optimizer, scheduler=engine.scheduler)
    step, position = 0, 0
    if args.resume:
        step, extra = load_checkpoint(args.ckpt, **objects)
        position = extra["data_position"]
    dp = dict(
        mini_batches=MINI_BATCHES,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )
    losses = {}
    while step < args.steps:
        metrics = engine.train_step(shard_for_data_parallel(_samples(position), **dp))
        step, position = step + 1, position + SAMPLES_PER_STEP
        losses[step] = metrics["loss"]
        if args.kill_mid_save == step:
            _kill_inside_publish()
        save_checkpoint(args.ckpt, step=step, extra={"data_position": position}, keep_last=2, **objects)
        if args.kill_after_save == step:
            os.kill(os.getpid(), signal.SIGKILL)

    params = {n: p.detach().clone() for n, p in engine.model[0].module.named_parameters()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    torch.save(dict(losses=losses, params=params), Path(args.out) / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
