"""Suite-wide checks: enough free disk before anything runs.

The suite writes up to ~2 GB at once under the temp dir (SmolLM2 converted at TP1/TP3, SGLang logs,
checkpoints). On a full disk every later test errors in its set-up and pytest itself dies writing its
capture files — so say it once, up front, with the numbers.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

MIN_FREE_GIB = 3.0


def _free_gib(path: str | Path) -> float:
    return shutil.disk_usage(path).free / 2**30


def pytest_report_header(config: pytest.Config) -> str:
    tmp = tempfile.gettempdir()
    return f"free disk: {_free_gib(tmp):.1f} GiB in {tmp}, {_free_gib(config.rootpath):.1f} GiB in {config.rootpath}"


def pytest_sessionstart(session: pytest.Session) -> None:
    tmp = tempfile.gettempdir()
    free = _free_gib(tmp)
    if free < MIN_FREE_GIB and not session.config.option.collectonly:
        pytest.exit(
            f"only {free:.1f} GiB free in {tmp}; the test suite needs {MIN_FREE_GIB:.0f} GiB "
            "(free space, or point TMPDIR at a larger disk)",
            returncode=3,
        )
