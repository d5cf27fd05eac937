"""The run's prompts: train/eval records (files or a synthetic task) rendered with the chat template (and,
for a vision-language policy, with its processor), deterministic batches by (seed, offset), and the cold
start's supervised batches. All ranks load the records.

Text prompts are rendered once, up front (a bad row fails before any step). Image prompts are rendered
when a batch is drawn (`train_batch`, `eval_prompts`): decoded pixels of a whole dataset would sit in
every rank's memory otherwise. The records were checked when read (fields, files, placeholders), and a
batch is rendered whole before anything is generated from it, so an image that fails to decode stops the
run with its file and row before the step trains on anything.
Tests: tests/e2e/test_trainer.py, tests/e2e/test_vlm_trainer.py (and tests/unit/test_data*.py for the
readers underneath).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from megatron_sapo.data import ImagePrompt, PromptRecord, load_records, render_prompt
from megatron_sapo.data.synthetic import ArithmeticTask
from megatron_sapo.data.visual_task import VisualTask
from megatron_sapo.megatron.batching import Sample
from megatron_sapo.train.config import TrainJobConfig

Prompt = list[int] | ImagePrompt
"""A rendered prompt: token ids, or an `ImagePrompt` (text, images, the processor's expansion)."""

VISION_STOP_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
"""Tokens a response must not continue past: a sampled image pad fed back to the policy would be taken for
an image's (the trainer writes image features at every pad). As stop tokens they end the response and are
never fed to a model (the last sampled token is only a target)."""


@dataclass
class RunData:
    """Train/eval records and how to render them; batches are deterministic in (seed, offset)."""

    train: list[PromptRecord]
    eval: list[PromptRecord]
    tokenizer: Any
    sft_targets: list[str]
    seed: int
    render: Callable[[PromptRecord], Prompt]
    """Record -> prompt (`load_data`: the chat template, or the processor for image records)."""
    train_ids: list[list[int]] | None = None
    """Text runs: every train prompt's token ids, rendered up front; None for image runs."""
    eval_ids: list[list[int]] | None = None
    """Text runs: every eval prompt's token ids; None for image runs."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end every sample besides EOS (a vision-language policy's vision tokens)."""

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

    def _train_prompt(self, i: int) -> Prompt:
        return self.train_ids[i] if self.train_ids is not None else self.render(self.train[i])

    def train_keys(self, offset: int, n: int) -> list[int]:
        """Indices into `train` of the `n` prompts drawn from `offset` on (the keys `attach_images` takes)."""
        return [self._order(i // len(self.train))[i % len(self.train)] for i in range(offset, offset + n)]

    def train_batch(self, offset: int, n: int) -> tuple[list[PromptRecord], list[Prompt]]:
        idx = self.train_keys(offset, n)
        return [self.train[i] for i in idx], [self._train_prompt(i) for i in idx]

    @property
    def has_images(self) -> bool:
        """Prompts are rendered with the policy's processor (`ImagePrompt`s)."""
        return self.train_ids is None

    def attach_images(self, samples: list[Sample]) -> list[Sample]:
        """Samples keyed by their train record (`Sample.prompt_key`) with that record's pixels and grids,
        rendered here (each prompt once per call): every rank renders its own share after the scatter."""
        rendered: dict[int, ImagePrompt] = {}
        out = []
        for s in samples:
            if s.prompt_key is None or not self.has_images:
                out.append(s)
                continue
            if s.prompt_key not in rendered:
                rendered[s.prompt_key] = self.render(self.train[s.prompt_key])
            p = rendered[s.prompt_key]
            if len(p.input_ids) != s.response_start or s.tokens[: s.response_start].tolist() != p.input_ids:
                raise RuntimeError(
                    f"{self.train[s.prompt_key].where()}: this rank rendered other prompt tokens than rank 0"
                )
            if p.pixel_values is not None:
                s = replace(s, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw)
            out.append(s)
        return out

    def train_prompt_ids(self, offset: int, n: int) -> list[Prompt]:
        return self.train_batch(offset, n)[1]

    def eval_prompts(self) -> list[Prompt]:
        """Every eval prompt (image prompts rendered now, not kept)."""
        return self.eval_ids if self.eval_ids is not None else [self.render(r) for r in self.eval]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def sft_batches(
        self, batch_size: int, steps: int, *, seed: int
    ) -> Iterator[list[tuple[list[int], int, int | None]]]:
        """(prompt + target + EOS tokens, response start, the train index for `attach_images` or None)
        batches for the supervised cold start."""
        eos = self.tokenizer.eos_token_id
        for step in range(steps):
            rng = random.Random(seed * 7 + step)
            batch = []
            for i in rng.sample(range(len(self.train)), min(batch_size, len(self.train))):
                target = self.tokenizer(self.sft_targets[i], add_special_tokens=False)["input_ids"] + [eos]
                prompt = self._train_prompt(i)
                ids = list(prompt.input_ids) if isinstance(prompt, ImagePrompt) else prompt
                batch.append((ids + target, len(ids), i if self.has_images else None))
            yield batch


def load_data(cfg: TrainJobConfig, tokenizer: Any, processor: Any = None) -> RunData:
    """All ranks: records from files or a synthetic task; text prompts rendered with the chat template.

    `processor`: a vision-language policy's (AutoProcessor); image records are rendered with it, and
    its vision tokens stop every sample. Image records without one are a ValueError.
    """
    d = cfg.data
    synthetic = d.format == "synthetic" or (d.format == "auto" and d.train_path is None)
    if synthetic and d.synthetic.task == "visual":
        task: Any = VisualTask(**{k: getattr(d.visual, k) for k in VisualTask.__dataclass_fields__})
    elif synthetic:
        task = ArithmeticTask(**{k: getattr(d.synthetic, k) for k in ArithmeticTask.__dataclass_fields__})
    if synthetic:
        train, evals = task.splits(d.synthetic.n_train, d.synthetic.n_eval, seed=d.synthetic.seed)
        targets = [task.sft_text(r) for r in train]
    else:
        kw = dict(
            format="auto" if d.format == "auto" else d.format,
            prompt_field=d.prompt_field,
            answer_field=d.answer_field,
            answer_extract=d.answer_extract,
            image_fields=tuple(d.image_fields),
            image_placeholder=d.image_placeholder,
        )
        train = load_records(d.train_path, **kw)
        evals = load_records(d.eval_path, **kw) if d.eval_path else []
        targets = [r.answer for r in train]

    images = any(r.images for r in train) or any(r.images for r in evals)
    if images and processor is None:
        where = next(r for r in train + evals if r.images).where()
        raise ValueError(
            f"{where}: the dataset has images (data.image_fields / the visual task) but the policy "
            f"({cfg.model.path or 'model.tiny'}) is a text model without an image processor"
        )

    def render_text(record: PromptRecord) -> list[int]:
        return render_prompt(
            record,
            tokenizer,
            apply_chat_template=d.apply_chat_template,
            system_prompt=d.system_prompt,
            max_prompt_tokens=d.max_prompt_tokens,
        )

    if processor is None:
        train_ids, eval_ids = [render_text(r) for r in train], [render_text(r) for r in evals]
        return RunData(train, evals, tokenizer, targets, cfg.run.seed, render_text, train_ids, eval_ids)
    renderer = d.image_renderer(processor)

    def render_image(record: PromptRecord) -> ImagePrompt:
        return renderer.render(record, system_prompt=d.system_prompt, max_prompt_tokens=d.max_prompt_tokens)

    stops = [tokenizer.convert_tokens_to_ids(t) for t in VISION_STOP_TOKENS if t in tokenizer.get_vocab()]
    return RunData(train, evals, tokenizer, targets, cfg.run.seed, render_image, stop_token_ids=stops)
