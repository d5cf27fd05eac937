"""Prompt datasets from jsonl / parquet files, and prompt rendering with the tokenizer's chat template.

    records = load_records("dapo-math-17k.parquet", prompt_field="prompt",
                           answer_field="reward_model.ground_truth")
    records = load_records("gsm8k.jsonl", prompt_field="question", answer_field="answer",
                           answer_extract="gsm8k")
    ids = render_prompt(records[0], tokenizer, max_prompt_tokens=1024)
    records = load_records("geometry3k.parquet", prompt_field="problem", image_fields=["images"])

A field name is a dotted path into nested dicts. The prompt field may hold a string (the user message)
or a chat-messages list `[{"role": ..., "content": ...}, ...]` (the DAPO-Math-17k layout), which is
kept and rendered as is. Every problem in a file is a `DataError` whose one-line message names the
file and the 1-based row (the line number for jsonl).

Image fields (each one image or a list; paths, bytes, base64, data URIs, HF datasets' Image structs)
are checked here without decoding — accepted types, existing files, one image per placeholder — and
kept raw on the record, so a large image set does not sit decoded on every rank; `data/vision.py`
decodes and renders them. Tests: tests/unit/test_data.py, tests/unit/test_data_images.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ANSWER_EXTRACTS = ("none", "gsm8k")
_NUMBER_TYPES = (int, float)


class DataError(ValueError):
    """A dataset problem; the message names the file and the 1-based row."""


@dataclass
class PromptRecord:
    """One RL prompt with its ground truth."""

    prompt: str
    """The user message (for a chat-messages source: the content of its last user message)."""
    answer: str
    """Ground-truth answer the reward compares against."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Other top-level fields of the source row (or generator parameters), passed to rewards as is."""
    messages: list[dict[str, str]] | None = None
    """The full chat-messages list when the source held one; rendered instead of `prompt`."""
    source: str = ""
    """File the record came from ("" for generated records), for error messages."""
    row: int = 0
    """1-based row in `source` (the line number for jsonl)."""
    images: list[Any] = field(default_factory=list)
    """The prompt's images as the file holds them (path, bytes, base64 / data URI, {"bytes", "path"}),
    in field order, not decoded; `data.vision.ImageRenderer` decodes them."""
    base_dir: str = ""
    """Folder of `source`, against which relative image paths resolve."""
    image_placeholder: str = "<image>"
    """Text marking each image's place in the prompt; with none in the prompt the images go in front of
    the last user message."""

    def where(self) -> str:
        """'file:row' (or 'record N') for error messages."""
        return f"{self.source}:{self.row}" if self.source else f"record {self.row}"


def load_records(
    path: str | Path,
    *,
    format: Literal["auto", "jsonl", "parquet"] = "auto",
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    answer_extract: Literal["none", "gsm8k"] = "none",
    image_fields: Sequence[str] = (),
    image_placeholder: str = "<image>",
) -> list[PromptRecord]:
    """Read every row of a jsonl or parquet file into `PromptRecord`s.

    `format="auto"` picks by suffix (.jsonl / .ndjson / .parquet). `answer_extract="gsm8k"` keeps the
    text after the last '####' of the answer, without thousands separators ("#### 1,200" → "1200").
    `image_fields` name the fields holding the prompt's images (one image or a list each, taken in
    field order); with them, each `image_placeholder` in the prompt's user text marks one image, and a
    prompt without any takes its images in front of its last user message.
    Raises `DataError` (file + row) on unreadable rows, missing fields, an empty prompt, an answer that
    is neither a string nor a number, an image value of another type or naming a missing file, a
    placeholder count other than the image count, and on a file without rows.
    """
    path = Path(path)
    if answer_extract not in ANSWER_EXTRACTS:
        raise ValueError(f"answer_extract must be one of {ANSWER_EXTRACTS}, got {answer_extract!r}")
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    fmt = _detect_format(path) if format == "auto" else format
    rows = {"jsonl": _jsonl_rows, "parquet": _parquet_rows}.get(fmt)
    if rows is None:
        raise ValueError(f"format must be 'auto', 'jsonl' or 'parquet', got {format!r}")
    if image_fields and not image_placeholder:
        raise ValueError("image_placeholder must be a non-empty string")
    layout = _Layout(
        prompt_field=prompt_field,
        answer_field=answer_field,
        answer_extract=answer_extract,
        image_fields=tuple(image_fields),
        image_placeholder=image_placeholder,
        base_dir=path.parent.absolute(),
    )
    records = [_to_record(row, path, n, layout) for n, row in rows(path)]
    if not records:
        raise DataError(f"{path}: the file has no rows")
    return records


def render_prompt(
    record: PromptRecord,
    tokenizer: Any,
    *,
    apply_chat_template: bool = True,
    system_prompt: str | None = None,
    max_prompt_tokens: int | None = None,
) -> list[int]:
    """Token ids of the prompt, ready for generation.

    With `apply_chat_template` and a tokenizer that has a template: the record's messages (or one user
    message) through `tokenizer.apply_chat_template(..., add_generation_prompt=True)`, with
    `system_prompt` as a leading system message unless the messages already open with one. Otherwise
    plain `tokenizer(text)`, where text is `system_prompt + "\\n\\n" + prompt` (or just the prompt).
    Raises `DataError` naming the record's file and row when the result exceeds `max_prompt_tokens`, and
    for a record with images (a tokenizer would drop them: `data.vision.ImageRenderer` renders those).
    """
    if record.images:
        raise DataError(
            f"{record.where()}: the prompt has {len(record.images)} images; render it with "
            "data.vision.ImageRenderer (a text tokenizer drops images)"
        )
    if apply_chat_template and getattr(tokenizer, "chat_template", None):
        messages = list(record.messages) if record.messages else [{"role": "user", "content": record.prompt}]
        if system_prompt is not None and messages[0].get("role") != "system":
            messages.insert(0, {"role": "system", "content": system_prompt})
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
    else:
        text = record.prompt if system_prompt is None else f"{system_prompt}\n\n{record.prompt}"
        ids = tokenizer(text)["input_ids"]
    ids = list(ids)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        raise DataError(
            f"{record.where()}: prompt has {len(ids)} tokens, more than max_prompt_tokens={max_prompt_tokens}"
        )
    return ids


def _detect_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    raise DataError(
        f"{path}: cannot tell the format from the suffix {suffix!r}; pass format='jsonl'|'parquet'"
    )


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed object) for every non-blank line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(1-based row, row dict), one record batch at a time."""
    import pyarrow.parquet as pq  # optional at import time: only parquet users need it

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a corrupt file
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    n = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            n += 1
            yield n, row


def _get_field(row: Mapping[str, Any], dotted: str) -> Any:
    """Value at a dotted path; KeyError names the first missing component."""
    value: Any = row
    for i, key in enumerate(dotted.split(".")):
        if not isinstance(value, Mapping) or key not in value:
            raise KeyError(".".join(dotted.split(".")[: i + 1]))
        value = value[key]
    return value


@dataclass(frozen=True)
class _Layout:
    """Where a file's rows keep their parts (`load_records`' arguments)."""

    prompt_field: str
    answer_field: str
    answer_extract: str
    image_fields: tuple[str, ...]
    image_placeholder: str
    base_dir: Path


def _to_record(row: Any, path: Path, n: int, layout: _Layout) -> PromptRecord:
    where = f"{path}:{n}"
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    values = {}
    for name in (layout.prompt_field, layout.answer_field, *layout.image_fields):
        try:
            values[name] = _get_field(row, name)
        except KeyError as e:
            raise DataError(f"{where}: missing field {e.args[0]!r}") from None
    prompt, messages = _prompt(values[layout.prompt_field], where, layout.prompt_field)
    answer = _answer(values[layout.answer_field], where, layout.answer_field, layout.answer_extract)
    images = _images(values, where, layout)
    top = {layout.prompt_field.split(".")[0], layout.answer_field.split(".")[0]}
    meta = {k: v for k, v in row.items() if k not in top}
    for name in layout.image_fields:  # the raw images live in `images`, not twice
        meta = _without(meta, name.split("."))
    return PromptRecord(
        prompt=prompt,
        answer=answer,
        meta=meta,
        messages=messages,
        source=str(path),
        row=n,
        images=images,
        base_dir=str(layout.base_dir),
        image_placeholder=layout.image_placeholder,
    )


def _images(values: Mapping[str, Any], where: str, layout: _Layout) -> list[Any]:
    """The row's image values in field order, checked without decoding, and their placeholder count."""
    from megatron_sapo.data.images import check_image  # images.py imports DataError from here

    images = []
    for name in layout.image_fields:
        value = values[name]
        if isinstance(value, list):
            for i, item in enumerate(value):
                check_image(item, where=f"{where}: {name}[{i}]", base_dir=layout.base_dir)
            images.extend(value)
        else:
            check_image(value, where=f"{where}: {name}", base_dir=layout.base_dir)
            images.append(value)
    if layout.image_fields:
        prompt = values[layout.prompt_field]
        texts = [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt if m["role"] == "user"]
        marks = sum(text.count(layout.image_placeholder) for text in texts)
        if marks and marks != len(images):
            raise DataError(
                f"{where}: the prompt has {marks} {layout.image_placeholder!r} placeholders but "
                f"{len(images)} images (fields {', '.join(layout.image_fields)})"
            )
    return images


def _without(row: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """A copy of `row` without the value at the dotted path `keys` (the dicts along it copied, not changed)."""
    out = dict(row)
    if len(keys) == 1:
        out.pop(keys[0], None)
    elif isinstance(out.get(keys[0]), Mapping):
        out[keys[0]] = _without(out[keys[0]], keys[1:])
    return out


def _prompt(value: Any, where: str, name: str) -> tuple[str, list[dict[str, str]] | None]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: empty prompt in field {name!r}")
        return value, None
    if not isinstance(value, list):
        raise DataError(
            f"{where}: field {name!r} must be a string or a chat-messages list, got {type(value).__name__}"
        )
    if not value:
        raise DataError(f"{where}: empty prompt in field {name!r} (no messages)")
    messages = []
    for i, m in enumerate(value):
        if not (
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        ):
            raise DataError(f"{where}: message {i} of {name!r} needs string 'role' and 'content'")
        messages.append({"role": m["role"], "content": m["content"]})
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users or not users[-1].strip():
        raise DataError(f"{where}: empty prompt in field {name!r} (no non-empty user message)")
    return users[-1], messages


def _answer(value: Any, where: str, name: str, extract: str) -> str:
    # Numbers are a natural way to store a ground truth; anything else is a layout mistake.
    if isinstance(value, _NUMBER_TYPES) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(
            f"{where}: answer field {name!r} must be a string or a number, got {type(value).__name__}"
        )
    if extract == "gsm8k":
        if "####" not in value:
            raise DataError(f"{where}: answer field {name!r} has no '####' (answer_extract='gsm8k')")
        value = value.rsplit("####", 1)[1].strip().replace(",", "")
    if not value.strip():
        raise DataError(f"{where}: empty answer in field {name!r}")
    return value.strip()
