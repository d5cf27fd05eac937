"""Synthetic arithmetic prompts, deterministic by seed: the embedded default task.

    task = ArithmeticTask(max_operand=9, ops=("+", "-"))
    train, evals = task.splits(n_train=512, n_eval=128, seed=0)
    train[0].prompt, train[0].answer, task.sft_text(train[0])   # 'What is 7 - 3?', '4', '4'

The default (single digits, + and -, no negative results: 155 distinct problems) is meant to be
learnable by a 2-layer, 64-wide model with a ~300-token byte-level BPE in minutes on a CPU: the answer
is one or two digits at a fixed offset from the operands. Raise `max_operand` or add "*" for a harder
task. Rewards: `exact_match` and `math_verify` both read the last number of a response, which is
what `sft_text` (the cold-start target) ends with.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from megatron_sapo.data.datasets import PromptRecord

_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class ArithmeticTask:
    """`a op b` problems with integer operands drawn uniformly from [min_operand, max_operand]."""

    max_operand: int = 9
    """Largest operand (9: single digits)."""
    min_operand: int = 0
    """Smallest operand."""
    ops: tuple[str, ...] = ("+", "-")
    """Operators to draw from, a subset of '+', '-', '*'."""
    nonnegative: bool = True
    """Order the operands of '-' so the result is never negative."""
    template: str = "What is {a} {op} {b}?"
    """Prompt text; fields {a}, {op}, {b}."""
    show_work: bool = False
    """Cold-start target 'a op b = c' instead of just 'c' (both end with the answer)."""

    def __post_init__(self) -> None:
        if not self.ops or any(op not in _APPLY for op in self.ops):
            raise ValueError(f"ops must be a non-empty subset of {tuple(_APPLY)}, got {self.ops!r}")
        if not 0 <= self.min_operand <= self.max_operand:
            raise ValueError(
                f"need 0 <= min_operand <= max_operand, got {self.min_operand}, {self.max_operand}"
            )

    def records(self, n: int, *, seed: int) -> list[PromptRecord]:
        """`n` problems drawn i.i.d. from `random.Random(seed)`: the same seed gives the same list."""
        rng = random.Random(seed)
        out = []
        for i in range(n):
            op = rng.choice(self.ops)
            a = rng.randint(self.min_operand, self.max_operand)
            b = rng.randint(self.min_operand, self.max_operand)
            if op == "-" and self.nonnegative and a < b:
                a, b = b, a
            out.append(
                PromptRecord(
                    prompt=self.template.format(a=a, op=op, b=b),
                    answer=str(_APPLY[op](a, b)),
                    meta={"task": "arithmetic", "a": a, "op": op, "b": b},
                    row=i + 1,
                )
            )
        return out

    def splits(
        self, n_train: int, n_eval: int, *, seed: int
    ) -> tuple[list[PromptRecord], list[PromptRecord]]:
        """Train and eval lists drawn with disjoint seeds (2·seed and 2·seed + 1).

        The default task has only 155 distinct problems, so the lists share problems; they are
        independent draws, not disjoint problem sets.
        """
        return self.records(n_train, seed=2 * seed), self.records(n_eval, seed=2 * seed + 1)

    def sft_text(self, record: PromptRecord) -> str:
        """The response a cold-start SFT teaches: '7' (or '3 + 4 = 7' with `show_work`)."""
        return sft_text(record, show_work=self.show_work)

    def num_problems(self) -> int:
        """How many distinct (a, op, b) problems the task can draw."""
        span = self.max_operand - self.min_operand + 1
        ordered = span * (span + 1) // 2  # '-' with nonnegative: unordered pairs
        return sum(ordered if op == "-" and self.nonnegative else span * span for op in self.ops)

    def describe(self) -> str:
        """One line for logs."""
        neg = ", no negative results" if self.nonnegative and "-" in self.ops else ""
        return (
            f"arithmetic: a op b, operands in [{self.min_operand}, {self.max_operand}], ops {' '.join(self.ops)}"
            f"{neg}; {self.num_problems()} distinct problems; target "
            f"{'a op b = c' if self.show_work else 'c'}"
        )


def arithmetic_records(n: int, *, seed: int, **task: object) -> list[PromptRecord]:
    """Shorthand for `ArithmeticTask(**task).records(n, seed=seed)`."""
    return ArithmeticTask(**task).records(n, seed=seed)  # type: ignore[arg-type]


def sft_text(record: PromptRecord, *, show_work: bool = False) -> str:
    """Cold-start target of a generated arithmetic record: '7', or '3 + 4 = 7' with `show_work`."""
    m = record.meta
    return f"{m['a']} {m['op']} {m['b']} = {record.answer}" if show_work else record.answer
