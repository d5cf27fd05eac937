"""Suite-wide checks (enough free disk before anything runs) and the one-rank megatron fixture.

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


@pytest.fixture(scope="module")
def megatron_tp1():
    """A 1-rank gloo group + megatron parallel state (TP=PP=EP=1) for one module, torn down after it."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_sapo.megatron.testing import init_megatron_cpu
    from megatron_sapo.utils.spawn import free_port

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    init_megatron_cpu(tp=1)
    yield
    parallel_state.destroy_model_parallel()
    if created:
        dist.destroy_process_group()
