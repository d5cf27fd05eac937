"""The `reward:` section of a run config: which scorer and how long one call may take.

Tests: tests/unit/test_config.py, tests/unit/test_rewards.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from megatron_sapo.rewards.registry import PYTHON_PREFIX, REWARDS
from megatron_sapo.utils.typed_config import check, check_choice


@dataclass
class RewardConfig:
    """How a response is scored against the reference answer."""

    name: str = "math_verify"
    """"math_verify", "exact_match", or "python:package.module:function" (a custom scorer)."""
    timeout_s: float = 5.0
    """Seconds one scoring call may take before it counts as reward 0."""

    def __post_init__(self) -> None:
        if self.name.startswith(PYTHON_PREFIX):
            check(
                re.fullmatch(rf"{PYTHON_PREFIX}[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.name) is not None,
                "name",
                f"{self.name!r} is not of the form {PYTHON_PREFIX}package.module:function",
            )
        else:
            check_choice(self.name, [*REWARDS, f"{PYTHON_PREFIX}package.module:function"], "name")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")
