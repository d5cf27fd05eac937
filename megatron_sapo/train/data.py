"""The run's prompts: train/eval records (files or the synthetic task) rendered with the chat template,
deterministic batches by (seed, offset), and the cold start's supervised batches. All ranks load them.
Tests: tests/e2e/test_trainer.py (and tests/unit/test_data.py for the readers underneath).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from megatron_sapo.data import PromptRecord, load_records, render_prompt
from megatron_sapo.data.synthetic import ArithmeticTask
from megatron_sapo.train.config import TrainJobConfig


@dataclass
class RunData:
    """Train/eval records with their prompt token ids; batches are deterministic in (seed, offset)."""

    train: list[PromptRecord]
    train_ids: list[list[int]]
    eval: list[PromptRecord]
    eval_ids: list[list[int]]
    tokenizer: Any
    sft_targets: list[str]
    seed: int

    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def _order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s shuffled record order (shuffled once: it was one shuffle per prompt per step)."""
        if epoch not in self._orders:
            order = list(range(len(self.train)))
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            if len(self._orders) >= 4:  # batches walk forward (the probes elsewhere): keep a few recent
                del self._orders[next(iter(self._orders))]
            self._orders[epoch] = order
        return self._orders[epoch]

    def train_batch(self, offset: int, n: int) -> tuple[list[PromptRecord], list[list[int]]]:
        idx = [self._order(i // len(self.train))[i % len(self.train)] for i in range(offset, offset + n)]
        return [self.train[i] for i in idx], [self.train_ids[i] for i in idx]

    def train_prompt_ids(self, offset: int, n: int) -> list[list[int]]:
        return self.train_batch(offset, n)[1]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def sft_batches(self, batch_size: int, steps: int, *, seed: int) -> Iterator[list[tuple[list[int], int]]]:
        """(prompt + target + EOS tokens, response start) batches for the supervised cold start."""
        eos = self.tokenizer.eos_token_id
        for step in range(steps):
            rng = random.Random(seed * 7 + step)
            batch = []
            for i in rng.sample(range(len(self.train)), min(batch_size, len(self.train))):
                target = self.tokenizer(self.sft_targets[i], add_special_tokens=False)["input_ids"] + [eos]
                batch.append((self.train_ids[i] + target, len(self.train_ids[i])))
            yield batch


def load_data(cfg: TrainJobConfig, tokenizer: Any) -> RunData:
    """All ranks: records from files or the synthetic task, prompts rendered with the chat template."""
    d = cfg.data
    synthetic = d.format == "synthetic" or (d.format == "auto" and d.train_path is None)
    if synthetic:
        task = ArithmeticTask(
            **{
                k: getattr(d.synthetic, k) for k in ArithmeticTask.__dataclass_fields__
            }  # the task's own fields
        )
        train, evals = task.splits(d.synthetic.n_train, d.synthetic.n_eval, seed=d.synthetic.seed)
        targets = [task.sft_text(r) for r in train]
    else:
        kw = dict(
            format="auto" if d.format == "auto" else d.format,
            prompt_field=d.prompt_field,
            answer_field=d.answer_field,
            answer_extract=d.answer_extract,
            image_fields=d.image_fields,
            image_placeholder=d.image_placeholder,
        )
        train = load_records(d.train_path, **kw)
        evals = load_records(d.eval_path, **kw) if d.eval_path else []
        targets = [r.answer for r in train]

    def render(records: list[PromptRecord]) -> list[list[int]]:
        return [
            render_prompt(
                r,
                tokenizer,
                apply_chat_template=d.apply_chat_template,
                system_prompt=d.system_prompt,
                max_prompt_tokens=d.max_prompt_tokens,
            )
            for r in records
        ]

    return RunData(train, render(train), evals, render(evals), tokenizer, targets, cfg.run.seed)
