"""Images as datasets ship them, decoded or refused with one line naming where they came from.

    image = load_image("imgs/0001.png", where="train.jsonl row 12", base_dir="data/")   # path
    image = load_image(row["image"]["bytes"], where="geo.parquet row 3")               # parquet bytes
    image = load_image("data:image/png;base64,iVBOR...", where=...)                     # data URI / base64
    uri = to_data_uri(image)                                  # what SGLang's `image_data` takes

Accepted values: a PIL image, raw bytes, a `{"bytes": ..., "path": ...}` dict (HF datasets' Image
feature in parquet), a `data:` URI, a base64 string, or a path (relative paths against `base_dir`, the
dataset file's folder). Every image is fully decoded here and converted to RGB, so a truncated or
corrupt file fails now, as a `DataError` naming `where` — never later inside the processor, a worker or
the SGLang server. `check_image` is the cheap load-time half (type, and that a named file exists; no
decoding), so a dataset's rows fail at load without holding decoded pixels.
Tests: `python -m pytest tests/unit/test_images.py tests/unit/test_data_images.py -q`
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

from megatron_sapo.data.datasets import DataError


def _decode(data: bytes, where: str, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decode every pixel: a truncated file fails here, not in the processor
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{where}: cannot decode the image ({what}, {len(data)} bytes): {e}") from None


def load_image(value: Any, *, where: str, base_dir: str | Path | None = None) -> Any:
    """The RGB `PIL.Image` of `value` (see the module doc); `DataError` naming `where` otherwise."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict):  # HF datasets' Image feature: bytes, or a path beside the data
        if value.get("bytes"):
            return _decode(bytes(value["bytes"]), where, "bytes")
        return load_image(_dict_path(value, where), where=where, base_dir=base_dir)
    if isinstance(value, bytes | bytearray | memoryview):
        return _decode(bytes(value), where, "bytes")
    if _data_uri(value, where) is not None:
        return _decode(_b64(value.partition(",")[2], where), where, "data URI")
    path = _named_file(value, base_dir, where)
    if path is not None:
        return _decode(path.read_bytes(), where, f"file {str(path)!r}")
    return _decode(_b64(value, where), where, "base64")


def check_image(value: Any, *, where: str, base_dir: str | Path | None = None) -> None:
    """`load_image`'s checks that need no decoding: an accepted type, a base64 data URI, an existing file.

    Raises the same `DataError` lines `load_image` would; bytes and base64 are only decoded there.
    """
    from PIL import Image

    if isinstance(value, Image.Image):
        return
    if isinstance(value, dict):
        if not value.get("bytes"):
            check_image(_dict_path(value, where), where=where, base_dir=base_dir)
        return
    if isinstance(value, bytes | bytearray | memoryview):
        if not len(value):
            raise DataError(f"{where}: the image is empty (0 bytes)")
        return
    if _data_uri(value, where) is None:
        _named_file(value, base_dir, where)


def _dict_path(value: dict, where: str) -> str:
    if not value.get("path"):
        raise DataError(f"{where}: image field has neither 'bytes' nor 'path' (keys: {sorted(value)})")
    return str(value["path"])


def _data_uri(value: Any, where: str) -> str | None:
    """The header of a `data:` URI (None for any other string); refuses non-strings and non-base64 URIs."""
    if not isinstance(value, str) or not value:
        raise DataError(
            f"{where}: an image must be a path, bytes, base64 or a data URI, got {type(value).__name__}"
        )
    if not value.startswith("data:"):
        return None
    header = value.partition(",")[0]
    if ";base64" not in header:
        raise DataError(f"{where}: only base64 data URIs are supported, got {header[:40]!r}")
    return header


def _named_file(value: str, base_dir: str | Path | None, where: str) -> Path | None:
    """The existing file a string names, None when it reads as base64; `DataError` for a missing file.

    A path has a suffix and base64 never has a '.'; a string of 1024+ characters is taken as a payload
    (no real image path is that long, and `Path.exists` raises on names past the system's limit).
    """
    if len(value) >= 1024:
        return None
    path = Path(value) if base_dir is None or Path(value).is_absolute() else Path(base_dir) / value
    if not path.suffix:
        return None
    if not path.exists():
        raise DataError(f"{where}: image file {str(path)!r} not found")
    return path


def _b64(payload: str, where: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise DataError(f"{where}: image is neither an existing file nor valid base64") from None


def to_data_uri(image: Any) -> str:
    """A PNG data URI of a PIL image (lossless: the server decodes the pixels the trainer's processor saw)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
