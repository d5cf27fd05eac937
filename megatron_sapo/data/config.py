"""The `data:` section of a run config: training / evaluation prompts, their fields, the synthetic task.

Tests: tests/unit/test_config.py, tests/unit/test_data.py, tests/unit/test_data_images.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from megatron_sapo.data.synthetic import ArithmeticTask
from megatron_sapo.data.vision import ImageRenderer
from megatron_sapo.data.visual_task import VisualTask
from megatron_sapo.utils.typed_config import check, check_min


@dataclass(frozen=True)
class SyntheticDataConfig(ArithmeticTask):
    """The built-in arithmetic task (`data.ArithmeticTask`, usable as is) and how many problems to draw."""

    task: Literal["arithmetic", "visual"] = "arithmetic"
    """Which synthetic task: "arithmetic" (the knobs of this section) or "visual" (image prompts, the knobs
    under `data.visual`; needs a vision-language policy, e.g. model.tiny.architecture qwen3_vl_moe)."""
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
    visual: VisualTask = field(default_factory=VisualTask)
    """The synthetic visual task's knobs (`data.synthetic.task` "visual"; seed and sizes from `synthetic`)."""
    max_prompt_tokens: int = 256
    """Longest rendered prompt in tokens (images expanded); a longer one is an error naming its file and row."""
    image_fields: list[str] = field(default_factory=list)
    """Record fields holding the prompt's images, each one image or a list (path relative to the file,
    bytes, base64, data URI, or an HF Image {bytes, path}), taken in field order; [] = text only."""
    image_placeholder: str = "<image>"
    """Prompt text marking where one image goes; a prompt without any gets all its images in front of its
    last user message, and a count other than the images' is an error naming the file and row."""
    min_pixels: int | None = None
    """Smallest image area (pixels) an image is scaled up to before the processor; null = the processor's
    own, and a value outside the processor's [min, max] is an error."""
    max_pixels: int | None = None
    """Largest image area (pixels) an image is scaled down to before the processor; null = the processor's
    own, and a value outside the processor's [min, max] is an error."""

    def image_renderer(self, processor: Any) -> ImageRenderer:
        """The renderer of this section's image prompts with `processor` (the policy's Qwen-VL processor)."""
        return ImageRenderer(processor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)

    def __post_init__(self) -> None:
        check_min(self, "max_prompt_tokens")
        check_min(self, "min_pixels", "max_pixels")
        if self.min_pixels is not None and self.max_pixels is not None:
            check(
                self.min_pixels <= self.max_pixels, "min_pixels", f"must be <= max_pixels ({self.max_pixels})"
            )
        check(bool(self.image_placeholder), "image_placeholder", "must be a non-empty string")
        check(all(self.image_fields), "image_fields", "field names must be non-empty")
        if self.image_fields:
            check(
                self.train_path is not None,
                "image_fields",
                "needs a data.train_path (the synthetic task has none)",
            )
            check(self.apply_chat_template, "apply_chat_template", "image prompts need the chat template")
        if self.format == "synthetic":
            check(self.train_path is None, "train_path", "must be null for data.format 'synthetic'")
        elif self.format != "auto":
            check(self.train_path is not None, "train_path", f"required for data.format {self.format!r}")
