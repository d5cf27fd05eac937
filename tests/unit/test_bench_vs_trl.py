"""benchmarks/bench_vs_trl.py without TRL: the job's knobs as megatron-sapo overrides and as GRPOConfig
arguments, and the result table with its ratios."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", ROOT / "benchmarks" / "bench_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    assert "trl" not in sys.modules  # importing the benchmark loads no TRL (CI does not install it)
    return module


def _quickstart_cfg():
    """The knobs of configs/quickstart.yaml as megatron-sapo resolves them (only those the bench reads)."""
    sampling = SimpleNamespace(max_new_tokens=4, temperature=1.0)
    return SimpleNamespace(
        rollout=SimpleNamespace(prompts_per_step=16, samples_per_prompt=8, sampling=sampling),
        optim=SimpleNamespace(
            lr=3e-4,
            warmup_steps=40,
            clip_grad=1.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_eps=1e-8,
            weight_decay=0.0,
        ),
        loss=SimpleNamespace(params={}, mini_batches=4),
        run=SimpleNamespace(seed=0),
    )


def test_trl_gets_the_same_batches_and_optimizer_steps(bench, tmp_path):
    job = bench.job_from_config(_quickstart_cfg(), steps=500)
    kw = bench.trl_kwargs(job, tmp_path)
    # GRPOConfig.__post_init__ (1 process): generation_batch_size = per_device × steps_per_generation
    assert kw["per_device_train_batch_size"] * kw["steps_per_generation"] == 16 * 8
    assert kw["gradient_accumulation_steps"] == 1 and kw["steps_per_generation"] == 4
    assert kw["num_generations"] == 8 and kw["num_iterations"] == 1
    assert kw["max_steps"] == 2000 == 500 * 4  # TRL counts optimizer steps
    assert kw["max_completion_length"] == 4 and kw["temperature"] == 1.0 and kw["top_k"] == 0
    assert (kw["loss_type"], kw["sapo_temperature_pos"], kw["sapo_temperature_neg"]) == ("sapo", 1.0, 1.05)
    assert kw["beta"] == 0.0 and kw["router_aux_loss_coef"] == 0.0 and kw["scale_rewards"] == "group"
    assert (kw["learning_rate"], kw["warmup_steps"], kw["lr_scheduler_type"]) == (3e-4, 40, "cosine")
    assert (kw["max_grad_norm"], kw["weight_decay"], kw["adam_epsilon"]) == (1.0, 0.0, 1e-8)
    assert kw["shuffle_dataset"] is False and kw["bf16"] is False and kw["use_cpu"] is True


def test_ours_decays_over_the_same_optimizer_steps(bench, tmp_path):
    job = bench.job_from_config(_quickstart_cfg(), steps=20)
    overrides = bench.ours_overrides(job, tmp_path / "start", tmp_path / "ours")
    assert "optim.decay_steps=80" in overrides and "run.steps=20" in overrides
    assert "sft.steps=0" in overrides and f"model.path={tmp_path / 'start'}" in overrides


def test_mini_batches_must_split_the_rollout_batch(bench, tmp_path):
    cfg = _quickstart_cfg()
    cfg.loss.mini_batches = 3
    with pytest.raises(ValueError, match="do not split"):
        bench.trl_kwargs(bench.job_from_config(cfg, steps=1), tmp_path)


def test_table_rows_and_ratios(bench):
    ours = bench.Side("megatron-sapo", [0.5, 0.4, 0.6], 10.0, 900, 2000.0, 0.75, 0.3, 0.7, cpu_s=6.0)
    trl = bench.Side("trl", [1.0, 0.8, 1.2], 4.0, 900, 1000.0, 1.5, 0.3, 0.5)
    assert ours.row()["steps_per_s_median"] == pytest.approx(2.0)
    assert ours.row()["overhead_s"] == pytest.approx(8.5)
    assert ours.row()["gen_tokens_per_s"] == pytest.approx(600.0)
    assert ours.row()["cpu_s_per_step"] == pytest.approx(2.0)
    table = bench.format_table("quickstart", 3, [ours, trl])
    assert "0.30 -> 0.70 (+40 points)" in table and "0.30 -> 0.50 (+20 points)" in table
    assert "steps_per_s_median 2.00x" in table and "steps_per_s_whole 0.40x" in table
    assert "peak_rss_mib 2.00x" in table and "accuracy gain difference +20 points" in table
