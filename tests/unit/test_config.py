"""Typed run config: YAML + dotted overrides → typed fields, round trip, one-line errors, `train --help`.

Run: python -m pytest tests/unit/test_config.py -q
"""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from unittest.mock import ANY

import pytest

from megatron_sapo.cli import main
from megatron_sapo.losses import loss_parameters
from megatron_sapo.megatron.engine import LossConfig, OptimConfig
from megatron_sapo.rollout.config import RolloutConfig
from megatron_sapo.rollout.server import ServerConfig
from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.utils.typed_config import (
    ConfigError,
    config_keys,
    describe_config,
    dump_config,
    field_docs,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _sections(cls: type) -> list[type]:
    """Every dataclass reachable from `cls` through its fields' type hints (including `cls`)."""
    out, todo = [], [cls]
    while todo:
        klass = todo.pop()
        if klass in out:
            continue
        out.append(klass)
        for tp in typing.get_type_hints(klass).values():
            todo += [t for t in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(t)]
    return out


def test_sampling_temperature_reaches_the_trainer_and_must_be_positive():
    cfg = load_config(TrainJobConfig, None, ["rollout.sampling.temperature=0.7"])
    assert cfg.rollout.sampling.temperature == 0.7
    for bad in ("0", "-0.5", "nan", "inf"):  # -0.5: SamplingParams' own check; the rest TrainJobConfig's
        with pytest.raises(ConfigError, match=r"^rollout\.sampling\.temperature: must be >=? 0") as exc:
            load_config(TrainJobConfig, None, [f"rollout.sampling.temperature={bad}"])
        assert "\n" not in str(exc.value)


def test_yaml_then_overrides_land_in_typed_fields(tmp_path):
    path = _write(
        tmp_path,
        """
model:
  path: /models/qwen3
parallel: {tp: 2, sequence_parallel: true}
rollout:
  samples_per_prompt: 16
  sampling:
    top_p: 0.9             # max_new_tokens keeps RolloutConfig's default (32), not SamplingParams' 128
optim:
  lr: 1e-6                 # PyYAML reads this as a string; the float field takes it
loss:
  name: grpo
  routing_replay: off      # YAML 1.1 would make this False
run:
  steps: 5
""",
    )
    cfg = load_config(
        TrainJobConfig,
        path,
        [
            "rollout.sampling.top_p=0.7",
            "model.path=null",
            "run.steps=3",
            "rollout.urls=[http://10.0.0.1:30000, http://10.0.0.2:30000]",
            "loss.params.eps_high=0.28",
            "data.system_prompt=Answer: with a number",  # a YAML mapping, not a str: taken as text
            "data.synthetic.ops=[+, '*']",
        ],
    )
    assert cfg.model.path is None
    assert (cfg.parallel.tp, cfg.parallel.sequence_parallel) == (2, True)
    assert cfg.rollout.samples_per_prompt == 16
    assert cfg.rollout.sampling.top_p == 0.7
    assert cfg.rollout.sampling.max_new_tokens == RolloutConfig().sampling.max_new_tokens == 32
    assert cfg.rollout.urls == ["http://10.0.0.1:30000", "http://10.0.0.2:30000"]
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == 1e-6
    assert cfg.loss.routing_replay == "off"
    assert cfg.loss.params == {"eps_high": 0.28}
    assert loss_parameters("grpo") | cfg.loss.params == {"eps_low": 0.2, "eps_high": 0.28}
    assert cfg.data.system_prompt == "Answer: with a number"
    assert cfg.data.synthetic.ops == ("+", "*")  # tuple[str, ...] in ArithmeticTask
    assert cfg.data.synthetic.records(1, seed=0)[0].prompt.startswith("What is")
    assert cfg.run.steps == 3
    assert isinstance(cfg.optim, OptimConfig)


def test_loss_params_default_per_loss():
    def params(*overrides):
        loss = load_config(TrainJobConfig, None, list(overrides)).loss
        return loss_parameters(loss.name) | loss.params  # what the loss function runs with

    assert params() == {"tau_pos": 1.0, "tau_neg": 1.05}
    assert params("loss.params.tau_neg=1.1") == {"tau_pos": 1.0, "tau_neg": 1.1}
    assert params("loss.name=gspo") == {"eps_low": 3e-4, "eps_high": 4e-4}
    assert params("loss.name=gspo_token", "loss.params={eps_high: 5e-4}") == {
        "eps_low": 3e-4,
        "eps_high": 5e-4,
    }


def test_dump_load_round_trip(tmp_path):
    cfg = load_config(
        TrainJobConfig,
        QUICKSTART,
        [
            "rollout.sampling.stop=['\\n\\n', '<|im_end|>']",
            "rollout.server.extra_args=[--log-level, warning]",
            "rollout.server.weight_version=7",
            "loss.routing_replay=r2",
            "optim.adam_eps=1e-12",
            "parallel.vpp=2",
            "parallel.pp=2",
            "run.wandb_project=sapo",
            "data.synthetic.ops=['*']",
            "data.answer_extract=gsm8k",
        ],
    )
    assert cfg.rollout.server.weight_version == "7"
    again = load_config(TrainJobConfig, _write(tmp_path, dump_config(cfg)))
    assert again == cfg
    assert dump_config(again) == dump_config(cfg)


def test_quickstart_loads_and_lists_only_non_defaults():
    cfg = load_config(TrainJobConfig, QUICKSTART)
    assert cfg.model.path is None and cfg.model.tiny.architecture == "qwen3_moe"
    assert cfg.loss.name == "sapo" and cfg.loss.mini_batches == 4
    assert cfg.sft.steps > 0 and cfg.run.output_dir == "outputs/quickstart"
    import yaml

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    defaults = {k.key: k.default for k in config_keys(TrainJobConfig)}
    for key, value in leaves(yaml.safe_load(QUICKSTART.read_text())):
        assert defaults[key] != value, f"{key} repeats its default in quickstart.yaml"


ERRORS = [
    (["rollout.samples_per_prompt=eight"], "rollout.samples_per_prompt: expected int, got 'eight'"),
    (["rollout.n_sample=3"], "unknown key 'rollout.n_sample'"),
    (["rollout.samples_per_promt=3"], "(did you mean 'rollout.samples_per_prompt'?)"),
    (["rollout.lr=3"], "(did you mean 'optim.lr' or 'sft.lr'?)"),
    (["loss.name=ppo"], "loss.name: 'ppo' is not one of"),
    (["model.dtype=fp16"], "model.dtype: 'fp16' is not one of float32, bfloat16"),
    (["run.tensorboard=maybe"], "run.tensorboard: expected bool, got 'maybe'"),
    (["run.steps=1.5"], "run.steps: expected int, got 1.5"),
    (["run.steps=-1"], "run.steps: must be >= 0, got -1"),
    (["rollout.guard_every=0"], "rollout.guard_every: must be >= 1, got 0"),
    (["optim.lr=fast"], "optim.lr: expected float, got 'fast'"),
    (["parallel.vpp=2"], "parallel.vpp: needs parallel.pp > 1"),
    (["rollout.sampling.max_new_tokens=0"], "rollout.sampling.max_new_tokens: must be >= 1"),
    (["rollout.weight_sync.transport=disk"], "rollout.weight_sync.disk_dir: is required"),
    (["rollout.server.device=tpu"], "rollout.server.device: 'tpu' is not one of cpu, cuda"),
    (["rollout.urls=[localhost]"], "rollout.urls[0]: not an http(s) URL"),
    (["rollout.sampling.stop_token_ids=[1, x]"], "rollout.sampling.stop_token_ids[1]: expected int, got 'x'"),
    (["loss.params.tau=2"], "loss.params: unknown parameter tau (loss 'sapo' takes tau_pos, tau_neg)"),
    (["loss.params.tau_pos=hot"], "loss.params.tau_pos: expected float, got 'hot'"),
    (["loss.mini_batches=3"], "loss.mini_batches: 3 does not divide the rollout batch"),
    (["reward.name=python:nomodule"], "reward.name: 'python:nomodule' is not of the form"),
    (["model=3"], "model: expected a mapping of keys, got int"),
    (["run.steps.x=1"], "run.steps: expected int, got dict"),
    (["run.steps"], "override 'run.steps': expected dotted.key=value"),
    (["data.synthetic.ops=[+, /]"], "data.synthetic: ops must be a non-empty subset"),
    (["data.synthetic.n_train=0"], "data.synthetic.n_train: must be >= 1, got 0"),
    (["data.answer_extract=gsm"], "data.answer_extract: 'gsm' is not one of none, gsm8k"),
    (["data.format=jsonl"], "data.train_path: required for data.format 'jsonl'"),
    (["reward.name=bleu"], "reward.name: 'bleu' is not one of math_verify, exact_match, python:"),
    (["model.tiny.kv_heads=3"], "model.tiny.kv_heads: 3 does not divide heads=4"),
    (["rollout.max_staleness=-1"], "rollout.max_staleness: must be >= 0, got -1"),
    (
        ["rollout.max_staleness=1", "rollout.server.device=cuda"],  # the job's own colocated CUDA servers
        "rollout.max_staleness: asynchronous rollouts need engines that keep their GPUs",
    ),
    (["loss.rollout_correction=is"], "loss.rollout_correction: 'is' is not one of off, tis, mis"),
    (["rollout.partial=true"], "rollout.partial: interrupts generations that run beside training: needs"),
    (
        [
            "rollout.partial=true",
            "rollout.max_staleness=1",
            "data.synthetic.task=visual",
            "model.tiny.architecture=qwen3_vl",
            "model.tiny.layers=3",
        ],
        "rollout.partial: continues samples from token ids: not with image prompts",
    ),
]


@pytest.mark.parametrize(("overrides", "expected"), ERRORS, ids=[e[0][0] for e in ERRORS])
def test_errors_are_one_line_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as exc:
        load_config(TrainJobConfig, None, overrides)
    message = str(exc.value)
    assert expected in message
    assert "\n" not in message


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file .*nope\.yaml: not found"):
        load_config(TrainJobConfig, tmp_path / "nope.yaml")
    bad = _write(tmp_path, "run:\n  steps: 3\n  seed: [1, 2\n")
    with pytest.raises(ConfigError, match=r"config file .*run\.yaml: line \d+: ") as exc:
        load_config(TrainJobConfig, bad)
    assert "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="expected a mapping of sections, got list"):
        load_config(TrainJobConfig, _write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert load_config(TrainJobConfig, _write(tmp_path, "# nothing\n", "empty.yaml")) == TrainJobConfig()


@dataclass
class Inner:
    mode: Literal["a", "b"] = "a"
    """Mode."""
    weights: dict[str, float] = field(default_factory=dict)
    """Weights."""


@dataclass
class Outer:
    name: str
    """Required name."""
    size: int | None = None
    """Optional size."""
    inner: Inner = field(default_factory=lambda: Inner(mode="b"))
    """Inner section (its default differs from Inner's own)."""


def test_generic_machinery_on_any_dataclass_tree():
    cfg = load_config(Outer, None, ["name=x", "inner.weights={w: 2}", "size=4"])
    assert cfg == Outer("x", 4, Inner("b", {"w": 2.0}))
    with pytest.raises(ConfigError, match=r"^name: missing"):
        load_config(Outer, None, [])
    with pytest.raises(ConfigError, match=r"^inner\.mode: 'c' is not one of a, b$"):
        load_config(Outer, None, ["name=x", "inner.mode=c"])
    assert [k.key for k in config_keys(Outer)] == ["name", "size", "inner.mode", "inner.weights"]
    assert "  inner.mode: 'a' | 'b' = \"b\"\n      Mode.\n" in describe_config(Outer)
    assert field_docs(Outer) == {"name": "Required name.", "size": "Optional size.", "inner": ANY}


def test_every_field_has_a_docstring():
    sections = _sections(TrainJobConfig)
    assert len(sections) >= 14
    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in sections
        for f in dataclasses.fields(cls)
        if f.init and not field_docs(cls).get(f.name)
    ]
    assert not missing, f"fields without a docstring: {missing}"


def test_train_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: megatron-sapo train")
    keys = config_keys(TrainJobConfig)
    assert len(keys) > 80
    for k in keys:
        assert f"  {k.key}: {k.type} = " in out, k.key
        assert " ".join(k.doc.split()[:3]) in " ".join(out.split()), k.key


def test_train_saves_resolved_config_and_calls_trainer(tmp_path, monkeypatch):
    seen = []
    trainer = type(sys)("megatron_sapo.train.loop")
    trainer.run = seen.append
    monkeypatch.setitem(sys.modules, "megatron_sapo.train.loop", trainer)
    out = tmp_path / "out"
    assert main(["train", str(QUICKSTART), f"run.output_dir={out}", "run.steps=3"]) == 0
    (cfg,) = seen
    assert cfg.run.steps == 3 and cfg.run.output_dir == str(out)
    assert load_config(TrainJobConfig, out / "config.yaml") == cfg


def test_cli_errors_exit_2_with_one_line(tmp_path):
    """Through the installed console script: no traceback, no import noise, one line naming the key."""
    exe = Path(sys.executable).parent / "megatron-sapo"
    bad_yaml = _write(tmp_path, "run:\n  steps: 3\n bad indent: 1\n")
    cases = {
        "bad key": ([str(QUICKSTART), "rollout.n_sample=3"], "unknown key 'rollout.n_sample'"),
        "bad type": ([str(QUICKSTART), "rollout.samples_per_prompt=eight"], "rollout.samples_per_prompt:"),
        "bad value": ([str(QUICKSTART), "loss.name=ppo"], "loss.name: 'ppo' is not one of"),
        "missing file": ([str(tmp_path / "missing.yaml")], "missing.yaml: not found"),
        "yaml syntax": ([str(bad_yaml)], "run.yaml: line 3:"),
    }
    for name, (args, expected) in cases.items():
        proc = subprocess.run(
            [str(exe), "train", *args, f"run.output_dir={tmp_path / 'out'}"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        out, err = proc.stdout, proc.stderr
        assert proc.returncode == 2, (name, err)
        assert "Traceback" not in err and out == "", (name, err)
        assert len(err.strip().splitlines()) == 1, (name, err)
        assert expected in err, (name, err)
        assert err.startswith("megatron-sapo train: error: ")
    assert not (tmp_path / "out").exists()


def test_sections_build_the_components_objects(tmp_path):
    cfg = load_config(
        TrainJobConfig, None, ["loss.name=grpo", "loss.mini_batches=2", "rollout.server.port=3000"]
    )
    assert cfg.loss == LossConfig(name="grpo", mini_batches=2)  # the engine takes the section as it is
    (tmp_path / "config.json").write_text("{}")
    server = cfg.rollout.server_config(str(tmp_path))
    assert isinstance(server, ServerConfig)
    assert (server.model_path, server.port, server.device) == (str(tmp_path), 3000, "cpu")
    server_keys = {f.name for f in dataclasses.fields(ServerConfig)} - {"model_path"}
    assert {f.name for f in dataclasses.fields(type(cfg.rollout.server))} == server_keys
    assert pickle.loads(pickle.dumps(cfg)) == cfg  # travels to spawned processes


def test_unwritable_output_dir_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", str(QUICKSTART), f"run.output_dir={blocker / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-sapo train: error: run.output_dir: ") and err.count("\n") == 1
