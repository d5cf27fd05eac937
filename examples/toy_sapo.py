"""Toy SAPO run: a tiny Qwen3-MoE policy on real megatron-core (CPU), trained by the PolicyEngine.

A 30-second look at the train step alone, without SGLang, data files or the trainer loop (`make demo`
runs the whole thing: `megatron-sapo train configs/quickstart.yaml`). The policy is built from a transformers `Qwen3MoeConfig` (4 experts, top-2) by `megatron_sapo.megatron.models`;
it samples its own responses; rewards → group advantages → π_old log-probs → 4 off-policy mini-batch
updates per rollout batch (as in the SAPO paper) by `PolicyEngine.train_step` (megatron's distributed
Adam, `get_forward_backward_func`, vocab-parallel log-probs, `compute_policy_loss`).

Task: the prompt is [BOS, d] for a digit d; the reward is the fraction of the 6 response tokens equal to
d. A random policy scores ≈ 1/16; the reward printed per step rises.

    python examples/toy_sapo.py [--loss sapo|gspo|gspo_token|grpo] [--steps 120] [--out outputs/toy_sapo]

Writes `metrics.jsonl` (one JSON object per step) and `reward.png` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from functools import partial
from pathlib import Path

import matplotlib
import torch
import torch.distributed as dist
from transformers import Qwen3MoeConfig

from megatron_sapo.losses import LOSSES, group_advantages
from megatron_sapo.megatron.batching import Sample
from megatron_sapo.megatron.cpu import causal_attention_mask
from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
from megatron_sapo.megatron.models import build_gpt_model
from megatron_sapo.megatron.parallel import ParallelConfig, init_parallel
from megatron_sapo.utils.spawn import free_port

matplotlib.use("Agg")
import matplotlib.pyplot as plt

VOCAB, BOS, DIGITS, RESPONSE_LEN = 16, 15, 10, 6

POLICY = Qwen3MoeConfig(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=4,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    max_position_embeddings=32,
    tie_word_embeddings=True,
)


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Ancestral sampling at temperature 1 (no KV cache: the sequences are 8 tokens long)."""
    seq = prompts
    for _ in range(n_new):
        b, s = seq.shape
        logits = model(seq, torch.arange(s).expand(b, s), causal_attention_mask(s, b))
        probs = torch.softmax(logits[:, -1, :VOCAB].float(), -1)
        seq = torch.cat([seq, torch.multinomial(probs, 1)], 1)
    return seq


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", default="sapo", choices=sorted(LOSSES), help="policy loss (default: sapo)")
    p.add_argument("--steps", type=int, default=120, help="rollout batches (default: 120)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch (default: 8)")
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt, G (default: 8)")
    p.add_argument("--mini-batches", type=int, default=4, help="updates per rollout batch (default: 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/toy_sapo"), help="output directory")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    logging.basicConfig(level=logging.WARNING)

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    init_parallel(ParallelConfig(), seed=args.seed)
    engine = PolicyEngine(
        partial(build_gpt_model, POLICY),
        OptimConfig(lr=args.lr, clip_grad=1.0),
        LossConfig(mini_batches=args.mini_batches, name=args.loss),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    n_seq = args.prompts * args.group_size
    print(
        f"toy {args.loss.upper()}: Qwen3-MoE (4 experts, top-2) on megatron-core, CPU; {n_seq} responses/step"
    )
    with (args.out / "metrics.jsonl").open("w") as metrics_file:
        for step in range(1, args.steps + 1):
            t0 = time.perf_counter()
            digits = torch.randint(0, DIGITS, (args.prompts,)).repeat_interleave(args.group_size)
            prompts = torch.stack([torch.full_like(digits, BOS), digits], 1)
            engine.model[0].eval()
            seq = sample(engine.model[0], prompts, RESPONSE_LEN)
            reward = (seq[:, 2:] == digits[:, None]).float().mean(1)
            adv = group_advantages(reward, args.group_size)
            samples = [Sample(seq[i], 2, float(adv[i])) for i in range(n_seq)]
            old = engine.compute_logprobs(samples)
            m = engine.train_step(samples, old)
            row = {
                "step": step,
                "reward/mean": reward.mean().item(),
                **m,
                "time/step_s": time.perf_counter() - t0,
            }
            rows.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            gate = f"  w_mean {m['sapo/w_mean']:.3f}" if "sapo/w_mean" in m else ""
            print(
                f"step {step:3d}  reward {row['reward/mean']:.3f}  loss {m['loss']:+.4f}{gate}"
                f"  ({row['time/step_s']:.1f}s)"
            )
    dist.destroy_process_group()
    rewards = [r["reward/mean"] for r in rows]
    k = max(1, len(rewards) // 10)
    plot_rewards(rewards, args.loss, args.out / "reward.png")
    print(
        f"mean reward: first {k} steps {sum(rewards[:k]) / k:.3f} -> last {k} steps {sum(rewards[-k:]) / k:.3f}"
    )
    print(f"metrics: {args.out / 'metrics.jsonl'}   plot: {args.out / 'reward.png'}")


def plot_rewards(rewards: list[float], loss: str, path: Path, window: int = 10) -> None:
    steps = range(1, len(rewards) + 1)
    smooth = [sum(rewards[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rewards, lw=1, alpha=0.5, label="per step")
    ax.plot(steps, smooth, lw=2, label=f"mean of last {window}")
    ax.set(
        xlabel="rollout step", ylabel="reward", title=f"toy {loss.upper()}: Qwen3-MoE on megatron-core (CPU)"
    )
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
