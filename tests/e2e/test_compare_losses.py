"""examples/compare_losses.py end to end at tiny sizes (in-process engine, 2 RL steps per method).

The three methods start from the same cold-start model (identical step-0 eval and first rollout), each
logs its own loss's diagnostics, and all end up in one figure and one summary table; a rerun only
re-plots. Run: `python -m pytest tests/e2e/test_compare_losses.py -q` (~1 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "sft.steps=3",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.guard_prompts=1",
    "data.synthetic.n_train=32",
    "data.synthetic.n_eval=8",
    "run.eval_every=1",
]


def test_compare_losses_runs_every_method_from_the_same_start(tmp_path) -> None:
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(ROOT / "examples" / "compare_losses.py"), "--engine", "transformers"]
    cmd += ["--steps", "2", "--out", str(out), *TINY]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {
        m: [json.loads(x) for x in (out / m / "seed0" / "metrics.jsonl").read_text().splitlines()]
        for m in ("SAPO", "GSPO", "GRPO-R2")
    }
    for m, r in rows.items():
        assert [x["step"] for x in r] == [0, 1, 2], m
    sapo, gspo, grpo = rows["SAPO"], rows["GSPO"], rows["GRPO-R2"]
    # same cold start (routing replay is off during it) and same first rollout
    assert sapo[0]["eval/accuracy"] == gspo[0]["eval/accuracy"] == grpo[0]["eval/accuracy"]
    assert sapo[1]["reward/mean"] == gspo[1]["reward/mean"] == grpo[1]["reward/mean"]
    # each run used its own loss (its diagnostics) and the updates differ between losses
    assert sapo[2]["reward/mean"] != gspo[2]["reward/mean"] or sapo[2]["loss"] != gspo[2]["loss"]
    assert "sapo/gate_mean" in sapo[1] and "gspo/clip_frac" in gspo[1] and "grpo/clip_frac" in grpo[1]
    summary = (out / "summary.md").read_text()
    assert all(f"| {m} | 0 |" in summary for m in rows), summary
    assert (out / "compare_losses.png").stat().st_size > 10_000
    # a second call finds the runs finished and only re-plots
    again = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300
    )
    assert again.returncode == 0 and again.stdout.count("already finished") == 3, again.stdout
