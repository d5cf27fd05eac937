"""`megatron-sapo train` on vision-language prompts end to end (configs/vlm_quickstart.yaml, tiny sizes).

- a jsonl dataset with image paths relative to the file and base64 images: sapo, gspo and grpo each
  finish 3 steps and write the documented outputs; the engine's log-probs of image prompts equal the
  trainer's (pi_old and the probes after each sync, < 1e-4: same pixels, same expanded tokens); the final
  hf/ is an official Qwen3-VL-MoE checkpoint (fused experts) that transformers loads, moved by training;
- two trainer ranks (EP 2, so DP 2): each rank renders its own share's images; the same checks hold;
- SIGKILL after a step past the last checkpoint, rerun: the resumed steps reproduce the uninterrupted run;
- a row naming a missing image file, and one whose image does not decode (found when its batch is
  drawn): one error line naming the file and row, exit 2;
- the real SGLang server: image rollouts, weight sync every step, the guard (< 1e-4 measured; the run's
  threshold is 0.05).
Run: `python -m pytest tests/e2e/test_vlm_trainer.py -q` (~2.5 min on 2 cores).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_sapo.data import VisualTask
from megatron_sapo.utils.spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "megatron_sapo.cli", "train", str(ROOT / "configs/vlm_quickstart.yaml")]
TINY = [
    "sft.steps=2",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.guard_prompts=2",
    "rollout.guard_every=1",  # probe every sync
    "data.synthetic.n_train=32",
    "data.synthetic.n_eval=8",
    "run.eval_every=2",
    "run.progress=false",
]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "TORCHELASTIC"))}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return {**env, "PYTHONPATH": str(ROOT)}


def train(out: Path, *overrides: str, check: bool = True, prefix: list[str] | None = None):
    cmd = [*(prefix or [sys.executable]), *CLI[1:], f"run.output_dir={out}", *TINY, *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_dataset(root: Path, n: int, *, seed: int, name: str) -> Path:
    """`name`.jsonl under `root`: the visual task's records, odd rows with an image file beside the
    dataset (relative path), even rows with the image inline as base64."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.jsonl"
    with path.open("w") as f:
        for i, r in enumerate(VisualTask().records(n, seed=seed)):
            data = _png(r.images[0])
            if i % 2:
                (root / "imgs" / f"{name}-{i}.png").write_bytes(data)
                image = f"imgs/{name}-{i}.png"
            else:
                image = base64.b64encode(data).decode()
            f.write(json.dumps({"question": r.prompt, "images": [image], "answer": r.answer}) + "\n")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("vlm_data")
    train_path = write_dataset(root, 24, seed=1, name="train")
    eval_path = write_dataset(root, 6, seed=2, name="eval")
    return [
        f"data.train_path={train_path}",
        f"data.eval_path={eval_path}",
        "data.prompt_field=question",
        "data.image_fields=[images]",
    ]


def assert_matched(r: list[dict], tol: float = 1e-4) -> None:
    """Engine and trainer agree on every image rollout (pi_old) and on the probes after every sync."""
    for x in r[1:]:
        assert x["rollout/engine_trainer_logprob_diff_max"] < tol, x
        assert x["sync/logprob_diff_max"] < tol, x


@pytest.mark.parametrize("loss", ["sapo", "gspo", "grpo"])
def test_three_steps_each_loss_on_an_image_dataset(loss, dataset, tmp_path) -> None:
    out = tmp_path / loss
    train(out, f"loss.name={loss}", "rollout.engine=transformers", "run.steps=3", *dataset)
    r = rows(out)
    assert [x["step"] for x in r] == [0, 1, 2, 3]
    assert "eval/accuracy" in r[0] and "eval/accuracy" in r[2] and "eval/accuracy" in r[3]
    for x in r[1:]:
        for key in ("reward/mean", "loss", "grad_norm", "time/step_s"):
            assert key in x, (key, x)
    assert_matched(r)
    assert {p.name for p in (out / "plots").iterdir()} >= {"reward.png", "eval_accuracy.png", "time.png"}
    if loss != "sapo":
        return
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForImageTextToText

    with safe_open(out / "hf" / "model.safetensors", "pt") as f:
        names = list(f.keys())
        fused = f.get_tensor("model.language_model.layers.0.mlp.experts.gate_up_proj")
    text = AutoConfig.from_pretrained(out / "hf").get_text_config()
    # the official orientation [E, H, 2I], not transformers' in-memory [E, 2I, H]; no per-expert names
    assert tuple(fused.shape) == (text.num_experts, text.hidden_size, 2 * text.moe_intermediate_size)
    assert not [n for n in names if ".experts.0." in n]
    final = AutoModelForImageTextToText.from_pretrained(out / "hf")
    start = AutoModelForImageTextToText.from_pretrained(out / "hf_init")
    moved = [n for n, p in final.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert any(".experts." in n for n in moved) and any("visual." in n for n in moved), moved


def test_two_ranks_render_their_own_images(dataset, tmp_path) -> None:
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    launch += ["--master-port", str(free_port())]
    train(tmp_path, "parallel.ep=2", "rollout.engine=transformers", "run.steps=2", *dataset, prefix=launch)
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [0, 1, 2]
    assert_matched(r)


def _logged(out: Path, step: int) -> bool:
    try:
        return any(json.loads(x)["step"] == step for x in (out / "metrics.jsonl").read_text().splitlines())
    except (FileNotFoundError, json.JSONDecodeError):
        return False


def test_resume_after_sigkill_reproduces_the_run(tmp_path) -> None:
    args = ["rollout.engine=transformers", "run.steps=4", "run.save_every=2", "run.eval_every=0"]
    train(tmp_path / "full", *args)
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*CLI, f"run.output_dir={out}", *TINY, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=_env(),
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not _logged(out, step=3):  # killed past the step-2 checkpoint: the rerun redoes step 3
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


def test_bad_image_rows_are_one_error_line(tmp_path) -> None:
    root = tmp_path / "data"
    path = write_dataset(root, 8, seed=3, name="train")
    good = path.read_text().splitlines()

    def write_with(row: int, image: str) -> None:
        lines = list(good)
        record = json.loads(lines[row - 1])
        record["images"] = [image]
        lines[row - 1] = json.dumps(record)
        path.write_text("\n".join(lines) + "\n")

    write_with(3, "imgs/missing.png")  # a file that is not there: found when the dataset is read
    base = [
        f"data.train_path={path}",
        "data.prompt_field=question",
        "data.image_fields=[images]",
        "rollout.engine=transformers",
        "sft.steps=0",
    ]
    proc = train(tmp_path / "a", *base, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{path}:3:" in last and "missing.png" in last and "Traceback" not in proc.stderr

    # row 6: a file that exists but does not decode: read fine, refused when its batch is rendered,
    # before anything is generated or trained from that batch
    (root / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    write_with(6, "imgs/broken.png")
    proc = train(tmp_path / "b", *base, "rollout.prompts_per_step=8", "run.steps=1", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert f"{path}:6:" in last and "decode" in last and "Traceback" not in proc.stderr
    assert not (tmp_path / "b" / "metrics.jsonl").exists() or len(rows(tmp_path / "b")) == 1  # step 0 only


def test_sglang_image_rollouts_pass_the_guard(tmp_path) -> None:
    """The quickstart's path: the real SGLang CPU server gets the image prompts (text + images) and the
    policy's weights after every step; its log-probs equal the trainer's on the same pixels and tokens."""
    proc = train(tmp_path, "run.steps=2")
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [0, 1, 2]
    assert_matched(r)
    assert "Traceback" not in proc.stderr
