"""A diverged policy (NaN / inf probabilities) stops the run with one line naming the step, exit 1.

The engine side is tests/unit/test_hf_engine.py (`test_non_finite_policy_raises_policy_diverged`); here
the trainer side (the trainer's log-probs of a rollout), the step the loop adds, the broadcast to other
ranks (pickling) and what the CLI makes of it. A whole run with an absurd learning rate:
tests/e2e/test_divergence.py.

Run: python -m pytest tests/unit/test_policy_diverged.py -q
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import pytest
import torch

from megatron_sapo.cli import main
from megatron_sapo.rollout.types import PolicyDiverged, RolloutError
from megatron_sapo.train.loop import _check_finite, _stop_if_diverged


def test_trainer_log_probs_that_are_not_finite_stop_at_the_step():
    good = [torch.tensor([-0.5, -1.0]), torch.tensor([-2.0])]
    _check_finite(good)
    with pytest.raises(PolicyDiverged) as exc, _stop_if_diverged(4):
        _check_finite([*good, torch.tensor([-1.0, float("nan")]), torch.tensor([float("-inf")])])
    assert exc.value.step == 4
    assert str(exc.value).startswith(
        "policy diverged at step 4: the trainer's log-probs of 2 of 4 rollout samples are not finite "
        "(first: sample 2); stopped before this step's metrics row and checkpoint"
    )


def test_policy_diverged_pickles_with_its_step():
    back = pickle.loads(pickle.dumps(PolicyDiverged("nan logits", 3)))
    assert (back.detail, back.step, str(back)) == ("nan logits", 3, "policy diverged at step 3: nan logits")
    assert isinstance(back, RolloutError)  # the weight-sync guard broadcasts it to every rank as one


def test_cli_prints_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    def run(cfg):
        raise PolicyDiverged("TransformersEngine: non-finite next-token probabilities", 2)

    trainer = type(sys)("megatron_sapo.train.loop")
    trainer.run = run
    monkeypatch.setitem(sys.modules, "megatron_sapo.train.loop", trainer)
    monkeypatch.delenv("MEGATRON_SAPO_DEBUG", raising=False)
    quickstart = str(Path(__file__).resolve().parents[2] / "configs/quickstart.yaml")
    assert main(["train", quickstart, f"run.output_dir={tmp_path / 'out'}", "run.progress=false"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "megatron-sapo train: error: policy diverged at step 2: TransformersEngine: non-finite next-token "
        "probabilities\n"
    )
