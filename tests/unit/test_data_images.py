"""Datasets with images: jsonl / parquet layouts, placeholders, errors with file and row, pixel limits.

References are independent of `data/vision.py`: Qwen-VL's resize rule written out here (and checked against
transformers' `smart_resize`), the chat template's text built by hand, and the processor's own output for
images resized with PIL beforehand.
Run: `python -m pytest tests/unit/test_data_images.py -q` (~10 s).
"""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

from megatron_sapo.data import DataError, ImageRenderer, load_records, render_prompt
from megatron_sapo.data.config import DataConfig
from megatron_sapo.utils.tiny_vlm import MERGE, PATCH_SIZE, build_processor, train_vlm_tokenizer
from megatron_sapo.utils.typed_config import ConfigError

MIN_PIXELS, MAX_PIXELS = 32 * 32, 128 * 128  # the tiny processor's own limits
FACTOR = PATCH_SIZE * MERGE
VISION = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def processor():
    return build_processor(train_vlm_tokenizer(), min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def qwen_size(height: int, width: int, lo: int = MIN_PIXELS, hi: int = MAX_PIXELS) -> tuple[int, int]:
    """Qwen-VL's rule: nearest multiples of 32; past `hi`, floor after scaling the area to `hi`; under
    `lo`, ceil after scaling it to `lo`."""
    h, w = FACTOR * round(height / FACTOR), FACTOR * round(width / FACTOR)
    if h * w > hi:
        s = math.sqrt(height * width / hi)
        return max(FACTOR, FACTOR * math.floor(height / s / FACTOR)), max(
            FACTOR, FACTOR * math.floor(width / s / FACTOR)
        )
    if h * w < lo:
        s = math.sqrt(lo / (height * width))
        return FACTOR * math.ceil(height * s / FACTOR), FACTOR * math.ceil(width * s / FACTOR)
    return h, w


def pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def chat(user: str, system: str | None = None) -> str:
    head = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return f"{head}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def resized(array: np.ndarray, lo: int = MIN_PIXELS, hi: int = MAX_PIXELS) -> Image.Image:
    h, w = qwen_size(*array.shape[:2], lo, hi)
    return Image.fromarray(array).resize((w, h), Image.Resampling.BICUBIC)


def test_resize_rule_matches_transformers() -> None:
    for height, width in [(5, 7), (64, 96), (1000, 1500), (30, 500), (17, 3000), (128, 128), (200, 90)]:
        for lo, hi in [(MIN_PIXELS, MAX_PIXELS), (2048, 8192)]:
            expected = hf_smart_resize(height, width, factor=FACTOR, min_pixels=lo, max_pixels=hi)
            assert qwen_size(height, width, lo, hi) == expected, (height, width, lo, hi)
    assert qwen_size(5, 7) == (32, 64)  # by hand: area 35 -> x5.41 -> ceil(0.85), ceil(1.18) blocks of 32


def test_jsonl_paths_base64_and_data_uris(tmp_path, processor) -> None:
    arrays = [pixels(40, 60, seed=i) for i in range(5)]
    (tmp_path / "imgs").mkdir()
    for i, a in enumerate(arrays[:3]):
        Image.fromarray(a).save(tmp_path / "imgs" / f"{i}.png")
    b64 = base64.b64encode(png(arrays[3])).decode()
    uri = "data:image/png;base64," + base64.b64encode(png(arrays[4])).decode()
    values = ["imgs/0.png", str(tmp_path / "imgs" / "1.png"), {"path": "imgs/2.png"}, b64, uri]
    rows = [{"q": f"Describe. {i}", "a": "x", "img": v, "id": i} for i, v in enumerate(values)]
    rows.append({"q": "Both: <image> and <image>.", "a": "y", "img": ["imgs/0.png", uri], "id": 5})
    records = load_records(
        write_jsonl(tmp_path / "d.jsonl", rows), prompt_field="q", answer_field="a", image_fields=["img"]
    )
    renderer = ImageRenderer(processor)
    for i, (record, value) in enumerate(zip(records, values, strict=False)):
        assert record.images == [value] and record.meta == {"id": i}  # raw, and not twice in meta
        assert record.base_dir == str(tmp_path)
        prompt = renderer.render(record)
        assert prompt.text == chat(f"{VISION}Describe. {i}")  # no placeholder: images before the text
        assert np.array_equal(np.asarray(prompt.images[0]), np.asarray(resized(arrays[i])))
    both = renderer.render(records[5])
    assert both.text == chat(f"Both: {VISION} and {VISION}.")
    assert [np.asarray(im).tolist() for im in both.images] == [
        np.asarray(resized(arrays[0])).tolist(),
        np.asarray(resized(arrays[4])).tolist(),
    ]


def test_parquet_hf_image_layouts(tmp_path, processor) -> None:
    """HF datasets' Image feature: a struct {bytes, path} column and a list of them (geometry3k)."""
    small, wide, tall = pixels(32, 32, 1), pixels(40, 120, 2), pixels(120, 40, 3)
    Image.fromarray(tall).save(tmp_path / "tall.png")
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table(
        {
            "problem": ["<image>Find x in <image>.", "Which is larger?"],
            "answer": ["3", "4"],
            "cover": pa.array([{"bytes": png(small), "path": "cover.png"}] * 2, type=image),
            "images": pa.array(
                [[{"bytes": png(wide), "path": "w.png"}], [{"bytes": None, "path": "tall.png"}]],
                type=pa.list_(image),
            ),
        }
    )
    pq.write_table(table, tmp_path / "geo.parquet")
    records = load_records(tmp_path / "geo.parquet", prompt_field="problem", image_fields=["cover", "images"])
    assert [len(r.images) for r in records] == [2, 2] and all(r.meta == {} for r in records)
    renderer = ImageRenderer(processor)
    first, second = (renderer.render(r, system_prompt="Be exact.") for r in records)
    assert first.text == chat(f"{VISION}Find x in {VISION}.", system="Be exact.")
    assert second.text == chat(f"{VISION}{VISION}Which is larger?", system="Be exact.")
    for prompt, arrays in [(first, [small, wide]), (second, [small, tall])]:  # field order
        sizes = [qwen_size(*a.shape[:2]) for a in arrays]
        expected = [[1, h // PATCH_SIZE, w // PATCH_SIZE] for h, w in sizes]
        assert prompt.image_grid_thw.tolist() == expected


def test_chat_messages_with_placeholders(tmp_path, processor) -> None:
    a, b = pixels(64, 64, 4), pixels(32, 96, 5)
    row = {
        "prompt": [
            {"role": "system", "content": "You see images."},
            {"role": "user", "content": "First <image>"},
            {"role": "assistant", "content": "Seen."},
            {"role": "user", "content": "<image> second: compare."},
        ],
        "answer": "same",
        "imgs": [base64.b64encode(png(a)).decode(), base64.b64encode(png(b)).decode()],
    }
    (record,) = load_records(write_jsonl(tmp_path / "c.jsonl", [row]), image_fields=["imgs"])
    prompt = ImageRenderer(processor).render(record, system_prompt="ignored: the messages have one")
    assert prompt.text == (
        "<|im_start|>system\nYou see images.<|im_end|>\n"
        f"<|im_start|>user\nFirst {VISION}<|im_end|>\n<|im_start|>assistant\nSeen.<|im_end|>\n"
        f"<|im_start|>user\n{VISION} second: compare.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt.image_grid_thw.tolist() == [[1, 4, 4], [1, 2, 6]]  # 64x64 and 32x96 are kept as is


@pytest.mark.parametrize(
    ("shape", "limits"),
    [((5, 7), None), ((1000, 1500), None), ((30, 500), None), ((64, 96), None), ((70, 90), (2048, 4096))],
)
def test_pixel_limits_grid_tokens_and_pixels(tmp_path, processor, shape, limits) -> None:
    array = pixels(*shape, seed=6)
    row = {"prompt": "What is shown?", "answer": "noise", "image": base64.b64encode(png(array)).decode()}
    (record,) = load_records(write_jsonl(tmp_path / "p.jsonl", [row]), image_fields=["image"])
    lo, hi = limits or (MIN_PIXELS, MAX_PIXELS)
    renderer = DataConfig(
        train_path="p.jsonl",
        image_fields=["image"],
        min_pixels=limits and limits[0],
        max_pixels=limits and limits[1],
    ).image_renderer(processor)
    prompt = renderer.render(record)
    h, w = qwen_size(*shape, lo, hi)
    assert prompt.image_grid_thw.tolist() == [[1, h // PATCH_SIZE, w // PATCH_SIZE]]
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert prompt.input_ids.count(pad) == (h // PATCH_SIZE) * (w // PATCH_SIZE) // MERGE**2
    # The processor, given the image resized with PIL beforehand, yields the same pixels: it resized nothing.
    image = resized(array, lo, hi)
    reference = processor.image_processor(images=[image], return_tensors="pt")
    assert torch.equal(prompt.pixel_values, reference["pixel_values"])
    assert prompt.images[0].size == (w, h)
    if (h, w) != shape and limits is None:  # torchvision's own resize gives other pixels
        own = processor.image_processor(images=[Image.fromarray(array)], return_tensors="pt")
        assert not torch.equal(own["pixel_values"], prompt.pixel_values)


def test_limits_outside_the_processor_range(processor) -> None:
    for kwargs, key in [
        ({"min_pixels": MIN_PIXELS - 1}, "data.min_pixels"),
        ({"max_pixels": MAX_PIXELS + 1}, "data.max_pixels"),
        ({"min_pixels": 4096, "max_pixels": 2048}, "data.min_pixels"),
    ]:
        with pytest.raises(ConfigError) as info:
            ImageRenderer(processor, **kwargs)
        assert str(info.value).startswith(f"{key}:"), info.value
    with pytest.raises(ConfigError, match=r"^max_pixels:"):
        DataConfig(max_pixels=0)
    with pytest.raises(ConfigError, match=r"^image_fields:"):
        DataConfig(image_fields=["image"])  # no train_path: the synthetic task has no images


def _one_line_error(call, path, row: int, message: str) -> None:
    with pytest.raises(DataError) as info:
        call()
    text = str(info.value)
    assert text.startswith(f"{path}:{row}:") and message in text and "\n" not in text, text


def test_errors_name_file_and_row(tmp_path, processor) -> None:
    Image.fromarray(pixels(32, 32)).save(tmp_path / "ok.png")
    ok = {"prompt": "Look.", "answer": "a", "image": "ok.png"}
    bad_rows = {
        "missing field": ({"prompt": "Look.", "answer": "a"}, "missing field 'image'"),
        "missing file": ({**ok, "image": "gone.png"}, "gone.png' not found"),
        "absolute missing file": ({**ok, "image": str(tmp_path / "no.png")}, "no.png' not found"),
        "wrong type": ({**ok, "image": 3}, "must be a path, bytes, base64 or a data URI"),
        "list of lists": ({**ok, "image": [["ok.png"]]}, "image[0]: an image must be"),
        "empty struct": ({**ok, "image": {"bytes": None, "path": None}}, "neither 'bytes' nor 'path'"),
        "count mismatch": (
            {**ok, "prompt": "<image> vs <image> vs <image>", "image": ["ok.png", "ok.png"]},
            "3 '<image>' placeholders but 2 images",
        ),
    }
    for name, (row, message) in bad_rows.items():
        path = write_jsonl(tmp_path / f"{name.replace(' ', '_')}.jsonl", [ok, ok, row])
        _one_line_error(lambda path=path: load_records(path, image_fields=["image"]), path, 3, message)

    # Decoding happens at render time: undecodable bytes, and a file gone since loading.
    garbage = base64.b64encode(b"not an image at all").decode()
    path = write_jsonl(tmp_path / "render.jsonl", [ok, {**ok, "image": garbage}, {**ok, "image": "late.png"}])
    Image.fromarray(pixels(32, 32)).save(tmp_path / "late.png")
    records = load_records(path, image_fields=["image"])
    (tmp_path / "late.png").unlink()
    renderer = ImageRenderer(processor)
    _one_line_error(lambda: renderer.render(records[1]), path, 2, "image 1: cannot decode the image")
    _one_line_error(lambda: renderer.render(records[2]), path, 3, "late.png' not found")

    # Too long after the images are expanded; the limit counts every pad.
    n = len(renderer.render(records[0]).input_ids)
    assert len(renderer.render(records[0], max_prompt_tokens=n).input_ids) == n
    _one_line_error(lambda: renderer.render(records[0], max_prompt_tokens=n - 1), path, 1, f"{n} tokens")

    # An aspect ratio Qwen-VL refuses, and a text-only render of an image record.
    Image.fromarray(pixels(2, 500)).save(tmp_path / "thin.png")
    (thin,) = load_records(
        write_jsonl(tmp_path / "thin.jsonl", [{**ok, "image": "thin.png"}]), image_fields=["image"]
    )
    _one_line_error(lambda: renderer.render(thin), tmp_path / "thin.jsonl", 1, "aspect ratio 200")
    _one_line_error(lambda: render_prompt(records[0], processor.tokenizer), path, 1, "ImageRenderer")


def test_dotted_image_field_and_text_rows(tmp_path, processor) -> None:
    """A nested field keeps its siblings in meta; a row without images and placeholders renders as text."""
    Image.fromarray(pixels(32, 32)).save(tmp_path / "ok.png")
    rows = [
        {"prompt": "Look.", "answer": "a", "media": {"images": ["ok.png"], "credit": "me"}},
        {"prompt": "Just text.", "answer": "b", "media": {"images": [], "credit": "you"}},
    ]
    records = load_records(write_jsonl(tmp_path / "m.jsonl", rows), image_fields=["media.images"])
    assert [r.meta for r in records] == [{"media": {"credit": "me"}}, {"media": {"credit": "you"}}]
    prompt = ImageRenderer(processor).render(records[1])
    assert prompt.text == chat("Just text.") and prompt.images == [] and prompt.pixel_values is None
    assert prompt.input_ids == processor.tokenizer(chat("Just text."))["input_ids"]
    assert render_prompt(records[1], processor.tokenizer) == prompt.input_ids
