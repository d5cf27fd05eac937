"""Reward functions by name: "math_verify", "exact_match", or "python:package.module:function".

A reward function is `fn(response_text: str, record: PromptRecord) -> float`. A user function named by
its Python path is imported here (and again, by name, in each `RewardRunner` worker), so it must be a
module-level attribute of an importable module.
"""

from __future__ import annotations

import importlib

from megatron_sapo.rewards.runner import RewardFn

PYTHON_PREFIX = "python:"
REWARDS: dict[str, str] = {
    "math_verify": "megatron_sapo.rewards.mathverify:math_verify_reward",
    "exact_match": "megatron_sapo.rewards.exact_match:exact_match",
}
"""Built-in names → 'module:function' (imported lazily: math-verify pulls in sympy)."""


def get_reward(name: str) -> RewardFn:
    """The reward function called `name` (a key of REWARDS or 'python:package.module:function')."""
    if name in REWARDS:
        return _import(REWARDS[name], name)
    if name.startswith(PYTHON_PREFIX):
        return _import(name[len(PYTHON_PREFIX) :], name)
    raise ValueError(
        f"unknown reward {name!r}: use one of {sorted(REWARDS)} or 'python:package.module:function'"
    )


def _import(path: str, name: str) -> RewardFn:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {name!r}: expected 'python:package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {name!r}: cannot import module {module_name!r} ({e})") from e
    fn = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ValueError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ValueError(f"reward {name!r}: {path} is a {type(fn).__name__}, not a function")
    return fn
