"""examples/async_grid.py's figures and summary, from run directories written here (no training).

Each run directory holds what a finished `megatron-sapo train` leaves (metrics.jsonl, hf/config.json)
with known values, so the table's numbers have closed forms: the final accuracy's mean and population
sd over seeds, its gain over step 0, the mean reward of the last 50 steps, the mean engine–trainer gap
and the mean truncated fraction. An unfinished run (its last row short of --steps) is left out.
The training side is examples/compare_losses.py's (tests/e2e/test_compare_losses.py).
Run: `python -m pytest tests/unit/test_async_grid.py -q` (seconds).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 60


def _run(path: Path, final_acc: float, reward: float, gap: float, steps: int = STEPS) -> None:
    rows = [{"step": 0, "eval/accuracy": 0.2}]
    for s in range(1, steps + 1):
        row = {
            "step": s,
            "reward/mean": reward if s > STEPS - 50 else 0.0,
            "rollout/engine_trainer_logprob_diff_mean": gap,
            "rollout_correction/truncated_fraction": 0.01,
        }
        if s == steps:
            row["eval/accuracy"] = final_acc
        rows.append(row)
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "hf").mkdir()
    (path / "hf" / "config.json").write_text("{}")


def test_summary_and_figures_from_finished_runs(tmp_path: Path) -> None:
    out = tmp_path / "grid"
    _run(out / "s1_tis" / "SAPO" / "seed0", 0.5, 0.4, 0.02)
    _run(out / "s1_tis" / "SAPO" / "seed1", 0.7, 0.6, 0.04)
    _run(out / "s1_tis" / "SAPO" / "seed2", 0.9, 0.9, 0.09, steps=STEPS - 1)  # unfinished: left out
    _run(out / "s0_off" / "SAPO" / "seed0", 0.4, 0.3, 1e-7)
    cmd = [sys.executable, str(ROOT / "examples" / "async_grid.py"), "--plot-only", "--out", str(out)]
    cmd += ["--methods", "SAPO", "--staleness", "0", "1", "--corrections", "off", "tis"]
    cmd += ["--seeds", "0", "1", "2", "--steps", str(STEPS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = (out / "summary.md").read_text().splitlines()
    cells = {tuple(c.strip() for c in line.split("|")[2:4]): line for line in lines[2:]}
    assert set(cells) == {("0", "off"), ("1", "tis")}  # no run at all: no row
    tis = [c.strip() for c in cells["1", "tis"].split("|")[1:-1]]
    assert tis[3] == "2"  # seeds that finished
    assert tis[4] == f"{0.6:.3f} ± {0.1:.3f}"  # mean and population sd of 0.5, 0.7
    assert tis[5] == f"{0.6 - 0.2:+.3f}"
    assert float(tis[6]) == pytest.approx(0.5)
    assert float(tis[7]) == pytest.approx(0.03, rel=0.05)
    assert float(tis[8]) == pytest.approx(0.01)
    assert [c.strip() for c in cells["0", "off"].split("|")[1:-1]][8] == "—"
    for name in ("reward.png", "eval_accuracy.png", "off_policy.png"):
        assert (out / name).stat().st_size > 10_000, name


def test_nothing_finished_is_one_error(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "examples" / "async_grid.py"), "--plot-only", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip() == f"no finished runs under {tmp_path}"
