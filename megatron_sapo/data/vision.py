"""Vision-language prompts: a record's images and text rendered by the policy's own processor.

`ImagePrompt` is what the rollout engines take for a prompt with images and what the trainer's pi_old pass
reads: the chat-template text SGLang expands itself, the images at the size both sides keep, and the
processor's expansion (token ids, pixels, grid) the trainer and the in-process engine feed the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


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
