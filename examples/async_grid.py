"""Off-policy learning grid: SAPO vs GSPO vs GRPO-R2 × rollout.max_staleness × rollout correction × seeds.

Each cell (staleness k, correction c) is `examples/compare_losses.py`'s comparison (same config, seed and
budget for every method) run with `rollout.max_staleness=k loss.rollout_correction=c`, in
<out>/s<k>_<c>/<method>/seed<S>/. A finished run is not rerun and an interrupted one resumes, so the grid
can be filled over several sittings.

    python examples/async_grid.py --out outputs/async_grid                 # 3 x 3 x 3 cells x 3 seeds
    python examples/async_grid.py --out outputs/async_grid --staleness 1 --corrections off tis --seeds 0
    python examples/async_grid.py --out outputs/async_grid --plot-only     # figures of what has finished

Figures, one per metric (rows: methods; columns: staleness; one line per correction, the mean over the
seeds that finished, with a min-max band): <out>/reward.png (training reward, 10-step moving mean),
<out>/eval_accuracy.png (greedy held-out accuracy), <out>/off_policy.png (mean |log π_old − log μ| per
token: the engine-trainer gap the correction acts on, `rollout/engine_trainer_logprob_diff_mean`).
<out>/summary.md: per cell and method, the seeds, the final eval accuracy (mean ± sd), its gain over the
cold start, the mean reward of the last 50 steps, the mean gap, and the fraction TIS truncated or MIS
masked. Results: docs/async.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("compare_losses", ROOT / "examples" / "compare_losses.py")
compare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare)

CORRECTIONS = ("off", "tis", "mis")
COLORS = {"off": "C0", "tis": "C1", "mis": "C2"}
FIGURES = (  # file, metric, title, log scale
    ("reward.png", "reward/mean", "training reward (10-step moving mean)", False),
    ("eval_accuracy.png", "eval/accuracy", "greedy eval accuracy (held-out)", False),
    (
        "off_policy.png",
        "rollout/engine_trainer_logprob_diff_mean",
        "mean |log π_old − log μ| per token",
        True,
    ),
)


def cell_dir(out: Path, staleness: int, correction: str) -> Path:
    return out / f"s{staleness}_{correction}"


def cell_args(args: argparse.Namespace, staleness: int, correction: str) -> argparse.Namespace:
    """The compare_losses arguments of one cell."""
    overrides = [f"rollout.max_staleness={staleness}", f"loss.rollout_correction={correction}"]
    return argparse.Namespace(
        out=cell_dir(args.out, staleness, correction),
        steps=args.steps,
        config=args.config,
        engine=args.engine,
        overrides=overrides + args.overrides,
    )


def load(args: argparse.Namespace) -> dict[tuple[int, str, str], list[list[dict]]]:
    """(staleness, correction, method) -> the rows of each seed whose run finished."""
    runs = {}
    for k in args.staleness:
        for c in args.corrections:
            for method in args.methods:
                paths = [compare.run_dir(cell_dir(args.out, k, c), method, s) for s in args.seeds]
                runs[k, c, method] = [compare.read_rows(p) for p in paths if compare.finished(p, args.steps)]
    return runs


def plot(args: argparse.Namespace, runs: dict) -> list[Path]:
    written = []
    for name, metric, title, log in FIGURES:
        fig, axes = plt.subplots(
            len(args.methods), len(args.staleness), figsize=(4.2 * len(args.staleness), 2.8 * len(args.methods)),
            squeeze=False, sharex=True, sharey=True,
        )  # fmt: skip
        for row, method in enumerate(args.methods):
            for col, k in enumerate(args.staleness):
                ax = axes[row, col]
                for c in args.corrections:
                    curves = [compare.series(rows, metric) for rows in runs[k, c, method]]
                    curves = [cv for cv in curves if len(cv[0])]
                    if not curves:
                        continue
                    n = min(len(cv[0]) for cv in curves)
                    values = np.stack([cv[1][:n] for cv in curves])
                    if metric == "reward/mean":
                        values = np.stack([compare.moving_mean(v, 10) for v in values])
                    steps = curves[0][0][:n]
                    ax.plot(steps, values.mean(0), color=COLORS[c], lw=1.3, label=f"{c} ({len(curves)})")
                    if len(curves) > 1:
                        ax.fill_between(
                            steps, values.min(0), values.max(0), color=COLORS[c], alpha=0.15, lw=0
                        )
                if log:
                    ax.set_yscale("log")
                ax.set_title(f"{method}, max_staleness {k}", fontsize=9)
                ax.grid(alpha=0.3)
                ax.tick_params(labelsize=7)
                if row == len(args.methods) - 1:
                    ax.set_xlabel("RL step", fontsize=8)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=7, title="correction (seeds)", title_fontsize=7)
        fig.suptitle(f"{title}: mean over seeds, min-max band", fontsize=10)
        fig.tight_layout()
        path = args.out / name
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def summary(args: argparse.Namespace, runs: dict) -> str:
    lines = [
        "| method | max_staleness | correction | seeds | final eval acc. (mean ± sd) | gain over cold start | "
        "mean reward, last 50 steps | mean \\|log π_old − log μ\\| | truncated / masked |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in args.methods:
        for k in args.staleness:
            for c in args.corrections:
                per_seed = runs[k, c, method]
                if not per_seed:
                    continue
                accs = [compare.series(rows, "eval/accuracy")[1] for rows in per_seed]
                finals = np.array([a[-1] for a in accs])
                gains = np.array([a[-1] - a[0] for a in accs])
                reward = np.mean([compare.series(rows, "reward/mean")[1][-50:].mean() for rows in per_seed])
                gap = np.mean([compare.series(rows, FIGURES[2][1])[1].mean() for rows in per_seed])
                key = {
                    "tis": "rollout_correction/truncated_fraction",
                    "mis": "rollout_correction/masked_fraction",
                }
                cut = "—"
                if c in key:
                    cut = f"{np.mean([compare.series(rows, key[c])[1].mean() for rows in per_seed]):.4f}"
                lines.append(
                    f"| {method} | {k} | {c} | {len(per_seed)} | {finals.mean():.3f} ± {finals.std():.3f} | "
                    f"{gains.mean():+.3f} | {reward:.3f} | {gap:.1e} | {cut} |"
                )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Extra key=value arguments go to every run.",
    )
    parser.add_argument("overrides", nargs="*", help="dotted.key=value config overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("outputs/async_grid"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "quickstart.yaml")
    parser.add_argument("--methods", nargs="+", default=list(compare.METHODS), choices=list(compare.METHODS))
    parser.add_argument("--staleness", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--corrections", nargs="+", default=list(CORRECTIONS), choices=CORRECTIONS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300, help="RL steps per run")
    parser.add_argument(
        "--engine",
        choices=["sglang", "transformers"],
        default="sglang",
        help="rollout engine (the in-process one honours the seeds; SGLang's CPU sampling is not seeded)",
    )
    parser.add_argument("--plot-only", action="store_true", help="only plot/summarise the finished runs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.plot_only:
        # seed-major, then cell: a partial sweep has every cell at the same number of seeds
        for seed in args.seeds:
            for k in args.staleness:
                for c in args.corrections:
                    for method in args.methods:
                        compare.train(cell_args(args, k, c), method, seed)
    runs = load(args)
    if not any(runs.values()):
        sys.exit(f"no finished runs under {args.out}")
    for path in plot(args, runs):
        print(f"figure: {path}")
    table = summary(args, runs)
    (args.out / "summary.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
