"""Prompt datasets from jsonl / parquet files, and prompt rendering with the tokenizer's chat template.

    records = load_records("dapo-math-17k.parquet", prompt_field="prompt",
                           answer_field="reward_model.ground_truth")
    records = load_records("gsm8k.jsonl", prompt_field="question", answer_field="answer",
                           answer_extract="gsm8k")
    ids = render_prompt(records[0], tokenizer, max_prompt_tokens=1024)

A field name is a dotted path into nested dicts. The prompt field may hold a string (the user message)
or a chat-messages list `[{"role": ..., "content": ...}, ...]` (the DAPO-Math-17k layout), which is
kept and rendered as is. Every problem in a file is a `DataError` whose one-line message names the
file and the 1-based row (the line number for jsonl).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
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
    """The prompt's raw image values in order, as `images.load_image` takes them (PIL image, bytes, path)."""
    base_dir: str = ""
    """Folder relative image paths are read against (the dataset file's folder; "" for generated records)."""

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
) -> list[PromptRecord]:
    """Read every row of a jsonl or parquet file into `PromptRecord`s.

    `format="auto"` picks by suffix (.jsonl / .ndjson / .parquet). `answer_extract="gsm8k"` keeps the
    text after the last '####' of the answer, without thousands separators ("#### 1,200" → "1200").
    Raises `DataError` (file + row) on unreadable rows, missing fields, an empty prompt, an answer that
    is neither a string nor a number, and on a file without rows.
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
    records = [_to_record(row, path, n, prompt_field, answer_field, answer_extract) for n, row in rows(path)]
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
    Raises `DataError` naming the record's file and row when the result exceeds `max_prompt_tokens`.
    """
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


def _to_record(
    row: Any, path: Path, n: int, prompt_field: str, answer_field: str, answer_extract: str
) -> PromptRecord:
    where = f"{path}:{n}"
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    values = {}
    for name in (prompt_field, answer_field):
        try:
            values[name] = _get_field(row, name)
        except KeyError as e:
            raise DataError(f"{where}: missing field {e.args[0]!r}") from None
    prompt, messages = _prompt(values[prompt_field], where, prompt_field)
    answer = _answer(values[answer_field], where, answer_field, answer_extract)
    top = {prompt_field.split(".")[0], answer_field.split(".")[0]}
    meta = {k: v for k, v in row.items() if k not in top}
    return PromptRecord(prompt=prompt, answer=answer, meta=meta, messages=messages, source=str(path), row=n)


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
