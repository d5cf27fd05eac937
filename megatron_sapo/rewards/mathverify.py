"""math-verify reward: the response's final answer is mathematically equal to the ground truth.

Uses Hugging Face's `math-verify`: `parse` extracts the answer from the response (a `\\boxed{}` first,
then "final answer is ..." phrases, then the last expression or number) and `verify` compares it with
the parsed ground truth symbolically and numerically, so `\\boxed{\\frac{1}{2}}` matches "0.5" and
"71.0" matches "71". math-verify's own timeouts use `signal.alarm` (main thread only); they are turned
off here because `RewardRunner` bounds every call itself.
"""

from __future__ import annotations

import functools
import logging

from math_verify import parse, verify

from megatron_sapo.data.datasets import PromptRecord


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once that its timeouts are off; here that is on purpose (RewardRunner)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str) -> list:
    # A bare ground truth ("\\frac{1}{2}", "x^2+1") parses most reliably as inline LaTeX.
    wrapped = answer if "$" in answer or "\\boxed" in answer else f"${answer}$"
    return parse(wrapped, parsing_timeout=None) or parse(answer, parsing_timeout=None)


def math_verify_reward(response: str, record: PromptRecord) -> float:
    """1.0 when math-verify finds the response's answer equal to `record.answer`, else 0.0.

    A ground truth that math-verify cannot parse is a data problem: ValueError (counted by the runner).
    """
    gold = _parse_gold(record.answer)
    if not gold:
        raise ValueError(f"math-verify cannot parse the ground truth {record.answer!r} ({record.where()})")
    pred = parse(response, parsing_timeout=None)
    return float(bool(pred) and verify(gold, pred, timeout_seconds=None))
