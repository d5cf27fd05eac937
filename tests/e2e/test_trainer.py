"""`megatron-sapo train` end to end, through the real console script (tiny sizes, a few steps each).

- every loss name finishes 3 steps and writes the documented files; the final hf/ loads in transformers
  and equals the trained policy's export; GSPO runs with TIS and GRPO with MIS rollout correction;
- the real SGLang engine (the default) runs 2 steps at sampling temperature 0.7 (trainer log-probs at T),
  with nothing on stderr that looks like a failure (third-party warnings, tracebacks, errors);
- SIGKILL after a step past the last checkpoint, rerun the same command: the resumed steps reproduce the
  uninterrupted run, in metrics.jsonl and in TensorBoard (each step once); so does a kill before, inside
  the first save or inside the final export (tests/e2e/_killed_train.py); a truncated newest checkpoint is
  set aside and the previous one resumes; disk full (a real tmpfs) in a save or in the final export is one
  error line and exit 2;
- a malformed dataset row is one error line naming file and row; a reward that raises or hangs is a
  0 reward and a counted error/timeout, never a dead run.
Run: `python -m pytest tests/e2e/test_trainer.py -q` (~5 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
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
    "rollout.guard_every=1",  # probe every sync (the quickstart probes before evals only)
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


CORRECTION = {"gspo": "tis", "grpo": "mis"}
"""Two of the runs below also weight their loss by the rollout correction (tests/unit/test_rollout_correction.py
checks the math): the engine's log-probs must reach the loss through the scatter and the micro-batches."""


@pytest.mark.parametrize("loss", ["sapo", "gspo", "gspo_token", "grpo"])
def test_three_steps_each_loss_writes_outputs(loss, tmp_path) -> None:
    out = tmp_path / loss
    correction = CORRECTION.get(loss, "off")
    train(
        out,
        f"loss.name={loss}",
        f"loss.rollout_correction={correction}",
        "rollout.engine=transformers",
        "run.steps=3",
    )
    r = rows(out)
    for x in r[1:]:
        # the in-process engine is the trainer's policy: mu = pi_old up to rounding, every weight ~1
        assert ("rollout_correction/weight_mean" in x) == (correction != "off"), x
        if correction != "off":
            assert x["rollout_correction/weight_mean"] == pytest.approx(1.0, abs=1e-4)
            assert 0 < x["rollout_correction/abs_log_ratio_mean"] < 1e-4  # mu really arrived (not pi_old)
            fraction = "truncated_fraction" if correction == "tis" else "masked_fraction"
            assert x[f"rollout_correction/{fraction}"] == 0.0
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
        "time.png",  # the step's time split, stacked
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
    as SGLang reports them (T = 1 with SGLang runs in tests/e2e/test_multirank.py and tests/slurm/).
    The demo's path: nothing on stderr looks like a failure (warnings, tracebacks, errors) when none happened."""
    proc = train(tmp_path, "run.steps=3", "rollout.sampling.temperature=0.7", "rollout.guard_every=3")
    noise = [x for x in proc.stderr.splitlines() if re.search(r"Warning|Traceback|ERROR|[Ee]rror:", x)]
    assert not noise, noise
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [0, 1, 2, 3]
    # guard_every 3 with evals at 2 and 3: the sync after step 1 is checked by step 2's rollout only
    assert [x["step"] for x in r[1:] if "sync/logprob_diff_max" in x] == [2, 3]
    for x in r[1:]:
        assert x.get("sync/logprob_diff_max", 0) < 1e-4  # the guard samples at 0.7, the trainer scores at 0.7
        assert x["rollout/engine_trainer_logprob_diff_max"] < 1e-4  # pi_old vs the rollouts' own log-probs
    from megatron_sapo.train.loop import PHASES

    for x in r[1:]:  # the step's wall time split into phases that do not overlap, the gaps in time/other_s
        assert all(x[k] >= 0 for k in PHASES), x
        assert 0 <= x["time/other_s"] < x["time/step_s"], x
        assert x["time/step_s"] == pytest.approx(sum(x[k] for k in PHASES) + x["time/other_s"])
        for k in ("time/generate_s", "time/reward_s", "time/logprobs_s", "time/train_s", "time/export_s"):
            assert x[k] > 0, (k, x)
        assert x["time/rollout_s"] >= x["time/generate_s"] + x["time/reward_s"]
        assert x["time/sync_s"] == pytest.approx(x["time/export_s"] + x["time/load_s"])
        assert (x["time/guard_s"] > 0) == ("sync/logprob_diff_max" in x), x
        assert (x["time/eval_s"] > 0) == ("eval/accuracy" in x), x
        assert (x["time/checkpoint_s"] > 0) == (x["step"] == 3), x  # saved at the last step only
        assert x["rollout/generated_tokens"] == pytest.approx(
            x["rollout/response_len"] * x["rollout/samples"]
        )
    assert list((tmp_path / "logs").glob("sglang-*.log"))


def kill_after_step(out: Path, step: int, *overrides: str) -> None:
    """Start the CLI run into `out` and SIGKILL its whole process group once `step` is in metrics.jsonl."""
    proc = subprocess.Popen(
        [*CLI, f"run.output_dir={out}", *TINY, *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not _logged(out, step=step):
        assert proc.poll() is None and time.monotonic() < deadline, f"run ended before its step {step}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_resume_after_sigkill_reproduces_the_run(tmp_path) -> None:
    args = ["rollout.engine=transformers", "run.steps=4", "run.save_every=2", "run.eval_every=0"]
    train(tmp_path / "full", *args)
    out = tmp_path / "killed"
    kill_after_step(out, 3, *args)  # past the step-2 checkpoint: the rerun redoes step 3
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


KILL_ARGS = ["rollout.engine=transformers", "run.steps=2", "run.save_every=1", "run.eval_every=1"]


@pytest.mark.parametrize("point", ["first_save", "mid_save", "mid_export"])
def test_rerun_after_a_kill_logs_every_step_once(tmp_path, point) -> None:
    """Killed as the first save begins, inside it, or inside the final export: the rerun's metrics.jsonl and
    TensorBoard hold steps 0, 1, 2 once each (kill points patched in tests/e2e/_killed_train.py)."""
    helper = [sys.executable, str(Path(__file__).with_name("_killed_train.py")), point, *CLI[-1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run(
        [*helper, f"run.output_dir={tmp_path}", *TINY, *KILL_ARGS], capture_output=True, env=env, timeout=900
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    # a step's row is written after its checkpoint: a kill in the first save leaves only step 0's row
    assert {"first_save": [0], "mid_save": [0], "mid_export": [0, 1, 2]}[point] == [
        x["step"] for x in rows(tmp_path)
    ]
    assert (tmp_path / "checkpoints" / "iter_0000001.tmp").is_dir() == (point == "mid_save")
    proc = train(tmp_path, *KILL_ARGS)
    assert [x["step"] for x in rows(tmp_path)] == [0, 1, 2]
    for tag in ("eval/accuracy", "reward/mean"):  # each step once (tb_scalars asserts it), as in the jsonl
        want = {x["step"]: x[tag] for x in rows(tmp_path) if tag in x}
        assert tb_scalars(tmp_path, tag) == pytest.approx(want, rel=1e-6), tag
    assert ("resuming from checkpoint" in proc.stderr) == (point == "mid_export")
    assert not (tmp_path / "hf.tmp").exists() and (tmp_path / "hf" / "config.json").is_file()


def test_truncated_newest_checkpoint_resumes_from_the_previous(tmp_path) -> None:
    train(tmp_path, *KILL_ARGS)
    newest = tmp_path / "checkpoints" / "iter_0000002"
    os.truncate(newest / "__0_0.distcp", 1_000_000)
    proc = train(tmp_path, *KILL_ARGS[:-3], "run.steps=3", "run.save_every=1", "run.eval_every=1")
    lines = proc.stderr.splitlines()
    [bad] = [x for x in lines if "does not load" in x]
    assert f"checkpoint {newest} does not load (damaged: __0_0.distcp (1000000 of" in bad
    assert bad.endswith("kept aside as iter_0000002.corrupt")
    assert f"resuming from checkpoint {tmp_path / 'checkpoints' / 'iter_0000001'} at step 1 of 3" in lines
    assert (tmp_path / "checkpoints" / "iter_0000002.corrupt" / "__0_0.distcp").stat().st_size == 1_000_000
    assert [x["step"] for x in rows(tmp_path)] == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "iter_0000002",
        "iter_0000002.corrupt",
        "iter_0000003",
        "latest_checkpointed_iteration.txt",
    ]


@pytest.fixture
def tmpfs(tmp_path):
    """A directory on a fresh tmpfs of the size asked for (as root: CI runs the tests as root)."""
    mounted = []

    def mount(size: str) -> Path:
        path = tmp_path / f"tmpfs{len(mounted)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


# 2m: hf_init (~0.7 MB) fits, the first checkpoint (~2.9 MB) fails in its writes; 5m: the second save is
# refused before writing (less free than the first checkpoint's size), the first stays.
@pytest.mark.parametrize("size", ["2m", "5m"])
def test_disk_full_is_one_line_and_exit_2(tmpfs, size) -> None:
    out = tmpfs(size) / "run"
    proc = train(out, *KILL_ARGS, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    # one error line (the progress bar may share it: it redraws with a carriage return, no newline)
    [last] = [x[x.index("megatron-sapo") :] for x in proc.stderr.splitlines() if "megatron-sapo train:" in x]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    ckpt = out / "checkpoints"
    step = 1 if size == "2m" else 2
    assert last.startswith("megatron-sapo train: error: checkpoint not saved: no space left on the device")
    assert f"writing {ckpt / f'iter_{step:07d}'} (" in last and "MB free)" in last
    assert ("needs ~" in last) == (step == 2)  # the size of the previous checkpoint, when there is one
    assert not list(ckpt.glob("*.tmp"))
    if step == 2:
        assert sorted(p.name for p in ckpt.iterdir()) == ["iter_0000001", "latest_checkpointed_iteration.txt"]
        assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_disk_full_in_the_final_export_is_one_line_and_exit_2(tmpfs) -> None:
    """1 step: hf_init (~0.7 MB), the step's checkpoint (~2.9 MB) and the logs fit 4000 KB; the final hf/
    (~0.7 MB) does not. One line naming hf/, exit 2; no partial hf/ or hf.tmp/; the checkpoint stays."""
    out = tmpfs("4000k") / "run"
    proc = train(out, *KILL_ARGS, "run.steps=1", check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [last] = [x[x.index("megatron-sapo") :] for x in proc.stderr.splitlines() if "megatron-sapo train:" in x]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith(
        f"megatron-sapo train: error: final Hugging Face checkpoint not written: no space left on the device "
        f"writing {out / 'hf'} ("
    ), last
    assert "MB free)" in last and "MB of weights had been staged" in last
    assert not (out / "hf").exists() and not (out / "hf.tmp").exists()
    ckpt = out / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "1"
    assert [x["step"] for x in rows(out)] == [0, 1]
