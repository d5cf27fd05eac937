"""An absurd learning rate: the run stops with one line naming the step (exit 1), writes no row or
checkpoint for it, and its warnings use metrics.jsonl's step numbers. In-process engine, tiny model.

Run: python -m pytest tests/e2e/test_divergence.py -q (~20 s on 2 cores)
"""

from __future__ import annotations

import json

from tests.e2e.test_trainer import train

ARGS = ["sft.steps=0", "rollout.engine=transformers", "run.steps=3", "run.save_every=1", "run.progress=false"]


def test_absurd_learning_rate_stops_with_policy_diverged(tmp_path) -> None:
    out = tmp_path / "out"
    proc = train(out, *ARGS, "optim.lr=1e30", check=False)
    err = proc.stderr
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    # the first update blows the weights up; the weight-sync guard's samples after it are the first to see it
    last = err.strip().splitlines()[-1]
    assert last.startswith("megatron-sapo train: error: policy diverged at step 1: "), last
    assert "non-finite next-token probabilities" in last and "stopped before this step's metrics row" in last
    assert "step 1: non-finite loss" in err and "step 0: non-finite loss" not in err  # the row's number
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0]  # the initial eval only
    assert not list((out / "checkpoints").glob("*"))  # save_every=1, but nothing after the divergence
