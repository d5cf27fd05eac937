"""Exact-match reward: the response's final answer, normalised, equals the ground truth.

The final answer of a response is
  1. the text after the last "Answer:" (any case), up to the end of that line, if there is one;
  2. otherwise the last number in the response (sign, thousands commas and decimals included);
  3. otherwise the whole response.
Both sides are then normalised: surrounding whitespace, `$` and a trailing period dropped, inner
whitespace collapsed, commas inside numbers removed, case folded. Two numbers compare by value
("71" == "71.0" == "71.00"), anything else as strings.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from megatron_sapo.data.datasets import PromptRecord

_ANSWER_MARK = re.compile(r"answer\s*:", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_NUMBER_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")


def final_answer(response: str) -> str:
    """The final answer of a response, by the rule in the module docstring (not normalised)."""
    marks = list(_ANSWER_MARK.finditer(response))
    if marks:
        return response[marks[-1].end() :].split("\n", 1)[0]
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else response


def normalize(text: str) -> str:
    """Whitespace collapsed; `$`, a trailing period and commas inside numbers dropped; case folded."""
    text = " ".join(text.split()).strip("$ ").rstrip(".").strip("$ ")
    return _NUMBER_COMMA.sub("", text).casefold()


def exact_match(response: str, record: PromptRecord) -> float:
    """1.0 when the response's final answer equals `record.answer` after normalisation, else 0.0."""
    got, want = normalize(final_answer(response)), normalize(record.answer)
    try:
        return float(Decimal(got) == Decimal(want))
    except InvalidOperation:
        return float(got == want and got != "")
