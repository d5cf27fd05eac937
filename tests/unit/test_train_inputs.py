"""`megatron-sapo train` checks what the config names outside itself before writing anything.

A `model.path` that is not a supported Hugging Face directory and a `reward.name` that does not import a
function are one stderr line naming the key (exit 2, no traceback unless --debug / MEGATRON_SAPO_DEBUG=1),
and `run.output_dir` is not created. Through the installed console script, as a user runs it.

Run: python -m pytest tests/unit/test_train_inputs.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXE = Path(sys.executable).parent / "megatron-sapo"
REWARD_MODULES = {
    "missing_dep_reward": "import no_such_dependency_xyz\n\ndef score(text, record):\n    return 1.0\n",
    "raising_reward": "X = 1\nraise RuntimeError('reward table not downloaded')\n",
    "other_reward": "def something_else(text, record):\n    return 0.0\n",
}


def train(tmp_path: Path, *overrides: str, debug: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    env.pop("MEGATRON_SAPO_DEBUG", None)
    args = [str(ROOT / "configs/quickstart.yaml"), f"run.output_dir={tmp_path / 'out'}", *overrides]
    if debug == "flag":
        args.append("--debug")  # after the overrides, as one adds it to a command line
    if debug == "env":
        env["MEGATRON_SAPO_DEBUG"] = "1"
    return subprocess.run([str(EXE), "train", *args], capture_output=True, text=True, env=env, timeout=300)


def assert_one_line(proc: subprocess.CompletedProcess, tmp_path: Path, *expected: str) -> None:
    err = proc.stderr
    assert proc.returncode == 2, err
    assert "Traceback" not in err and proc.stdout == "", err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("megatron-sapo train: error: "), err
    for text in expected:
        assert text in err, (text, err)
    assert not (tmp_path / "out").exists()  # not even config.yaml


@pytest.fixture
def gpt2_dir(tmp_path: Path) -> Path:
    model = tmp_path / "gpt2"
    model.mkdir()
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2}
    (model / "config.json").write_text(json.dumps(config))
    return model


def test_missing_model_dir_is_one_line(tmp_path):
    proc = train(tmp_path, f"model.path={tmp_path / 'no_such_model'}")
    assert_one_line(proc, tmp_path, f"model.path: directory {tmp_path / 'no_such_model'} does not exist")


def test_model_dir_without_config_json_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = train(tmp_path, f"model.path={tmp_path / 'empty'}")
    assert_one_line(proc, tmp_path, f"model.path: no config.json in {tmp_path / 'empty'}")


def test_unsupported_architecture_is_one_line(tmp_path, gpt2_dir):
    proc = train(tmp_path, f"model.path={gpt2_dir}")
    assert_one_line(
        proc,
        tmp_path,
        "model.path: unknown architecture: model_type='gpt2'",
        "supported: ['llama', 'qwen2_moe'",
    )


@pytest.mark.parametrize(
    ("reward", "expected"),
    [
        (
            "python:no_such_reward_module:score",
            "cannot import module 'no_such_reward_module': not found on the Python path",
        ),
        (
            "python:missing_dep_reward:score",
            "ModuleNotFoundError: No module named 'no_such_dependency_xyz' ({tmp}/missing_dep_reward.py:1)",
        ),
        (
            "python:raising_reward:score",
            "RuntimeError: reward table not downloaded ({tmp}/raising_reward.py:2)",
        ),
        (
            "python:other_reward:score",
            "module 'other_reward' ({tmp}/other_reward.py) has no attribute 'score'",
        ),
    ],
    ids=["module-missing", "imports-missing", "raises-at-import", "function-missing"],
)
def test_reward_that_does_not_import_is_one_line(tmp_path, reward, expected):
    for name, text in REWARD_MODULES.items():
        (tmp_path / f"{name}.py").write_text(text)
    proc = train(tmp_path, f"reward.name={reward}")
    assert_one_line(proc, tmp_path, f"reward.name: '{reward}': ", expected.format(tmp=tmp_path))


@pytest.mark.parametrize("debug", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, gpt2_dir, debug):
    proc = train(tmp_path, f"model.path={gpt2_dir}", debug=debug)
    assert proc.returncode == 2
    assert "Traceback (most recent call last)" in proc.stderr and "ConversionError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("megatron-sapo train: error: model.path: ")
    assert not (tmp_path / "out").exists()
