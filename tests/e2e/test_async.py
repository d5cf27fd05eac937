"""Asynchronous rollouts (`rollout.max_staleness`) through `megatron-sapo train` (tiny sizes, in-process engine).

One run at staleness 1 with TIS rollout correction, SIGKILLed after its step 3 while the pipeline is
ahead of it (step 4's batch in flight), then rerun with the same command:
- every step is logged once, and the resumed run finishes;
- every row keeps the bound (rollout/staleness_max ≤ 1), nothing is dropped, and the pipeline really
  generated ahead: some step trained on the previous version's samples. Their engine log-probs then
  differ from π_old by the policy's change, which the correction sees;
- the engine's generate / reward seconds ran beside the step (rollout/generate_s), and the step's
  phases still add up to its wall time;
- the first resumed step regenerated its batch from the resumed weights (staleness 0): nothing in flight
  was kept, and no prompt was trained twice (the step's prompts are fixed by its index).
The pipeline's logic alone: tests/unit/test_pipeline.py.
Run: `python -m pytest tests/e2e/test_async.py -q` (~1 min on 2 cores).
"""

from __future__ import annotations

import pytest

from tests.e2e.test_trainer import kill_after_step, rows, train

ARGS = [
    "rollout.engine=transformers",
    "rollout.max_staleness=1",
    "loss.rollout_correction=tis",
    "run.steps=5",
    "run.save_every=2",
    "run.eval_every=0",
]


def test_staleness_one_runs_ahead_and_resumes_after_sigkill(tmp_path) -> None:
    out = tmp_path / "run"
    # past the step-2 checkpoint, with the next batch already being generated: the rerun redoes step 3
    kill_after_step(out, 3, *ARGS)
    train(out, *ARGS)

    r = rows(out)
    assert [x["step"] for x in r] == [0, 1, 2, 3, 4, 5]
    steps = r[1:]
    for x in steps:
        assert x["rollout/staleness_max"] <= 1 and x["rollout/dropped_stale"] == 0, x
        assert x["time/generate_s"] == 0 and x["rollout/generate_s"] > 0, x  # beside the step
        assert x["time/other_s"] > -1e-3, x  # the phases (rollout wait, sync wait, ...) add up
        assert x["loss"] == x["loss"] and x["rollout_correction/truncated_fraction"] == 0.0
    assert r[1]["rollout/staleness_max"] == 0  # the first batch comes from the synced start policy
    assert r[3]["rollout/staleness_max"] == 0  # resumed: regenerated from the checkpoint's weights
    ahead = [x for x in steps if x["rollout/staleness_mean"] == 1]
    assert ahead, "no step trained on samples generated ahead of it"
    for x in ahead:  # mu is the previous version: its gap to pi_old is the last update, far above noise
        assert x["rollout_correction/abs_log_ratio_mean"] > 1e-4, x
        assert x["rollout_correction/weight_mean"] == pytest.approx(1.0, abs=0.2)
