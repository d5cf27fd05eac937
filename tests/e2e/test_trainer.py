"""`megatron-sapo train` end to end, through the real console script (tiny sizes, a few steps each).

- every loss name finishes 3 steps and writes the documented files; the final hf/ loads in transformers
  and equals the trained policy's export;
- the real SGLang engine (the default) runs 2 steps at sampling temperature 0.7 (trainer log-probs at T);
- SIGKILL after a step past the last checkpoint, rerun the same command: the resumed steps reproduce the
  uninterrupted run, in metrics.jsonl and in TensorBoard (each step once);
- a malformed dataset row is one error line naming file and row; a reward that raises or hangs is a
  0 reward and a counted error/timeout, never a dead run.
Run: `python -m pytest tests/e2e/test_trainer.py -q` (~5 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "megatron_sapo.cli", "train", str(ROOT / "configs/quickstart.yaml")]
TINY = [
    "sft.steps=2",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.sampling.max_new_tokens=6",
    "rollout.guard_prompts=1",
    "data.synthetic.n_train=32",
    "data.synthetic.n_eval=8",
    "run.eval_every=2",
]


def train(out: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*CLI, f"run.output_dir={out}", *TINY, *overrides],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _logged(out: Path, step: int) -> bool:
    """Whether metrics.jsonl already has `step` (tolerates a line being written)."""
    try:
        return any(json.loads(x)["step"] == step for x in (out / "metrics.jsonl").read_text().splitlines())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def tb_scalars(out: Path, tag: str) -> dict[int, float]:
    """A tag's (step -> value) as TensorBoard itself reads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    events = acc.Scalars(tag)
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"{tag}: a step appears twice in TensorBoard: {steps}"
    return {e.step: e.value for e in events}


@pytest.mark.parametrize("loss", ["sapo", "gspo", "gspo_token", "grpo"])
def test_three_steps_each_loss_writes_outputs(loss, tmp_path) -> None:
    out = tmp_path / loss
    train(out, f"loss.name={loss}", "rollout.engine=transformers", "run.steps=3")
    r = rows(out)
    assert [x["step"] for x in r] == [0, 1, 2, 3]
    assert "eval/accuracy" in r[0] and "eval/accuracy" in r[2] and "eval/accuracy" in r[3]
    for x in r[1:]:
        for key in ("reward/mean", "loss", "grad_norm", "time/step_s", "sync/logprob_diff_max"):
            assert key in x, (key, x)
        assert x["sync/logprob_diff_max"] < 1e-4  # the engine serves the updated weights
    if loss == "sapo":
        assert 0 < r[1]["sapo/gate_mean"] <= 1
        for tag in ("reward/mean", "sapo/gate_mean", "eval/accuracy"):  # TensorBoard has what jsonl has
            want = {x["step"]: x[tag] for x in r if tag in x}
            assert tb_scalars(out, tag) == pytest.approx(want, rel=1e-6), tag
    assert {p.name for p in (out / "plots").iterdir()} >= {
        "reward.png",
        "eval_accuracy.png",
        "diagnostics.png",
    }
    assert (out / "config.yaml").is_file() and (
        out / "checkpoints" / "latest_checkpointed_iteration.txt"
    ).is_file()
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(out / "hf")  # loads, with per-expert checkpoint names
    start = AutoModelForCausalLM.from_pretrained(out / "hf_init")
    moved = [n for n, p in final.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert moved, "the final checkpoint equals the initial one: training changed nothing"


def test_sglang_engine_two_steps_at_temperature(tmp_path) -> None:
    """The real SGLang engine, sampling at T = 0.7: the trainer's log-probs are of softmax(logits / 0.7),
    as SGLang reports them (T = 1 with SGLang runs in tests/e2e/test_multirank.py and tests/slurm/)."""
    train(tmp_path, "run.steps=2", "rollout.sampling.temperature=0.7")
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [0, 1, 2]
    for x in r[1:]:
        assert x["sync/logprob_diff_max"] < 1e-4  # the guard samples at 0.7 and the trainer scores at 0.7
        assert x["rollout/engine_trainer_logprob_diff_mean"] < 1e-4  # pi_old vs the rollouts' own log-probs
    assert list((tmp_path / "logs").glob("sglang-*.log"))


def test_resume_after_sigkill_reproduces_the_run(tmp_path) -> None:
    args = ["rollout.engine=transformers", "run.steps=4", "run.save_every=2", "run.eval_every=0"]
    train(tmp_path / "full", *args)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [*CLI, f"run.output_dir={out}", *TINY, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    # killed after step 3 was logged, past the step-2 checkpoint: the rerun redoes step 3
    while not _logged(out, step=3):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before its step 3"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    train(out, *args)
    full, resumed = rows(tmp_path / "full"), rows(out)
    assert [x["step"] for x in resumed] == [0, 1, 2, 3, 4]
    for a, b in zip(full, resumed):
        for key in ("reward/mean", "loss", "grad_norm", "eval/accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a["step"], key)
    # TensorBoard shows each step once, with the resumed run's values (redone steps purged)
    assert tb_scalars(out, "loss") == pytest.approx({x["step"]: x["loss"] for x in resumed[1:]}, rel=1e-6)


def test_malformed_dataset_row_is_one_error_line(tmp_path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "What is 1 + 1?", "answer": "2"}\n{"prompt": "oops"\n')
    proc = train(tmp_path / "out", f"data.train_path={data}", "rollout.engine=transformers", check=False)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{data}:2:" in last and "Traceback" not in proc.stderr


def test_reward_that_raises_or_hangs_does_not_kill_the_run(tmp_path) -> None:
    mod = tmp_path / "bad_rewards.py"
    mod.write_text(
        "import time\n"
        "def flaky(text, record):\n"
        "    if len(text) % 2:\n"
        "        raise ValueError('boom')\n"
        "    time.sleep(30)\n"
        "    return 1.0\n"
    )
    env_path = f"{tmp_path}{os.pathsep}{ROOT}"
    proc = subprocess.run(
        [
            *CLI,
            f"run.output_dir={tmp_path / 'out'}",
            *TINY,
            "rollout.engine=transformers",
            "run.steps=1",
            "reward.name=python:bad_rewards:flaky",
            "reward.timeout_s=0.5",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": env_path},
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = rows(tmp_path / "out")
    assert r[-1]["step"] == 1 and r[-1]["reward/mean"] == 0.0
    assert r[-1]["reward/errors"] + r[-1]["reward/timeouts"] == 16
