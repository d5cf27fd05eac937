"""What the converters check and record around the weights: the HF config, the checkpoint dtype, metadata.

A converter output directory (`hf_to_megatron`) holds the megatron distributed checkpoint next to what is
needed to go back to Hugging Face (config, tokenizer and processor files copied by
`bridge.snapshot.copy_assets`)::

    config.json  tokenizer.json  tokenizer_config.json  ...  generation_config.json
    processor_config.json  preprocessor_config.json  ...    a vision-language model's processor
    megatron_sapo.json                      format, model_type, layout used, dtype, tensor count
    latest_checkpointed_iteration.txt       "0"
    iter_0000000/                           torch_dist checkpoint (model weights only)

`load_hf_config` checks an HF dir (a vision-language model's processor too: `check_processor`),
`safetensors_dtype` reads its weights' dtypes from the safetensors headers
(`bridge.safetensors_io.SafetensorsReader`), `write_metadata` / `read_metadata` the `megatron_sapo.json`
file. Tests: `python -m pytest tests/e2e/test_converters.py tests/e2e/test_vlm_converters.py -q`
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from megatron_sapo.bridge.safetensors_io import DTYPES, SafetensorsReader
from megatron_sapo.convert.layout import ConversionError
from megatron_sapo.megatron.parallel import ParallelConfig

logger = logging.getLogger(__name__)

METADATA_FILE = "megatron_sapo.json"
FORMAT = "megatron_sapo.megatron_checkpoint"
FORMAT_VERSION = 1

# A vision-language checkpoint's processor is in one of these (transformers 5 writes the first).
PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")
# A checkpoint converts when its most common dtype is one of these (the model is built in it).
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")


def load_hf_config(hf_dir: str | os.PathLike) -> Any:
    """The transformers config of `hf_dir`, after checking the dir and that its model_type is supported."""
    from megatron_sapo.bridge.arch import ARCHITECTURES

    path = Path(hf_dir)
    if not path.is_dir():
        raise ConversionError(
            f"{path} is not a directory" if path.exists() else f"directory {path} does not exist"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"no config.json in {path} (not a Hugging Face model directory)")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ConversionError(f"{config_file} is not valid JSON ({err})") from None
    model_type = raw.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConversionError(
            f"unknown architecture: model_type={model_type!r} in {config_file} "
            f"(architectures={raw.get('architectures')}); supported: {sorted(ARCHITECTURES)}"
        )
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    if ARCHITECTURES[model_type].vision:
        check_processor(path, hf_config)
    return hf_config


def check_processor(hf_dir: str | os.PathLike, hf_config: Any) -> None:
    """ConversionError unless a vision-language checkpoint's processor files are there, load, and give the
    vision tokens (`<|image_pad|>`, ...) the ids config.json has: the model only finds an image's
    embeddings at the positions of `image_token_id`, so a tokenizer that disagrees silently drops images."""
    from transformers import AutoProcessor

    path = Path(hf_dir)
    if not any((path / name).is_file() for name in PROCESSOR_FILES):
        raise ConversionError(
            f"no processor files in {path} ({' or '.join(PROCESSOR_FILES)}): a {hf_config.model_type} "
            "checkpoint needs its image processor and tokenizer; copy them from the original model"
        )
    try:
        processor = AutoProcessor.from_pretrained(path)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for broken files
        raise ConversionError(f"the processor in {path} does not load: {str(err).splitlines()[0]}") from None
    for kind in ("image", "video", "vision_start", "vision_end"):
        expected, found = (
            getattr(hf_config, f"{kind}_token_id", None),
            getattr(processor, f"{kind}_token_id", None),
        )
        if expected is not None and found != expected:
            token = getattr(processor, f"{kind}_token", kind)
            raise ConversionError(
                f"{path}: the processor's {kind} token {token!r} has id {found} in its tokenizer, but "
                f"config.json has {kind}_token_id={expected}"
            )


def safetensors_dtype(hf_dir: str | os.PathLike) -> tuple[str, int, int]:
    """(most common torch dtype name, tensor count, total bytes) of the safetensors weights in `hf_dir`."""
    try:
        reader = SafetensorsReader(hf_dir)
    except FileNotFoundError as err:
        raise ConversionError(f"no safetensors weights in {hf_dir} ({err})") from None
    headers = [reader.header(name) for name in reader.names()]
    dtypes = Counter(header.dtype for header in headers)
    code = dtypes.most_common(1)[0][0]
    if code not in _FLOAT_CODES:
        raise ConversionError(f"weights in {hf_dir} are {code}; only float checkpoints convert")
    if len(dtypes) > 1:
        logger.warning("mixed dtypes %s in %s: exporting all as %s", dict(dtypes), hf_dir, code)
    return str(DTYPES[code]).removeprefix("torch."), len(headers), sum(header.nbytes for header in headers)


def write_metadata(out_dir: str | os.PathLike, hf_config: Any, layout: ParallelConfig, **fields: Any) -> None:
    """Write `megatron_sapo.json` (what `read_metadata` checks on the way back)."""
    meta = dict(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        model_type=hf_config.model_type,
        architectures=getattr(hf_config, "architectures", None),
        layout=layout.as_dict(),
        **fields,
    )
    (Path(out_dir) / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_metadata(megatron_dir: str | os.PathLike) -> dict[str, Any]:
    """The converter metadata of `megatron_dir`; ConversionError when it is not a converter output."""
    path = Path(megatron_dir)
    if not path.is_dir():
        raise ConversionError(
            f"{path} is not a directory" if path.exists() else f"directory {path} does not exist"
        )
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise ConversionError(
            f"no {METADATA_FILE} in {path}: not an output of tools/convert_hf_to_megatron.py"
        )
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(
            f"{meta_file}: format {meta.get('format')!r} version {meta.get('format_version')!r}, "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return meta
