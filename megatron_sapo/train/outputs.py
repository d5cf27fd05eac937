"""What a run leaves behind: metrics.jsonl, TensorBoard events, W&B, the progress bar, plots, the end-of-run
summary, and the final Hugging Face checkpoint in <output_dir>/hf.
Tests: tests/e2e/test_trainer.py.
"""

from __future__ import annotations

import json
import logging
from itertools import chain
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_sapo.train.config import TrainJobConfig

log = logging.getLogger(__name__)


class MetricsWriter:
    """Rank 0: metrics.jsonl (one object per step), TensorBoard events, plots at the end."""

    def __init__(self, out: Path, cfg: TrainJobConfig, *, resume_step: int) -> None:
        self.out, self.cfg = out, cfg
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        rows = [json.loads(x) for x in self.path.read_text().splitlines()] if self.path.exists() else []
        # A resumed run rewrites the steps after its checkpoint (they were lost with the crash); a run
        # that starts from step 0 (nothing saved yet: none was, or it was killed before or during its
        # first save) rewrites every row, the step-0 eval included.
        self.rows = [r for r in rows if r["step"] <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.tb = None
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "run.tensorboard needs the tensorboard package (pip install tensorboard)"
                ) from e

            # purge_step: TensorBoard hides the earlier events at and after it, which this run redoes
            # (those of a run killed before its first checkpoint too: purge from step 0)
            self.tb = SummaryWriter(
                str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else 0
            )
        self.wandb = None
        if cfg.run.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(
                    "run.wandb_project is set but wandb is not installed (pip install wandb)"
                ) from e
            self.wandb = wandb.init(project=cfg.run.wandb_project, dir=str(out), resume="allow")
        self.bar = None
        if cfg.run.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.run.steps, initial=resume_step, desc="RL steps", unit="step")

    def write(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, row["step"])
            self.tb.flush()  # on disk every step: a crash loses nothing that metrics.jsonl has
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])
        if self.bar is not None and row["step"] > self.bar.n:
            self.bar.update(row["step"] - self.bar.n)
            self.bar.set_postfix({k: round(row[k], 3) for k in ("reward/mean", "eval/accuracy") if k in row})
        step = row["step"]
        if step % self.cfg.run.log_every == 0 or step == self.cfg.run.steps:
            shown = {k: row[k] for k in ("reward/mean", "loss", "eval/accuracy", "time/step_s") if k in row}
            log.info("step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def log_sft(self, step: int, nll: float, seconds: float) -> None:
        """`nll`: the mean negative log-likelihood per demonstration token before the step."""
        log.info("cold start step %d: token NLL %.4f (%.0f s)", step, nll, seconds)

    def summary(self) -> None:
        """The end-of-run lines a user looks for: accuracy after the cold start vs at the end, and paths."""
        evals = [(r["step"], r["eval/accuracy"]) for r in self.rows if "eval/accuracy" in r]
        lines = []
        if len(evals) >= 2:
            (s0, a0), (s1, a1) = evals[0], evals[-1]
            lines.append(
                f"eval accuracy: {a0:.2f} at step {s0} (after the cold start) -> {a1:.2f} at step {s1} "
                f"({100 * (a1 - a0):+.0f} points)"
            )
        lines += [f"plots: {self.out / 'plots'}", f"Hugging Face checkpoint: {self.out / 'hf'}"]
        log.warning("\n".join(lines))  # WARNING: shown even when INFO progress logs are off

    def finish(self) -> None:
        from megatron_sapo.train.plots import plot_run

        plot_run(self.rows, self.out / "plots")
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()


def export_final_hf(cfg: TrainJobConfig, policy: Any, hf_config: Any, hf_dir: Path, out: Path) -> None:
    """All ranks (collective export; rank 0 writes): the final policy as a HF checkpoint in <out>/hf.

    Disk full: `CheckpointError` on every rank (one line naming the path), no partial hf/ or hf.tmp/."""
    from megatron_sapo.bridge import export_hf_weights
    from megatron_sapo.bridge.arch import architecture_of
    from megatron_sapo.bridge.fused_experts import fuse_stream
    from megatron_sapo.bridge.snapshot import write_hf_snapshot
    from megatron_sapo.megatron.checkpoint import CheckpointError
    from megatron_sapo.utils.disk import DiskFullError

    buckets = export_hf_weights(policy.model, hf_config)
    failure: list[str | None] = [None]
    if dist.get_rank() == 0:
        named = chain.from_iterable(buckets)
        if architecture_of(hf_config).disk_experts_transposed:  # Qwen3-VL-MoE: official fused experts
            named = fuse_stream(named, hf_config.get_text_config().num_experts)
        try:
            target = write_hf_snapshot(named, out / "hf", assets_from=hf_dir)
            log.info("final Hugging Face checkpoint: %s", target)
        except DiskFullError as e:
            failure = [f"final Hugging Face checkpoint not written: {e}"]
    for _ in buckets:  # the export is collective: the other ranks (and a rank 0 that failed) finish it
        pass
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        raise CheckpointError(failure[0])
