"""SAPO vs GSPO vs GRPO-R2 on the quickstart task: same seed, same budget, 4 off-policy mini-batches each.

Every method runs `megatron-sapo train CONFIG` with the same config, seed and number of RL steps (300 by
default, the learning rate decaying over them; extra key=value arguments win); only
the loss differs (the paper's baselines: GSPO with its 3e-4 / 4e-4 band, GRPO with ε 0.2 / 0.27 and
routing replay R2). With one seed all methods share the cold-start model, so step 0 is identical.

    python examples/compare_losses.py                                 # 300 RL steps each, real SGLang
    python examples/compare_losses.py --seeds 0 1 2 --engine transformers   # in-process engine, ~3x faster
    python examples/compare_losses.py --plot-only                     # re-plot finished runs

Writes <out>/<method>/seed<S>/ (a normal run directory each), <out>/compare_losses.png (reward and eval
accuracy per method, mean over seeds with a min-max band, plus the off-policy diagnostics) and
<out>/summary.md. A finished run is not rerun; an interrupted one resumes from its last checkpoint.
Results of a full run are in docs/compare_losses.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parents[1]

METHODS = {  # label -> the config overrides that make it
    "SAPO": ["loss.name=sapo"],
    "GSPO": ["loss.name=gspo"],
    "GRPO-R2": ["loss.name=grpo", "loss.routing_replay=r2"],
}

# (metric or alternatives, panel title); a method without the metric is left out of that panel
PANELS = (
    ("reward/mean", "training reward (moving mean, 10 steps)"),
    ("eval/accuracy", "greedy eval accuracy (held-out)"),
    ("log_ratio/abs_mean", "mean |log r| (off-policy drift)"),
    ("log_ratio/seq_var_mean", "mean per-sequence Var_t(log r)"),
    (
        ("sapo/w_below_half_frac", "gspo/clip_frac", "grpo/clip_frac"),
        "tokens damped (SAPO: w < 1/2) or clipped",
    ),
    ("grad_norm", "gradient norm (before clipping)"),
)


def run_dir(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed{seed}"


def read_rows(path: Path) -> list[dict]:
    metrics = path / "metrics.jsonl"
    return [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []


def finished(path: Path, steps: int) -> bool:
    rows = read_rows(path)
    return bool(rows) and rows[-1]["step"] == steps and (path / "hf" / "config.json").is_file()


def train(args: argparse.Namespace, method: str, seed: int) -> None:
    """One run through the real CLI (skipped when already finished; resumed when interrupted)."""
    path = run_dir(args.out, method, seed)
    if finished(path, args.steps):
        print(f"[{method} seed {seed}] already finished: {path}")
        return
    cmd = [
        sys.executable,
        "-m",
        "megatron_sapo.cli",
        "train",
        str(args.config),
        f"run.output_dir={path}",
        f"run.seed={seed}",
        f"run.steps={args.steps}",
        # the cosine decay spans the run's optimizer steps (4 mini-batches per RL step): a shorter
        # comparison than the config's run still ends at the low learning rate
        f"optim.decay_steps={4 * args.steps}",
        f"rollout.engine={args.engine}",
        "run.progress=false",
        *METHODS[method],
        *args.overrides,
    ]
    print(f"[{method} seed {seed}] {' '.join(cmd[2:])}", flush=True)
    path.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(path / "train.log", "a") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = (path / "train.log").read_text().splitlines()[-15:]
        sys.exit(f"[{method} seed {seed}] failed (exit {proc.returncode}); log tail:\n" + "\n".join(tail))
    print(f"[{method} seed {seed}] done in {time.monotonic() - start:.0f} s", flush=True)


def series(rows: list[dict], keys: str | tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    keys = (keys,) if isinstance(keys, str) else keys
    key = next((k for k in keys if any(k in r for r in rows)), None)
    points = [(r["step"], r[key]) for r in rows if key is not None and key in r]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points], dtype=float)


def moving_mean(values: np.ndarray, window: int) -> np.ndarray:
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    head = np.cumsum(values[: window - 1]) / np.arange(1, window)  # the first points: mean so far
    return np.concatenate([head, np.convolve(values, kernel, mode="valid")])


def plot(out: Path, runs: dict[str, list[list[dict]]]) -> Path:
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (keys, title) in zip(axes.flat, PANELS):
        for color, (method, seeds) in zip(("C0", "C1", "C3"), runs.items()):
            curves = [series(rows, keys) for rows in seeds]
            curves = [c for c in curves if len(c[0])]
            if not curves:
                continue
            n = min(len(c[0]) for c in curves)
            steps = curves[0][0][:n]
            values = np.stack([c[1][:n] for c in curves])
            if keys == "reward/mean":
                values = np.stack([moving_mean(v, 10) for v in values])
            label = f"{method} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
            ax.plot(steps, values.mean(0), color=color, label=label, lw=1.4)
            if len(curves) > 1:
                ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.15, lw=0)
        if keys == "grad_norm":
            ax.set_yscale("log")  # pre-clip norms: rare spikes are orders of magnitude above the rest
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("RL step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("SAPO vs GSPO vs GRPO-R2: same seed(s), same budget, 4 off-policy mini-batches per batch")
    fig.tight_layout()
    path = out / "compare_losses.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary(runs: dict[str, list[list[dict]]], seeds: list[int]) -> str:
    lines = [
        "| method | seed | eval acc. after cold start | final eval acc. | best eval acc. | "
        "mean reward, last 50 steps | RL time (sum of step times) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, per_seed in runs.items():
        finals = []
        for seed, rows in zip(seeds, per_seed):
            _, acc = series(rows, "eval/accuracy")
            _, reward = series(rows, "reward/mean")
            if not len(acc):
                continue
            finals.append(acc[-1])
            took = sum(r.get("time/step_s", 0.0) for r in rows)
            lines.append(
                f"| {method} | {seed} | {acc[0]:.2f} | {acc[-1]:.2f} | {acc.max():.2f} | "
                f"{reward[-50:].mean():.3f} | {took:.0f} s |"
            )
        if len(finals) > 1:
            lines.append(f"| {method} | mean | | {np.mean(finals):.3f} | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Extra key=value arguments go to every run (e.g. rollout.prompts_per_step=8).",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides for every run")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument(
        "--steps",
        type=int,
        default=300,
        help="RL steps per run (the same budget for all; the lr decays over them)",
    )
    parser.add_argument(
        "--engine",
        choices=["sglang", "transformers"],
        default="sglang",
        help="rollout engine: the real SGLang CPU server, or the in-process transformers engine",
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/compare_losses"))
    parser.add_argument("--plot-only", action="store_true", help="only plot/summarise the finished runs")
    args = parser.parse_args()

    if not args.plot_only:
        for seed in args.seeds:  # seed-major: a partial sweep still compares all methods
            for method in args.methods:
                train(args, method, seed)
    runs = {m: [read_rows(run_dir(args.out, m, s)) for s in args.seeds] for m in args.methods}
    missing = [f"{m}/seed{s}" for m in args.methods for s, r in zip(args.seeds, runs[m]) if not r]
    if missing:
        sys.exit(f"no metrics for {', '.join(missing)} under {args.out} (run without --plot-only first)")
    starts = {m: series(r[0], "eval/accuracy")[1][:1].tolist() for m, r in runs.items()}
    if len({tuple(v) for v in starts.values()}) > 1:
        print(f"warning: the methods start from different accuracies {starts} (different seeds/configs?)")
    png = plot(args.out, runs)
    table = summary(runs, args.seeds)
    (args.out / "summary.md").write_text(table)
    print(table)
    print(f"plot: {png}\nsummary: {args.out / 'summary.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
