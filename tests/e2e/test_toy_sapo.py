"""`make demo`'s job: a Qwen3-MoE policy on real megatron-core (CPU), trained by the PolicyEngine, must learn.

Runs examples/toy_sapo.py in a subprocess and checks its outputs: one metrics row per step with the
documented keys, a PNG plot, and a reward that rises well above the random policy's (≈ 1/16).

Run: python -m pytest tests/e2e/test_toy_sapo.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_toy_sapo_learns_and_writes_its_outputs(tmp_path: Path) -> None:
    steps = 120
    cmd = [sys.executable, "-W", "ignore", str(ROOT / "examples/toy_sapo.py"), "--steps", str(steps)]
    proc = subprocess.run([*cmd, "--out", str(tmp_path)], capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("reward/mean", "loss", "grad_norm", "sapo/w_mean", "sapo/gate_mean", "log_ratio/seq_var_max"):
        assert key in rows[-1], key
    first = sum(r["reward/mean"] for r in rows[:10]) / 10
    last = sum(r["reward/mean"] for r in rows[-10:]) / 10
    assert first < 0.2, first  # a random policy matches the digit ≈ 1/16 of the time
    assert last > first + 0.2, (first, last)
    assert (tmp_path / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean reward: first" in proc.stdout
