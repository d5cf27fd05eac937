"""Rewards for RL: math-verify, exact match, user functions by Python path; a batch runner with timeouts.

    from megatron_sapo.rewards import RewardRunner, get_reward
    fn = get_reward("math_verify")                 # or "exact_match", "python:my_pkg.rewards:score"
    fn("... so the answer is \\boxed{71}", record)   # 1.0 if record.answer == "71"
    with RewardRunner(fn, timeout_s=5.0, workers=2) as runner:
        rewards, stats = runner.score(responses, records)

A reward function is `fn(response_text, record: PromptRecord) -> float`; a new built-in is one file
plus one REWARDS entry (registry.py). The `reward:` run-config section is `config.py`. May import
megatron_sapo.data and megatron_sapo.utils only (the layer map is in megatron_sapo/__init__.py).
"""

from megatron_sapo.rewards.exact_match import exact_match, final_answer
from megatron_sapo.rewards.registry import REWARDS, get_reward
from megatron_sapo.rewards.runner import RewardFn, RewardRunner

__all__ = ["REWARDS", "RewardFn", "RewardRunner", "exact_match", "final_answer", "get_reward"]
