"""GPU tier: every test under tests/gpu is marked `gpu` and skipped, with the reason, without CUDA.

Tests that also need Transformer Engine request the `transformer_engine` fixture (skips when TE is not
importable). Select the tier with `python -m pytest -m gpu -rs`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m selection reads the markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Checked here, not at import: collecting must not touch CUDA. is_available() creates no context.
    no_cuda = (
        None if torch.cuda.is_available() else "needs a CUDA device (torch.cuda.is_available() is False)"
    )
    for item in items:
        if _HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.gpu)
            if no_cuda:
                item.add_marker(pytest.mark.skip(reason=no_cuda))


@pytest.fixture(scope="session")
def transformer_engine() -> None:
    """Skip unless Transformer Engine imports (`pip install -e '.[gpu]'`)."""
    pytest.importorskip(
        "transformer_engine.pytorch", reason="needs transformer_engine (pip install -e '.[gpu]')"
    )
