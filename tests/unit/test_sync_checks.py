"""The free weight-sync check on every step's rollout, the probe schedule, and the step's phase split.

`check_rollout` compares the trainer's pi_old log-probs with the engine's log-probs of the same sampled
tokens (and the weight version each sample came from); `_probes` decides which syncs are also probed right
after them (`rollout.guard_every`); `_close_step_times` closes a metrics row's time split. The whole loop
with them: tests/e2e/test_trainer.py.

Run: python -m pytest tests/unit/test_sync_checks.py -q
"""

from __future__ import annotations

import pickle

import pytest
import torch

from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.train.guard import WeightSyncMismatch, check_rollout
from megatron_sapo.train.loop import PHASES, _close_step_times, _from_driver, _probes
from megatron_sapo.utils.typed_config import ConfigError, load_config

TRAINER = [torch.tensor([-0.5, -1.0, -2.0]), torch.tensor([-0.25])]
ENGINE = [[-0.5, -1.25, -1.5], [-0.25]]  # |Δ| = 0, 0.25, 0.5, 0: mean 0.1875, max 0.5


def test_rollout_check_reports_mean_and_max_of_the_token_differences():
    got = check_rollout(TRAINER, ENGINE, ["3", "3"], version="3", threshold=0.2)
    assert got == pytest.approx(
        {
            "rollout/engine_trainer_logprob_diff_mean": 0.1875,
            "rollout/engine_trainer_logprob_diff_max": 0.5,
        }
    )


def test_rollout_check_raises_above_the_threshold_before_any_update():
    with pytest.raises(WeightSyncMismatch) as exc:
        check_rollout(TRAINER, ENGINE, ["3", "3"], version="3", threshold=0.1875 - 1e-6)
    assert "mean |Δ| 0.1875 > rollout.guard_threshold" in str(exc.value)
    assert "max 0.5, 4 tokens" in str(exc.value)


def test_rollout_check_raises_on_a_sample_from_other_weights():
    with pytest.raises(WeightSyncMismatch, match=r"weight version\(s\) \['2'\], expected '3'"):
        check_rollout(TRAINER, [[-0.5, -1.0, -2.0], [-0.25]], ["3", "2"], version="3", threshold=1.0)
    # no version to expect (the guard off): only the numbers
    assert check_rollout(TRAINER, ENGINE, ["3", "2"], version=None, threshold=float("inf"))[
        "rollout/engine_trainer_logprob_diff_max"
    ] == pytest.approx(0.5)


def test_a_mismatch_found_on_rank_0_reaches_every_rank_as_itself():
    # single process: _from_driver raises what rank 0 met (with several ranks, after the broadcast)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        with pytest.raises(WeightSyncMismatch, match="expected '3'"):
            _from_driver(lambda: check_rollout(TRAINER, ENGINE, ["2", "2"], version="3", threshold=1.0))
    finally:
        dist.destroy_process_group()
    back = pickle.loads(pickle.dumps(WeightSyncMismatch("x")))
    assert isinstance(back, WeightSyncMismatch) and str(back) == "x"


def _cfg(*overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, list(overrides))


def test_probes_every_nth_sync_and_always_before_an_eval_and_after_the_last_step():
    cfg = _cfg("run.steps=20", "run.eval_every=8", "rollout.guard_every=3", "rollout.guard_prompts=2")
    probed = [step + 1 for step in range(20) if _probes(cfg, step)]
    assert probed == [3, 6, 8, 9, 12, 15, 16, 18, 20]
    every = _cfg("run.steps=5", "run.eval_every=0")  # the default: every sync
    assert [s + 1 for s in range(5) if _probes(every, s)] == [1, 2, 3, 4, 5]
    off = _cfg("run.steps=5", "rollout.guard_prompts=0")
    assert not any(_probes(off, s) for s in range(5))
    with pytest.raises(ConfigError, match=r"rollout\.guard_every"):
        _cfg("rollout.guard_every=0")


def test_step_times_fill_every_phase_and_leave_the_gaps_in_other():
    row = {"time/generate_s": 0.25, "time/train_s": 0.5}
    _close_step_times(row, t0=0.0)  # perf_counter() - 0: a step "as long as" the process's clock
    assert set(PHASES) <= set(row)
    assert all(row[k] == 0.0 for k in PHASES if k not in ("time/generate_s", "time/train_s"))
    assert row["time/other_s"] == pytest.approx(row["time/step_s"] - 0.75)
