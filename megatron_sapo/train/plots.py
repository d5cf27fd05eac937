"""Plots of a run's metrics rows (what `metrics.jsonl` holds): reward, eval accuracy, SAPO diagnostics, and
where each step's time went.

plot_run(rows, "outputs/quickstart/plots")   # -> reward.png, eval_accuracy.png, diagnostics.png, time.png
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

DIAGNOSTICS = (
    "sapo/gate_mean",
    "sapo/w_mean",
    "sapo/w_below_half_frac",
    "log_ratio/abs_mean",
    "log_ratio/seq_var_mean",
    "grpo/clip_frac",
    "gspo/clip_frac",
    "sync/logprob_diff_max",
)


def _series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_run(rows: Sequence[dict], out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for key, name, ylabel in (
        ("reward/mean", "reward.png", "mean reward"),
        ("eval/accuracy", "eval_accuracy.png", "greedy eval accuracy"),
    ):
        steps, values = _series(rows, key)
        if not steps:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, values, marker="o", ms=3)
        ax.set_xlabel("RL step (0 = after the cold start)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    present = [k for k in DIAGNOSTICS if _series(rows, k)[0]]
    if present:
        fig, axes = plt.subplots(len(present), 1, figsize=(6, 1.8 * len(present)), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], present):
            ax.plot(*_series(rows, key), ms=2, marker=".")
            ax.set_ylabel(key, fontsize=7)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("RL step")
        fig.tight_layout()
        fig.savefig(out / "diagnostics.png", dpi=120)
        plt.close(fig)
        written.append(out / "diagnostics.png")
    timed = [r for r in rows if "time/step_s" in r and "time/other_s" in r]
    if timed:
        from megatron_sapo.train.loop import PHASES  # the loop's own split (other_s: the gaps between)

        keys = [k for k in (*PHASES, "time/other_s") if any(r.get(k, 0.0) > 0 for r in timed)]
        fig, ax = plt.subplots(figsize=(7, 3.8))
        ax.stackplot(
            [r["step"] for r in timed],
            [[max(r.get(k, 0.0), 0.0) for r in timed] for k in keys],
            labels=[k.removeprefix("time/").removesuffix("_s") for k in keys],
        )
        ax.set_xlabel("RL step")
        ax.set_ylabel("seconds (stacked = time/step_s)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "time.png", dpi=120)
        plt.close(fig)
        written.append(out / "time.png")
    return written
