"""Synthetic image prompts, deterministic by seed: the embedded task of the CPU vision-language quickstart.

    task = VisualTask(kind="color", n_colors=4, distractors=1)
    train, evals = task.splits(n_train=512, n_eval=128, seed=0)
    train[0].prompt, train[0].answer   # '<image>What color is the square?', 'red'
    train[0].images[0].size            # (64, 64): an RGB PIL image

Each record holds one RGB `PIL.Image` in `images` (the prompt's "<image>" placeholder marks where it goes)
and flat-coloured shapes (circle, square, triangle; drawn without antialiasing, so every shape pixel is
exactly its palette colour) on a light-grey background, optionally with per-pixel noise:
- kind "color": one target shape plus `distractors` shapes of other types and other colours; the
  question names the target's type, the answer is its colour name ("red"). With the defaults (4 colours,
  1 distractor) always answering one colour scores 25 %, naming either colour in the image 50 %.
- kind "count": 1..`max_count` shapes of one colour; the answer is the digit ("3").

Shapes sit in distinct cells of a grid over the image, at least 2 pixels apart, so no two touch (the
count is the number of connected coloured regions) and no distractor hides the target. `meta["objects"]`
lists every shape (type, colour, inclusive box, centre pixel, size), the target first; kind "color" also
puts the target's shape, color, center and size at the top level, kind "count" the count. The default 64x64 is 4x4 patches of 16 pixels, 4 image
tokens after Qwen3-VL's 2x2 merge. Rewards: `exact_match` compares the whole response, case folded, with
the answer; `sft_text` (the cold-start target) is the answer itself. Tests:
`python -m pytest tests/unit/test_visual_task.py -q`
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Literal

from megatron_sapo.data.datasets import PromptRecord

# Hue-separated and saturated, so none is close to another or to the grey background, even with noise.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 170, 40),
    "blue": (30, 60, 230),
    "yellow": (240, 210, 20),
    "purple": (140, 40, 200),
    "orange": (245, 130, 20),
    "cyan": (20, 200, 220),
    "pink": (240, 90, 180),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 235)
IMAGE_PLACEHOLDER = "<image>"
# Qwen3-VL: 16-pixel patches merged 2x2, so a side that is a multiple of 32 is kept as is by the processor.
SIDE_MULTIPLE = 32
MAX_NOISE = 20  # background stays within [215, 255] per channel: far from every palette colour
_TEMPLATES = {"color": "<image>What color is the {shape}?", "count": "<image>How many shapes?"}
_FIELDS = {"color": ("shape", "color"), "count": ("color",)}
_GAP = 2  # a shape leaves 1 pixel free on each side of its cell: shapes in abutting cells are >= 2 apart


@dataclass(frozen=True)
class VisualTask:
    """Shape-colour or shape-count questions about a generated image; see the module docstring."""

    kind: Literal["color", "count"] = "color"
    """'color': name the colour of the shape the question names; 'count': how many shapes there are."""
    image_size: int = 64
    """Side of the square image in pixels, a multiple of 32 (64: 4 merged image tokens)."""
    n_colors: int = 4
    """How many palette colours are drawn from (the first n of red, green, blue, yellow, purple, orange,
    cyan, pink); with kind 'color' also the number of possible answers."""
    shapes: tuple[str, ...] = SHAPES
    """Shape types drawn from, a subset of 'circle', 'square', 'triangle'."""
    distractors: int = 1
    """Kind 'color': shapes besides the target, each of another type and another colour than it."""
    max_count: int = 4
    """Kind 'count': the image holds 1..max_count shapes (at most 9, so the answer is one digit)."""
    shape_size: tuple[int, ...] = (12, 24)
    """Smallest and largest side of a shape's bounding box in pixels, drawn uniformly per shape."""
    noise: int = 0
    """Per-pixel, per-channel uniform noise amplitude on the background (0: plain; at most 20)."""
    template: str | None = None
    """Prompt text with one '<image>'; kind 'color' fills {shape} (and {color}: a giveaway), 'count' {color}.
    None: '<image>What color is the {shape}?' or '<image>How many shapes?'."""

    def __post_init__(self) -> None:
        if self.kind not in _TEMPLATES:
            raise ValueError(f"kind must be one of {tuple(_TEMPLATES)}, got {self.kind!r}")
        if self.image_size <= 0 or self.image_size % SIDE_MULTIPLE:
            raise ValueError(
                f"image_size must be a positive multiple of {SIDE_MULTIPLE}, got {self.image_size}"
            )
        if not 1 <= self.n_colors <= len(PALETTE):
            raise ValueError(f"n_colors must be in [1, {len(PALETTE)}], got {self.n_colors}")
        if not self.shapes or len(set(self.shapes)) != len(self.shapes) or set(self.shapes) - set(SHAPES):
            raise ValueError(f"shapes must be distinct names from {SHAPES}, got {self.shapes!r}")
        if self.kind == "color" and self.distractors and (len(self.shapes) < 2 or self.n_colors < 2):
            raise ValueError(
                "distractors need at least 2 shape types and 2 colours (they differ from the target)"
            )
        if self.distractors < 0 or not 1 <= self.max_count <= 9:
            raise ValueError(
                f"need distractors >= 0 and 1 <= max_count <= 9, got {self.distractors}, {self.max_count}"
            )
        if not 0 <= self.noise <= MAX_NOISE:
            raise ValueError(f"noise must be in [0, {MAX_NOISE}], got {self.noise}")
        if len(self.shape_size) != 2:
            raise ValueError(f"shape_size must be (min, max), got {self.shape_size}")
        lo, hi = self.shape_size
        cell = self._cell(self._max_shapes())
        if not 3 <= lo <= hi <= cell - _GAP:
            raise ValueError(
                f"shape_size must satisfy 3 <= min <= max <= {cell - _GAP} ({self._max_shapes()} shapes in a "
                f"{self.image_size}-pixel image), got {self.shape_size}"
            )
        text = self.prompt_template()
        if text.count(IMAGE_PLACEHOLDER) != 1:
            raise ValueError(f"template must hold {IMAGE_PLACEHOLDER!r} exactly once, got {text!r}")
        fields = _FIELDS[self.kind]
        try:
            text.format(**dict.fromkeys(fields, ""))
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template {text!r}: kind {self.kind!r} fills only {fields} ({e})") from None

    def prompt_template(self) -> str:
        """The template in use (the kind's default when `template` is None)."""
        return self.template if self.template is not None else _TEMPLATES[self.kind]

    def colors(self) -> list[str]:
        """Colour names drawn from: the first `n_colors` of the palette."""
        return list(PALETTE)[: self.n_colors]

    def answers(self) -> list[str]:
        """Every answer a record can have: the colour names, or '1'..str(max_count)."""
        return self.colors() if self.kind == "color" else [str(k) for k in range(1, self.max_count + 1)]

    def records(self, n: int, *, seed: int) -> list[PromptRecord]:
        """`n` image prompts drawn i.i.d. from `random.Random(seed)`: the same seed, the same pixels."""
        rng = random.Random(seed)
        return [self._record(rng, row=i + 1) for i in range(n)]

    def splits(
        self, n_train: int, n_eval: int, *, seed: int
    ) -> tuple[list[PromptRecord], list[PromptRecord]]:
        """Train and eval lists drawn with disjoint seeds (2·seed and 2·seed + 1)."""
        return self.records(n_train, seed=2 * seed), self.records(n_eval, seed=2 * seed + 1)

    def sft_text(self, record: PromptRecord) -> str:
        """The response a cold-start SFT teaches: the answer ('red', '3')."""
        return record.answer

    def describe(self) -> str:
        """One line for logs."""
        (lo, hi), side = self.shape_size, self.image_size
        what = (
            f"colour of the named shape among {1 + self.distractors}"
            if self.kind == "color"
            else f"count 1..{self.max_count} shapes of one colour"
        )
        return (
            f"visual {self.kind}: {what}; {side}x{side} image, {self.n_colors} colours, "
            f"shapes {'/'.join(self.shapes)} of {lo}-{hi} px, background noise {self.noise}; "
            f"answers {', '.join(self.answers())}"
        )

    def _max_shapes(self) -> int:
        return 1 + self.distractors if self.kind == "color" else self.max_count

    def _cell(self, n_shapes: int) -> int:
        return self.image_size // math.ceil(math.sqrt(n_shapes))

    def _record(self, rng: random.Random, *, row: int) -> PromptRecord:
        colors = self.colors()
        if self.kind == "color":
            shape, color = rng.choice(self.shapes), rng.choice(colors)
            others_shape = [s for s in self.shapes if s != shape]
            others_color = [c for c in colors if c != color]
            kinds = [(shape, color)] + [
                (rng.choice(others_shape), rng.choice(others_color)) for _ in range(self.distractors)
            ]
            fields = {"shape": shape, "color": color}
        else:
            color = rng.choice(colors)
            kinds = [(rng.choice(self.shapes), color) for _ in range(rng.randint(1, self.max_count))]
            fields = {"color": color}
        objects = self._place(rng, kinds)
        image = self._draw(rng, objects)
        meta: dict[str, Any] = {"task": "visual", "kind": self.kind, "color": color, "objects": objects}
        if self.kind == "color":
            meta.update(shape=objects[0]["shape"], center=objects[0]["center"], size=objects[0]["size"])
            answer = color
        else:
            meta["count"] = len(objects)
            answer = str(len(objects))
        return PromptRecord(
            prompt=self.prompt_template().format(**fields), answer=answer, meta=meta, row=row, images=[image]
        )

    def _place(self, rng: random.Random, kinds: list[tuple[str, str]]) -> list[dict[str, Any]]:
        """Each shape in its own random cell of a g x g grid (g = ceil(sqrt(n))), at a random spot in it.

        A shape spans at most cell - 2 pixels inside its cell, so shapes in abutting cells are >= 2 pixels
        apart: they never overlap nor touch, even diagonally.
        """
        grid = math.ceil(math.sqrt(len(kinds)))
        cell = self.image_size // grid
        cells = rng.sample(range(grid * grid), len(kinds))
        lo, hi = self.shape_size
        objects = []
        for (shape, color), at in zip(kinds, cells, strict=True):
            size = rng.randint(lo, min(hi, cell - _GAP))
            x0 = (at % grid) * cell + 1 + rng.randint(0, cell - _GAP - size)
            y0 = (at // grid) * cell + 1 + rng.randint(0, cell - _GAP - size)
            # the bounding box's centre pixel lies inside all three shapes (a triangle is half as wide there)
            center = [x0 + (size - 1) // 2, y0 + (size - 1) // 2]
            box = [x0, y0, x0 + size - 1, y0 + size - 1]  # inclusive, as PIL draws it
            objects.append({"shape": shape, "color": color, "box": box, "center": center, "size": size})
        return objects

    def _draw(self, rng: random.Random, objects: list[dict[str, Any]]) -> Any:
        from PIL import Image, ImageDraw

        side = self.image_size
        if self.noise:
            import numpy as np

            noise = np.random.default_rng(rng.getrandbits(64)).integers(
                -self.noise, self.noise + 1, size=(side, side, 3)
            )
            pixels = np.clip(np.asarray(BACKGROUND) + noise, 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
        else:
            image = Image.new("RGB", (side, side), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            fill = PALETTE[obj["color"]]
            if obj["shape"] == "circle":
                draw.ellipse([x0, y0, x1, y1], fill=fill)
            elif obj["shape"] == "square":
                draw.rectangle([x0, y0, x1, y1], fill=fill)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        return image
