"""Vision-language prompts: a record's images and text rendered by the policy's own processor.

`ImagePrompt` is what the rollout engines take for a prompt with images and what the trainer's pi_old pass
reads: the chat-template text SGLang expands itself, the images at the size both sides keep, and the
processor's expansion (token ids, pixels, grid) the trainer and the in-process engine feed the model.

    renderer = ImageRenderer(processor, min_pixels=None, max_pixels=512 * 512)   # or DataConfig.image_renderer
    prompt = renderer.render(record, system_prompt=None, max_prompt_tokens=2048)  # -> ImagePrompt

`ImageRenderer` resizes each image itself to Qwen-VL's `smart_resize` size, so the processor here and the
one in the SGLang server keep it as is. Tests: `python -m pytest tests/unit/test_data_images.py -q`
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megatron_sapo.data.datasets import DataError, PromptRecord


@dataclass
class ImagePrompt:
    """One rendered vision-language prompt."""

    text: str
    """The chat-template text with one `<|vision_start|><|image_pad|><|vision_end|>` per image: what SGLang
    takes (with `images`) and expands itself."""
    images: list[Any]
    """RGB `PIL.Image`s in prompt order, already at a size the processor keeps as is (so the engine's
    processor and the trainer's see the same pixels)."""
    input_ids: list[int]
    """The processor's expansion of `text` (each image's pad repeated t·h·w / merge² times)."""
    pixel_values: Any = None
    """`[N_patches, C·t·p·p]` float tensor of the images, as the processor flattened them (None: no image)."""
    image_grid_thw: Any = None
    """`[n_images, 3]` long tensor, each image's (t, h, w) patch grid (None: no image)."""

    def __len__(self) -> int:
        return len(self.input_ids)


MAX_ASPECT_RATIO = 200
"""Longest / shortest side beyond which Qwen-VL's processors (and SGLang's) refuse an image."""


def smart_resize(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen-VL's target size of an image: (h, w), each a multiple of `factor` (patch · merge), the aspect
    ratio kept as closely as the rounding allows, scaled down into `max_pixels` or up to `min_pixels`
    when plain rounding leaves the area outside them.

    The arithmetic is the processor's own (nearest multiple; else floor after shrinking by
    sqrt(area / max), or ceil after growing by sqrt(min / area)): a size this returns inside the limits
    is one the processor, given the same or wider limits, keeps as is. Only the clamps of extreme shapes
    (one side at least `factor`) can land outside. ValueError past `MAX_ASPECT_RATIO`.
    """
    if min(height, width) < 1 or max(height, width) > MAX_ASPECT_RATIO * min(height, width):
        raise ValueError(f"an image of {width}x{height} pixels is past the aspect ratio {MAX_ASPECT_RATIO}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / shrink / factor) * factor)
        w = max(factor, math.floor(width / shrink / factor) * factor)
    elif h * w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * grow / factor) * factor, math.ceil(width * grow / factor) * factor
    return h, w


def processor_pixel_limits(image_processor: Any) -> tuple[int, int]:
    """(min_pixels, max_pixels) a Qwen-VL image processor resizes into: `size["shortest_edge"]` /
    `size["longest_edge"]` (transformers 5), else its `min_pixels` / `max_pixels` attributes."""
    size = getattr(image_processor, "size", None) or {}
    low = size.get("shortest_edge") or size.get("min_pixels") or getattr(image_processor, "min_pixels", None)
    high = size.get("longest_edge") or size.get("max_pixels") or getattr(image_processor, "max_pixels", None)
    if not (low and high):
        raise ValueError(f"{type(image_processor).__name__} has no min/max pixel limits (size={size})")
    return int(low), int(high)


class ImageRenderer:
    """Renders `PromptRecord`s with images into `ImagePrompt`s with a Qwen-VL processor.

        renderer = ImageRenderer(processor, max_pixels=512 * 512)
        prompt = renderer.render(record, system_prompt="Think step by step.", max_prompt_tokens=2048)

    Each image is decoded (`images.load_image`) and resized here (PIL, bicubic) to `smart_resize`'s size
    within [min_pixels, max_pixels]; this processor and the SGLang server (which runs the checkpoint's
    same image processor) then keep it as is, so both sides see the same pixels — a processor that would
    resize it again anyway is a `DataError` naming the record. null limits are the processor's own; a
    limit outside them is a `ConfigError` naming `data.min_pixels` / `data.max_pixels` (the processor
    would resize the image again).
    """

    def __init__(
        self, processor: Any, *, min_pixels: int | None = None, max_pixels: int | None = None
    ) -> None:
        from megatron_sapo.utils.typed_config import ConfigError

        self.processor = processor
        image_processor = processor.image_processor
        low, high = processor_pixel_limits(image_processor)
        for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and not low <= value <= high:
                raise ConfigError(
                    f"{value} is outside the processor's own range [{low}, {high}] "
                    "(the processor would resize the images again)",
                    key=f"data.{key}",
                )
        self.min_pixels = low if min_pixels is None else min_pixels
        self.max_pixels = high if max_pixels is None else max_pixels
        if self.min_pixels > self.max_pixels:
            raise ConfigError(
                f"{self.min_pixels} is above max_pixels {self.max_pixels}", key="data.min_pixels"
            )
        self.patch_size = int(image_processor.patch_size)
        self.factor = self.patch_size * int(image_processor.merge_size)

    def resize(self, image: Any, where: str) -> Any:
        """`image` (RGB PIL) at its `smart_resize` size; `DataError` naming `where` for a refused shape."""
        from PIL import Image

        try:
            h, w = smart_resize(
                image.height,
                image.width,
                factor=self.factor,
                min_pixels=self.min_pixels,
                max_pixels=self.max_pixels,
            )
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
        return image.resize((w, h), Image.Resampling.BICUBIC)  # PIL returns a copy at the same size

    def render(
        self, record: PromptRecord, *, system_prompt: str | None = None, max_prompt_tokens: int | None = None
    ) -> ImagePrompt:
        """The record's chat-template text, resized images and the processor's expansion of both.

        Image parts go where the record's placeholders were in its user messages (with none, in front of
        the last user message); `system_prompt` leads unless the messages open with a system message.
        Raises `DataError` naming the record's file and row for an image that cannot be read or has a
        refused shape, and for more than `max_prompt_tokens` tokens after the expansion.
        """
        from megatron_sapo.data.images import load_image

        images = []
        for i, value in enumerate(record.images):
            where = f"{record.where()}: image {i + 1}"
            images.append(self.resize(load_image(value, where=where, base_dir=record.base_dir), where))
        messages = _messages(record, len(images))
        if system_prompt is not None and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = self.processor(text=[text], images=images or None, return_tensors="pt")
        ids = out["input_ids"][0].tolist()
        grid = out.get("image_grid_thw")
        # Limits inside the processor's keep every size but smart_resize's clamps on extreme shapes.
        for i, image in enumerate(images):
            kept = [image.height // self.patch_size, image.width // self.patch_size]
            if grid[i, 1:].tolist() != kept:
                raise DataError(
                    f"{record.where()}: image {i + 1}: the processor resized {image.width}x{image.height} "
                    f"again (grid {grid[i].tolist()})"
                )
        if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
            raise DataError(
                f"{record.where()}: prompt has {len(ids)} tokens with its {len(images)} images expanded, "
                f"more than max_prompt_tokens={max_prompt_tokens}"
            )
        return ImagePrompt(text, images, ids, out.get("pixel_values"), grid)


def _messages(record: PromptRecord, n_images: int) -> list[dict[str, Any]]:
    """Chat messages whose user contents are image / text parts: an image part per placeholder, or all
    images in front of the last user message when no user message has a placeholder."""
    source = record.messages or [{"role": "user", "content": record.prompt}]
    messages: list[dict[str, Any]] = [dict(m) for m in source]
    if not n_images:
        return messages
    users = [m for m in messages if m["role"] == "user"]
    mark = record.image_placeholder
    marks = sum(m["content"].count(mark) for m in users)
    if not marks:
        last = users[-1]
        last["content"] = [{"type": "image"} for _ in range(n_images)] + [
            {"type": "text", "text": last["content"]}
        ]
        return messages
    if marks != n_images:  # load_records checks files; this catches records built in code
        raise DataError(
            f"{record.where()}: the prompt has {marks} {mark!r} placeholders but {n_images} images"
        )
    for m in users:
        pieces = m["content"].split(mark)
        parts = [{"type": "text", "text": pieces[0]}]
        for piece in pieces[1:]:
            parts += [{"type": "image"}, {"type": "text", "text": piece}]
        m["content"] = [part for part in parts if part.get("text") != ""]
    return messages
