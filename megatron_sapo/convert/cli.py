"""Shared plumbing of the converter CLIs: one-line user errors, rank-0 printing, size parsing.

    sys.exit(run_cli(main))      # main() -> None; a user error -> "error: ..." on rank 0, exit code 2

Tests: `python -m pytest tests/e2e/test_converters.py -q`
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable

from megatron_sapo.convert.layout import ConversionError
from megatron_sapo.megatron.parallel import LayoutError
from megatron_sapo.utils.typed_config import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def say(message: str) -> None:
    """Print on rank 0 only (every rank runs the tool)."""
    if is_rank0():
        print(message, flush=True)


def parse_size(text: str) -> int:
    """Bytes of a size such as "2GB", "500MiB" or "1048576" (ConversionError otherwise)."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not found or found[2].upper() not in _UNITS:
        raise ConversionError(f"size {text!r} not understood (examples: 2GB, 500MiB, 1048576)")
    return int(float(found[1]) * _UNITS[found[2].upper()])


def run_cli(main: Callable[[], None]) -> int:
    """Run `main`; a user error (ConversionError, LayoutError; a layout flag below 1, ConfigError) becomes
    one line on stderr (rank 0) and exit code 2."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        main()
    except (ConversionError, LayoutError, ConfigError) as err:
        # ParallelConfig's own checks name its field: tp -> --tp
        message = f"--{err.key}: {err.message}" if isinstance(err, ConfigError) and err.key else str(err)
        if is_rank0():
            print(f"error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0
