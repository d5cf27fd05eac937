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
The run has partial rollouts on (`rollout.partial`): its rows carry their token-level staleness.

Partial rollouts against a real SGLang server: a pipeline's generation in flight is interrupted by the
trainer's engine access (SGLang's /abort_request), the server loads another checkpoint (version "1"),
and the samples continue. SGLang's aborted requests return their tokens and log-probs so far: every
token's log-prob equals transformers' teacher-forced one under the checkpoint of the version it records.
The pipeline's logic alone: tests/unit/test_pipeline.py, tests/unit/test_partial_rollouts.py.
Run: `python -m pytest tests/e2e/test_async.py -q` (~1 min on 2 cores, plus the session's SGLang servers).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_sapo.rollout.types import SamplingParams
from megatron_sapo.train.pipeline import RolloutPipeline, generate_partial, sample_row
from megatron_sapo.utils.tiny import save_tiny_model, train_tokenizer
from tests.e2e.conftest import tiny_configs
from tests.e2e.test_trainer import kill_after_step, rows, train

ARGS = [
    "rollout.engine=transformers",
    "rollout.max_staleness=1",
    "rollout.partial=true",
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
        # partial rollouts: a token is never older than its sample's oldest token
        assert 0 <= x["rollout/token_staleness_mean"] <= x["rollout/staleness_mean"] + 1e-9, x
        assert x["rollout/partial_samples"] <= x["rollout/samples"], x
    assert r[1]["rollout/staleness_max"] == 0  # the first batch comes from the synced start policy
    assert r[3]["rollout/staleness_max"] == 0  # resumed: regenerated from the checkpoint's weights
    ahead = [x for x in steps if x["rollout/staleness_mean"] == 1]
    assert ahead, "no step trained on samples generated ahead of it"
    for x in ahead:  # mu is the previous version: its gap to pi_old is the last update, far above noise
        assert x["rollout_correction/abs_log_ratio_mean"] > 1e-4, x
        assert x["rollout_correction/weight_mean"] == pytest.approx(1.0, abs=0.2)


@torch.no_grad()
def _teacher_forced(model, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + token_ids])
    logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def test_sglang_partial_rollout_continues_under_the_new_weights(
    reset_weights, tiny_models, tmp_path, monkeypatch
) -> None:
    engine = reset_weights("dense")
    config = tiny_configs()["dense"]
    config.initializer_range = 0.2
    other = save_tiny_model(tmp_path / "v1", config, train_tokenizer(vocab_size=300), seed=2)

    def load(path, version: str) -> None:
        engine.request(
            engine.endpoints[0],
            "POST",
            "/update_weights_from_disk",
            {"model_path": str(path), "weight_version": version},
        )

    load(tiny_models["dense"], "0")  # the trainer's numbering: the sync after step 0 is version 1
    started, generate = threading.Event(), engine.generate

    def observed(*args, **kwargs):
        started.set()
        return generate(*args, **kwargs)

    monkeypatch.setattr(engine, "generate", observed)
    sampling = SamplingParams(max_new_tokens=160, temperature=1.0)
    out = {}

    def produce(step: int, hold) -> tuple[list, dict]:
        out["gens"] = generate_partial(engine, [[5, 6, 7], [40, 41, 42, 43]], sampling, n=6, hold=hold)
        return [sample_row(g, 0.0) for g in out["gens"]], {}

    pipeline = RolloutPipeline(
        produce, first_step=1, last_step=2, max_staleness=1, interrupt=engine.interrupt
    )
    try:
        assert started.wait(60)
        time.sleep(0.5)  # a few dozen tokens in
        t = time.perf_counter()
        with pipeline.engine_access():  # interrupts the generation in flight
            waited = time.perf_counter() - t
            load(other, "1")
        _, stats = pipeline.take(1)
    finally:
        pipeline.close()
        reset_weights("dense")
    gens = out["gens"]
    mixed = [g for g in gens if set(g.token_versions) == {"0", "1"}]
    assert mixed, [g.finish_reason for g in gens]
    assert waited < 5, waited  # interrupted, not waited for (160 tokens x 12 samples take longer)
    assert stats["rollout/partial_samples"] == len(mixed)
    models = {
        version: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for version, path in (("0", tiny_models["dense"]), ("1", other))
    }
    for g in gens:
        assert len(g.token_versions) == len(g.token_ids) == len(g.logprobs) > 0
        assert g.token_versions == sorted(g.token_versions)  # "0"s then "1"s
        logp = torch.tensor(g.logprobs)
        for version, model in models.items():
            own = torch.tensor([v == version for v in g.token_versions])
            if own.any():
                diff = (logp - _teacher_forced(model, g.prompt_ids, g.token_ids))[own].abs().max().item()
                assert diff < 1e-4, (version, diff)  # fp32 CPU server: ~1e-6 (test_sglang_engine.py)
