"""Partial rollouts (`rollout.partial`) with the real in-process engine: interrupted, continued, versioned.

The worker of a `RolloutPipeline` generates a batch with `generate_partial` on a `TransformersEngine` that
holds model A (version "0"). A forward hook stops the decoding at a known step until the trainer side has
sent its interrupt; the trainer then loads model B (version "1") inside `engine_access`, as the loop's
sync does, and takes the batch. Against independent references:
- every token records a version, versions only go up, some samples span both, all interrupted at the
  same decoding step; the others finished before it, in one version;
- each token's log-prob is the one its own version gives it: transformers' teacher-forced forward of
  prompt + response through model A for the "0" tokens and model B for the "1" tokens (and B differs
  from A there by far more than the tolerance);
- the batch's stats: partial_samples and token_staleness_mean from the versions (closed form);
- an abort nobody asked for is an error, not an endless continuation;
- per-prompt budgets (`max_new_tokens=[...]`) bound each sample;
- a continued sample's text (the loop decodes it) is cut before the first stop string, as the engine's.
SGLang's side (its abort returns the partial tokens and log-probs): tests/e2e/test_async.py.
Run: `python -m pytest tests/unit/test_partial_rollouts.py -q` (seconds).
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from functools import partial

import pytest
import torch

from megatron_sapo.rollout.hf_engine import TransformersEngine
from megatron_sapo.rollout.types import RolloutError, SamplingParams
from megatron_sapo.train.loop import _decode
from megatron_sapo.train.pipeline import RolloutPipeline, Segment, drop_stale, generate_partial, sample_row
from tests.hf_reference import checkpoint_state_dict, qwen3_config, tiny_hf_model
from tests.unit.test_hf_engine import tokenizer

PROMPTS = [[5, 9, 17], [40, 41, 42, 43, 44], [7, 7, 60, 61]]
SAMPLING = SamplingParams(max_new_tokens=24, temperature=1.0, seed=11)
STOP_AT = 6  # the forward pass the interrupt lands in: the prefill and 5 decoding steps, 6 tokens


@torch.no_grad()
def teacher_forced(model, prompt_ids, token_ids) -> torch.Tensor:
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(token_ids)[:, None])[:, 0]


def test_interrupted_samples_continue_under_the_new_weights_with_per_token_versions() -> None:
    config = qwen3_config(eos_token_id=None)
    model_a, model_b = tiny_hf_model(config, seed=0), tiny_hf_model(config, seed=1)
    engine = TransformersEngine(copy.deepcopy(model_a), weight_version="0")
    reached, sent, calls = threading.Event(), threading.Event(), [0]

    def hook(*_):  # the worker's decoding pauses here until the trainer's interrupt is out
        calls[0] += 1
        if calls[0] == STOP_AT:
            reached.set()
            assert sent.wait(10)

    engine.model.register_forward_hook(hook)

    def interrupt() -> None:
        engine.interrupt()
        sent.set()

    out = {}

    def produce(step: int, hold) -> tuple[list, dict]:
        out["gens"] = generate_partial(engine, PROMPTS, SAMPLING, n=2, hold=hold)
        return [sample_row(g, 0.0) for g in out["gens"]], {}

    pipeline = RolloutPipeline(produce, first_step=1, last_step=2, max_staleness=1, interrupt=interrupt)
    try:
        assert reached.wait(30)
        with pipeline.engine_access():  # the loop's sync after step 0: version 1
            engine.update_weights_from_tensors(checkpoint_state_dict(model_b).items(), version="1")
        rows, stats = pipeline.take(1)
    finally:
        pipeline.close()
    gens = out["gens"]
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(p, s) for p in range(3) for s in range(2)]
    mixed = [g for g in gens if set(g.token_versions) == {"0", "1"}]
    assert mixed, "no sample was interrupted"
    # the hook held the 6th forward pass: every interrupted sample has its first 6 tokens from version 0
    assert {g.token_versions.count("0") for g in mixed} == {STOP_AT}
    for g in gens:
        assert len(g.token_versions) == len(g.token_ids) == len(g.logprobs) > 0
        assert g.token_versions == sorted(g.token_versions)  # "0"s then "1"s
        assert g.finish_reason in ("stop", "length") and g.weight_version == g.token_versions[-1]
        logp = torch.tensor(g.logprobs)
        old = torch.tensor([v == "0" for v in g.token_versions])
        ref_a = teacher_forced(model_a, g.prompt_ids, g.token_ids)
        ref_b = teacher_forced(model_b, g.prompt_ids, g.token_ids)
        assert torch.cat([(logp - ref_a)[old], (logp - ref_b)[~old]]).abs().max().item() < 1e-4
        if (~old).any():  # the two versions are far apart: the check above tells them apart
            assert (ref_a - ref_b)[~old].abs().max().item() > 1e-2
    # the batch's metrics, from the versions (step 1: a version-0 token is 1 step old)
    tokens = [v for g in gens for v in g.token_versions]
    assert stats["rollout/partial_samples"] == len(mixed)
    assert stats["rollout/token_staleness_mean"] == pytest.approx(tokens.count("0") / len(tokens))
    assert stats["rollout/staleness_max"] == 1.0 and stats["rollout/dropped_stale"] == 0
    assert len(rows) == len(gens)


def test_drop_stale_counts_tokens_by_their_own_version() -> None:
    rows = [
        ([1, 2, 3, 4], 1, 0.0, [0.0] * 3, "4", None, ["4", "5", "5"]),
        ([1, 2, 3], 1, 0.0, [0.0] * 2, "5", None, ["5", "5"]),
        ([1, 2], 1, 0.0, [0.0], "3", None, ["3"]),  # past the bound at step 5, k = 1
    ]
    kept, stats = drop_stale(rows, step=5, max_staleness=1, partial=True)
    assert kept == rows[:2]
    assert stats == {
        "rollout/staleness_mean": 0.5,
        "rollout/staleness_max": 1.0,
        "rollout/dropped_stale": 1.0,
        "rollout/token_staleness_mean": 1 / 5,
        "rollout/partial_samples": 1.0,
    }


@contextmanager
def _unasked():
    yield Segment()  # nobody interrupts this call


def test_an_abort_nobody_asked_for_is_an_error() -> None:
    engine = TransformersEngine(tiny_hf_model(qwen3_config(eos_token_id=None), seed=0))
    engine.model.register_forward_hook(lambda *_: engine.interrupt())  # the engine aborts by itself
    with pytest.raises(RolloutError, match="aborted 2 of 2 samples that nobody interrupted"):
        generate_partial(engine, PROMPTS[:1], SAMPLING, n=2, hold=_unasked)
    with pytest.raises(RolloutError, match="token-id prompts"):
        generate_partial(engine, ["a text prompt"], SAMPLING, hold=_unasked)


def test_per_prompt_budgets_bound_each_sample() -> None:
    engine = TransformersEngine(tiny_hf_model(qwen3_config(eos_token_id=None), seed=0), max_batch_size=2)
    gens = engine.generate(PROMPTS, SAMPLING, n=2, max_new_tokens=[3, 9, 1])
    assert [len(g.token_ids) for g in gens] == [3, 3, 9, 9, 1, 1]
    assert {g.finish_reason for g in gens} == {"length"}
    with pytest.raises(RolloutError, match="one budget >= 1 per prompt"):
        engine.generate(PROMPTS, SAMPLING, max_new_tokens=[3, 0, 1])


def test_a_continued_sample_is_decoded_and_cut_at_its_stop_string() -> None:
    tok = tokenizer()
    ids = tok("the quick brown fox jumps over the lazy dog")["input_ids"]
    decode = partial(tok.decode, skip_special_tokens=True)
    assert _decode(decode, ids, []) == decode(ids)
    # the engine's text for the same stops (the in-process engine cuts like SGLang)
    engine = TransformersEngine(tiny_hf_model(qwen3_config(eos_token_id=None), seed=0), tokenizer=tok)
    (g,) = engine.generate([ids[:2]], SamplingParams(max_new_tokens=12, temperature=0.0))
    text = decode(g.token_ids)
    stop = text[len(text) // 2 :][:3]  # a piece of what greedy decoding writes ("laz")
    (cut,) = engine.generate([ids[:2]], SamplingParams(max_new_tokens=12, temperature=0.0, stop=[stop]))
    assert stop.strip() and cut.text != decode(cut.token_ids)  # the engine did cut something
    assert _decode(decode, cut.token_ids, [stop]) == cut.text
    assert _decode(decode, ids, ["fox", "quick"]) == decode(ids)[: decode(ids).index("quick")]
