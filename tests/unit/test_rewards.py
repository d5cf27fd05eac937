"""Reward functions (math-verify, exact match, Python path) and the batch runner's failure handling."""

from __future__ import annotations

import functools
import logging
import textwrap
import time

import pytest

from megatron_sapo.data import PromptRecord
from megatron_sapo.rewards import RewardRunner, exact_match, final_answer, get_reward
from megatron_sapo.rewards.runner import HARD_GRACE_S


def rec(answer: str) -> PromptRecord:
    return PromptRecord(prompt="q", answer=answer, source="data.jsonl", row=7)


# A user module exercising every way a reward can fail; loaded by path, in the workers too.
FLAKY = """
import math, os, signal, time

def score(response, record, *, bonus=0.0):
    if response == "raise":
        raise RuntimeError("boom")
    if response == "hang":
        time.sleep(100)
    if response == "hang_hard":  # the soft alarm never arrives: only the kill stops it
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(100)
    if response == "die":
        os._exit(3)
    if response == "nan":
        return math.nan
    if response == "text":
        return "not a number"
    return float(response == record.answer) + bonus

not_callable = 3
"""


@pytest.fixture(scope="module")
def flaky(tmp_path_factory):
    root = tmp_path_factory.mktemp("user_rewards")
    (root / "flaky_rewards.py").write_text(textwrap.dedent(FLAKY))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        yield get_reward("python:flaky_rewards:score")


@pytest.fixture(scope="module")
def runner(flaky):
    with RewardRunner(flaky, timeout_s=1.0, workers=2) as r:
        yield r


@pytest.mark.parametrize(
    ("answer", "response"),
    [
        ("0.5", "The answer is \\boxed{\\frac{1}{2}}"),
        ("\\frac{1}{2}", "so it is 0.5"),
        ("1/2", "\\boxed{0.5}"),
        ("71", "71.0"),
        ("71", "23 + 48 = 71"),
        ("71", "We get 70 first, then the final answer is \\boxed{71}."),
        ("34", "Let me think.\nAnswer: $34$"),
        ("-4", "3 - 7 = -4"),
        ("x^2+1", "\\boxed{1 + x^2}"),
    ],
)
def test_math_verify_accepts_equivalent_forms(answer, response):
    assert get_reward("math_verify")(response, rec(answer)) == 1.0


@pytest.mark.parametrize(
    ("answer", "response"),
    [("71", "70"), ("71", "23 + 48 = 72"), ("0.5", "\\boxed{\\frac{1}{3}}"), ("71", ""), ("71", "no idea")],
)
def test_math_verify_rejects_wrong(answer, response):
    assert get_reward("math_verify")(response, rec(answer)) == 0.0


def test_math_verify_unparseable_ground_truth_is_an_error():
    with pytest.raises(ValueError, match=r"ground truth .* \(data.jsonl:7\)"):
        get_reward("math_verify")("1", rec(""))


@pytest.mark.parametrize(
    ("response", "final"),
    [
        ("blah 3 then 5", "5"),
        ("Answer: 12 apples\nmore text 99", " 12 apples"),
        ("answer:7 and ANSWER: 8", " 8"),
        ("it costs 1,200.50 dollars", "1,200.50"),
        ("x = -3", "-3"),
        ("Paris", "Paris"),
    ],
)
def test_final_answer_rule(response, final):
    assert final_answer(response) == final


@pytest.mark.parametrize(
    ("answer", "response", "reward"),
    [
        ("71", "23 + 48 = 71", 1.0),
        ("71", "71.", 1.0),
        ("71", "71.00", 1.0),
        ("71", "Answer: $71$.", 1.0),
        ("71", "Answer: 71 apples", 0.0),  # text after "Answer:" must match as a whole
        ("71", "71 then 72", 0.0),  # the last number counts
        ("1200", "It is 1,200", 1.0),
        ("Paris", "  paris. ", 1.0),
        ("new  york", "Answer: New York", 1.0),
        ("0.5", "1/2", 0.0),  # no maths: that is math_verify's job
        ("71", "", 0.0),
    ],
)
def test_exact_match_rules(answer, response, reward):
    assert exact_match(response, rec(answer)) == reward
    assert get_reward("exact_match") is exact_match


def test_python_path_reward(flaky):
    assert flaky("7", rec("7")) == 1.0 and flaky("8", rec("7")) == 0.0
    for name, problem in [
        ("python:no_such_module_xyz:score", "cannot import module 'no_such_module_xyz'"),
        ("python:flaky_rewards:nope", "has no attribute 'nope'"),
        ("python:flaky_rewards:not_callable", "not a function"),
        ("python:flaky_rewards", "expected 'python:package.module:function'"),
        ("bleu", "unknown reward 'bleu'"),
    ]:
        with pytest.raises(ValueError, match=problem):
            get_reward(name)


def test_python_path_reward_whose_module_fails_at_import(tmp_path, monkeypatch):
    """Whatever the user's module raises at import is one ValueError naming the reward, type and line."""
    (tmp_path / "broken_at_import.py").write_text("import os\nraise RuntimeError('no table')\n")
    (tmp_path / "needs_missing.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name, problem in [
        ("broken_at_import", f"RuntimeError: no table ({tmp_path}/broken_at_import.py:2)"),
        ("needs_missing", f"ModuleNotFoundError: No module named 'no_such_dependency_xyz' ({tmp_path}/needs"),
    ]:
        with pytest.raises(ValueError) as exc:
            get_reward(f"python:{name}:score")
        assert str(exc.value).startswith(f"'python:{name}:score': cannot import module '{name}': {problem}")


def test_runner_scores_in_order(runner):
    records = [rec(str(i % 5)) for i in range(40)]
    responses = [str(i % 3) for i in range(40)]
    rewards, stats = runner.score(responses, records)
    assert rewards == [float(str(i % 3) == str(i % 5)) for i in range(40)]
    assert (stats["reward/errors"], stats["reward/timeouts"]) == (0, 0)


def test_runner_turns_failures_into_zero(runner, caplog):
    responses = ["1", "raise", "hang", "1", "die", "nan", "text", "hang_hard", "1", "2"]
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="megatron_sapo.rewards.runner"):
        rewards, stats = runner.score(responses, [rec("1")] * len(responses))
    elapsed = time.monotonic() - start
    assert rewards == [1.0, 0, 0, 1.0, 0, 0, 0, 0, 1.0, 0]
    assert (stats["reward/errors"], stats["reward/timeouts"]) == (4, 2)  # raise, die, nan, text | hang x2
    assert elapsed < 1.0 + HARD_GRACE_S + 3.0, elapsed
    assert "4 errors and 2 timeouts of 10 samples" in caplog.text and "data.jsonl:7" in caplog.text
    # the pool recovered: killed workers were replaced
    rewards, stats = runner.score(["1", "0", "1"], [rec("1")] * 3)
    assert rewards == [1.0, 0.0, 1.0] and stats["reward/errors"] == stats["reward/timeouts"] == 0


def test_runner_hang_with_one_second_timeout_finishes_quickly(flaky):
    start = time.monotonic()
    with RewardRunner(flaky, timeout_s=1.0, workers=1) as r:
        rewards, stats = r.score(["hang", "5", "hang"], [rec("5")] * 3)
    assert rewards == [0.0, 1.0, 0.0] and stats["reward/timeouts"] == 2
    assert time.monotonic() - start < 5.0


def test_runner_partial_and_builtin(flaky):
    with RewardRunner(functools.partial(flaky, bonus=0.5), timeout_s=2.0, workers=1) as r:
        assert r.score(["1", "2"], [rec("1")] * 2)[0] == [1.5, 0.5]
    with RewardRunner(get_reward("math_verify"), timeout_s=5.0, workers=2) as r:
        rewards, _ = r.score(["\\boxed{\\frac{1}{2}}", "0.4"] * 8, [rec("0.5")] * 16)
    assert rewards == [1.0, 0.0] * 8


def test_runner_rejects_unpicklable_and_bad_args(flaky):
    with pytest.raises(TypeError, match="module-level function"):
        RewardRunner(lambda r, x: 1.0, timeout_s=1.0)
    with pytest.raises(ValueError, match="timeout_s"):
        RewardRunner(flaky, timeout_s=0)
    with (
        RewardRunner(flaky, timeout_s=1.0, workers=1) as r,
        pytest.raises(ValueError, match="2 responses but 1"),
    ):
        r.score(["a", "b"], [rec("1")])
