"""The `data:` section of a run config: training / evaluation prompts, their fields, the synthetic task.

Tests: tests/unit/test_config.py, tests/unit/test_data.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_sapo.data.synthetic import ArithmeticTask
from megatron_sapo.utils.typed_config import check, check_min


@dataclass(frozen=True)
class SyntheticDataConfig(ArithmeticTask):
    """The built-in arithmetic task (`data.ArithmeticTask`, usable as is) and how many problems to draw."""

    seed: int = 0
    """Seed of the drawn problems (train and eval use disjoint seeds derived from it)."""
    n_train: int = 512
    """Training problems drawn."""
    n_eval: int = 64
    """Evaluation problems drawn (0 = no evaluation set)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_min(self, "n_train")
        check_min(self, "seed", "n_eval", minimum=0)


@dataclass
class DataConfig:
    """Training / evaluation prompts and reference answers."""

    train_path: str | None = None
    """Training set (.jsonl or .parquet); null = the synthetic task."""
    eval_path: str | None = None
    """Evaluation set; null = the synthetic task's eval split, or none when `train_path` is set."""
    format: Literal["auto", "jsonl", "parquet", "synthetic"] = "auto"
    """File format; "auto" picks by extension (and "synthetic" when no path is set)."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (a string or a list of chat messages)."""
    answer_field: str = "answer"
    """Record field holding the reference answer the reward compares against."""
    answer_extract: Literal["none", "gsm8k"] = "none"
    """How to read the answer field: as is, or "gsm8k" (the text after the last '####')."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (with the generation prompt)."""
    system_prompt: str | None = None
    """System message prepended to every chat prompt; null = none."""
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    """The synthetic task's settings."""
    max_prompt_tokens: int = 256
    """Longest rendered prompt in tokens; a longer one is an error naming its file and row."""
    image_fields: list[str] = field(default_factory=list)
    """Record fields holding images (one image or a list each); [] = text-only prompts."""
    image_placeholder: str = "<image>"
    """Marker in the prompt text where the next image goes."""
    min_pixels: int | None = None
    """Fewest pixels per image (smaller ones are upscaled); null = the processor's own limit."""
    max_pixels: int | None = None
    """Most pixels per image (larger ones are downscaled); null = the processor's own limit."""

    def __post_init__(self) -> None:
        check_min(self, "max_prompt_tokens")
        if self.format == "synthetic":
            check(self.train_path is None, "train_path", "must be null for data.format 'synthetic'")
        elif self.format != "auto":
            check(self.train_path is not None, "train_path", f"required for data.format {self.format!r}")
