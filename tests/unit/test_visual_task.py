"""VisualTask (megatron_sapo/data/visual_task.py): deterministic images, answers checked on the pixels.

The reference for correctness is the image itself, not the generator's bookkeeping: the pixel at the
recorded target centre must carry the answer colour's RGB, and a flood fill over non-background pixels
must find as many connected regions as the count answer.
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_sapo.data import PromptRecord, VisualTask
from megatron_sapo.data.visual_task import PALETTE

TASKS = [
    VisualTask(),
    VisualTask(noise=20, n_colors=8, distractors=3),
    VisualTask(kind="count"),
    VisualTask(kind="count", max_count=9, shape_size=(8, 18), noise=10, image_size=96),
]


def _pixels(records: list[PromptRecord]) -> list[bytes]:
    return [r.images[0].tobytes() for r in records]


def _components(mask: np.ndarray) -> int:
    """8-connected components of a boolean mask, by an explicit flood fill."""
    seen = np.zeros_like(mask)
    h, w = mask.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(mask), strict=True):
        if seen[y0, x0]:
            continue
        n += 1
        stack = [(y0, x0)]
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < h and 0 <= u < w and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
    return n


def test_same_seed_same_bytes_other_seed_differs():
    task = VisualTask(noise=10)
    a, b = task.records(20, seed=3), task.records(20, seed=3)
    assert _pixels(a) == _pixels(b) and [r.prompt for r in a] == [r.prompt for r in b]
    assert a == b  # PIL images compare by pixels
    assert _pixels(task.records(20, seed=4)) != _pixels(a)
    assert all(x != y for x, y in zip(_pixels(task.records(20, seed=4)), _pixels(a), strict=True))
    assert [r.row for r in a] == list(range(1, 21))


def test_splits_use_disjoint_seeds():
    task = VisualTask()
    train, evals = task.splits(30, 20, seed=5)
    assert _pixels(train) == _pixels(task.records(30, seed=10))
    assert _pixels(evals) == _pixels(task.records(20, seed=11))
    assert not set(_pixels(train)) & set(_pixels(evals))


@pytest.mark.parametrize("task", TASKS, ids=lambda t: f"{t.kind}-{t.n_colors}-{t.noise}-{t.image_size}")
def test_answers_match_the_pixels(task):
    records = task.records(60, seed=0)
    assert {r.answer for r in records} <= set(task.answers())
    side = task.image_size
    for r in records:
        image = r.images[0]
        assert image.mode == "RGB" and image.size == (side, side) and side % 32 == 0
        assert r.prompt.startswith("<image>") and task.sft_text(r) == r.answer
        pixels = np.asarray(image)
        # background is grey +- noise; every palette colour has a channel far from it
        coloured = (pixels.max(axis=2).astype(int) - pixels.min(axis=2)) > 2 * task.noise + 60
        if task.kind == "color":
            x, y = r.meta["center"]
            assert tuple(pixels[y, x]) == PALETTE[r.answer]
            assert r.prompt == f"<image>What color is the {r.meta['shape']}?"
            assert _components(coloured) == 1 + task.distractors
            others = {o["color"] for o in r.meta["objects"][1:]}
            assert r.answer not in others
            assert r.meta["shape"] not in {o["shape"] for o in r.meta["objects"][1:]}
        else:
            assert r.prompt == "<image>How many shapes?"
            assert _components(coloured) == int(r.answer)
            assert {tuple(p) for p in pixels[coloured]} == {PALETTE[r.meta["color"]]}
    if task.kind == "count":
        assert {r.answer for r in records} == set(task.answers())


def test_knobs_and_describe():
    task = VisualTask()
    assert task.answers() == ["red", "green", "blue", "yellow"]
    assert VisualTask(kind="count", max_count=3).answers() == ["1", "2", "3"]
    assert "4 colours" in task.describe() and "64x64" in task.describe()
    r = VisualTask(kind="count", template="<image>How many {color} shapes?").records(1, seed=0)[0]
    assert r.prompt == f"<image>How many {r.meta['color']} shapes?"
    for bad, match in [
        ({"image_size": 48}, "multiple of 32"),
        ({"template": "What color is the {shape}?"}, "<image>"),
        ({"kind": "count", "template": "<image>{shape}?"}, "fills only"),
        ({"shape_size": (12, 40)}, "shape_size"),
        ({"shapes": ("circle",)}, "distractors"),
        ({"noise": 50}, "noise"),
        ({"kind": "size"}, "kind"),
    ]:
        with pytest.raises(ValueError, match=match):
            VisualTask(**bad)
