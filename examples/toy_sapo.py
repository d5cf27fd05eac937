"""Toy SAPO run on a real megatron-core MoE GPTModel on CPU — the current `make demo`.

Until the SGLang engine and the trainer land (issues 4/5 and 5/5), this is the smallest real thing that
shows the pieces working together: a tiny Qwen3-like MoE policy (4 experts, top-2) built by megatron-core
on CPU (via `megatron_sapo.megatron.cpu`), sampling its own responses; rewards; group advantages; old
log-probs; then 4 off-policy mini-batch updates per rollout batch (as in the SAPO paper) with the
vocab-parallel log-prob path and `compute_policy_loss`.

Task: the prompt is [BOS, d] for a digit d; the reward is the fraction of the 6 response tokens equal to
d. A random policy scores ≈ 1/V; the reward printed per step rises.

    python examples/toy_sapo.py [--loss sapo|gspo|gspo_token|grpo] [--steps 120] [--out outputs/toy_sapo]

Writes `metrics.jsonl` (one JSON object per step) and `reward.png` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib
import torch
import torch.distributed as dist

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from megatron_sapo.losses import LOSSES, compute_policy_loss, group_advantages
from megatron_sapo.megatron.cpu import causal_attention_mask, clip_grad_norm_cpu
from megatron_sapo.megatron.logprobs import vocab_parallel_logprobs
from megatron_sapo.megatron.testing import build_tiny_gpt, init_megatron_cpu, tiny_gpt_config
from megatron_sapo.utils.spawn import free_port

VOCAB, BOS, DIGITS, RESPONSE_LEN = 16, 15, 10, 6


def forward_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits `[B, S, V]` for token ids `[B, S]`."""
    b, s = tokens.shape
    pos = torch.arange(s).expand(b, s)
    return model(tokens, pos, causal_attention_mask(s, b))


@torch.no_grad()
def sample(model: torch.nn.Module, prompts: torch.Tensor, n_new: int) -> torch.Tensor:
    """Ancestral sampling at temperature 1 (no KV cache: the sequences are 8 tokens long)."""
    seq = prompts
    for _ in range(n_new):
        probs = torch.softmax(forward_logits(model, seq)[:, -1].float(), -1)
        seq = torch.cat([seq, torch.multinomial(probs, 1)], 1)
    return seq


def response_logprobs(model: torch.nn.Module, seq: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Log-probs `[B, R]` of the response tokens, via the vocab-parallel (here TP=1) chunked path."""
    logits = forward_logits(model, seq)[:, prompt_len - 1 : -1]
    return vocab_parallel_logprobs(logits, seq[:, prompt_len:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loss", default="sapo", choices=sorted(LOSSES), help="policy loss (default: sapo)")
    p.add_argument("--steps", type=int, default=120, help="rollout batches (default: 120)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per rollout batch (default: 8)")
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt, G (default: 8)")
    p.add_argument("--mini-batches", type=int, default=4, help="updates per rollout batch (default: 4)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default: 3e-3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("outputs/toy_sapo"),
        help="output directory (default: outputs/toy_sapo)",
    )
    args = p.parse_args()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    init_megatron_cpu(tp=1, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_tiny_gpt(tiny_gpt_config(num_layers=2, num_moe_experts=4), vocab_size=VOCAB, max_seq_len=16)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics_file = (args.out / "metrics.jsonl").open("w")
    n_seq = args.prompts * args.group_size
    mb = n_seq // args.mini_batches
    print(
        f"toy {args.loss.upper()} on a megatron-core MoE GPTModel (CPU): {n_seq} responses/step, {args.mini_batches} mini-batches"
    )
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        digits = torch.randint(0, DIGITS, (args.prompts,)).repeat_interleave(args.group_size)
        prompts = torch.stack([torch.full_like(digits, BOS), digits], 1)
        model.eval()
        seq = sample(model, prompts, RESPONSE_LEN)
        reward = (seq[:, 2:] == digits[:, None]).float().mean(1)
        adv = group_advantages(reward, args.group_size)
        with torch.no_grad():
            old_logp = response_logprobs(model, seq, 2)
        mask = torch.ones_like(old_logp, dtype=torch.bool)
        model.train()
        perm = torch.randperm(n_seq)
        for k in range(args.mini_batches):
            idx = perm[k * mb : (k + 1) * mb]
            logp = response_logprobs(model, seq[idx], 2)
            loss, m = compute_policy_loss(args.loss, logp, old_logp[idx], adv[idx], mask[idx])
            opt.zero_grad()
            loss.backward()
            grad_norm = clip_grad_norm_cpu(list(model.parameters()), 1.0)
            opt.step()
        row = {
            "step": step,
            "reward/mean": reward.mean().item(),
            "loss": m["loss"],
            "grad_norm": float(grad_norm),
        }
        row.update({k: v for k, v in m.items() if "/" in k})
        row["time/step_s"] = time.perf_counter() - t0
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        gate = f"  w_mean {m['sapo/w_mean']:.3f}" if "sapo/w_mean" in m else ""
        print(
            f"step {step:3d}  reward {row['reward/mean']:.3f}  loss {m['loss']:+.4f}{gate}  ({row['time/step_s']:.1f}s)"
        )
    metrics_file.close()
    dist.destroy_process_group()
    rewards = [json.loads(line)["reward/mean"] for line in (args.out / "metrics.jsonl").open()]
    k = max(1, len(rewards) // 10)
    first, last = sum(rewards[:k]) / k, sum(rewards[-k:]) / k
    plot_rewards(rewards, args.loss, args.out / "reward.png")
    print(f"mean reward: first {k} steps {first:.3f} -> last {k} steps {last:.3f}")
    print(f"metrics: {args.out / 'metrics.jsonl'}   plot: {args.out / 'reward.png'}")


def plot_rewards(rewards: list[float], loss: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(rewards) + 1), rewards, lw=1, alpha=0.5, label="per step")
    w = 10
    smooth = [
        sum(rewards[max(0, i - w + 1) : i + 1]) / len(rewards[max(0, i - w + 1) : i + 1])
        for i in range(len(rewards))
    ]
    ax.plot(range(1, len(rewards) + 1), smooth, lw=2, label=f"mean of last {w}")
    ax.set(
        xlabel="rollout step",
        ylabel="reward",
        title=f"toy {loss.upper()} on megatron-core MoE (CPU)",
        ylim=(0, 1),
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
