"""`data/images.py`: every accepted form decodes to the same pixels; bad images fail naming where."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from megatron_sapo.data.datasets import DataError
from megatron_sapo.data.images import load_image, to_data_uri


@pytest.fixture()
def picture(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    path = tmp_path / "imgs" / "a.png"
    path.parent.mkdir()
    Image.fromarray(pixels).save(path)
    return pixels, path


def test_every_form_gives_the_same_pixels(picture, tmp_path) -> None:
    pixels, path = picture
    raw = path.read_bytes()
    forms = {
        "absolute path": str(path),
        "relative path": "imgs/a.png",
        "bytes": raw,
        "parquet dict": {"bytes": raw, "path": None},
        "dict with path": {"bytes": None, "path": "imgs/a.png"},
        "base64": base64.b64encode(raw).decode(),
        "data uri": "data:image/png;base64," + base64.b64encode(raw).decode(),
        "PIL": Image.open(io.BytesIO(raw)),
    }
    for name, value in forms.items():
        image = load_image(value, where=name, base_dir=tmp_path)
        assert image.mode == "RGB" and np.array_equal(np.asarray(image), pixels), name
    again = load_image(to_data_uri(load_image(str(path), where="x")), where="round trip")
    assert np.array_equal(np.asarray(again), pixels)  # PNG data URIs are lossless


def test_bad_images_name_where_they_came_from(picture, tmp_path) -> None:
    _, path = picture
    truncated = path.read_bytes()[:-200]
    cases = {
        "missing file": ("imgs/nope.png", "not found"),
        "truncated": (truncated, "cannot decode"),
        "not an image": (b"hello world, not a png", "cannot decode"),
        "bad base64": ("%%%not-base64%%%", "neither an existing file nor valid base64"),
        "empty dict": ({"bytes": None, "path": None}, "neither 'bytes' nor 'path'"),
        "number": (42, "must be a path"),
    }
    for name, (value, message) in cases.items():
        where = f"data.jsonl row {len(name)}"
        with pytest.raises(DataError) as info:
            load_image(value, where=where, base_dir=tmp_path)
        text = str(info.value)
        assert text.startswith(where) and message in text and "\n" not in text, (name, text)
