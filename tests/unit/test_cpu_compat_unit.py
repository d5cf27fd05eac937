"""Single-process checks of the megatron-core CPU compatibility layer (`megatron_sapo.megatron.cpu`).

Idempotence, refusal on CUDA, the version pin, the redirected CUDA sites and the CPU RNG tracker
(megatron's own grad clipping on CPU: tests/distributed/test_cpu_compat.py). Enabling the layer patches megatron
modules for the rest of this (CPU-only) test process, which is what every CPU test wants anyway.

    python -m pytest tests/unit/test_cpu_compat_unit.py -q
"""

from __future__ import annotations

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip(
        "the CPU compatibility layer must never be enabled on a CUDA machine", allow_module_level=True
    )

from megatron_sapo.megatron import cpu


@pytest.fixture(scope="module", autouse=True)
def _enabled() -> None:
    cpu.enable_cpu_compat()


def test_enable_is_idempotent() -> None:
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.tensor_parallel import layers, random

    view, tracker_class = layers.torch, random.CudaRNGStatesTracker
    setup = LanguageModule.setup_embeddings_and_output_layer
    cpu.enable_cpu_compat()
    assert cpu.is_cpu_compat_enabled()
    assert layers.torch is view and isinstance(view, cpu._TorchOnCpu)
    assert random.CudaRNGStatesTracker is tracker_class  # not subclassed twice
    assert LanguageModule.setup_embeddings_and_output_layer is setup  # not wrapped twice


def test_refuses_when_cuda_is_available(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu.enable_cpu_compat()


def test_warns_on_unchecked_megatron_version(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.99.0")
    with pytest.warns(RuntimeWarning, match="0.99.0"):
        cpu._check_version()


def test_cuda_sites_go_to_cpu_and_torch_itself_is_untouched() -> None:
    from megatron.core.tensor_parallel import mappings
    from megatron.core.transformer.utils import get_default_causal_mask

    assert torch.equal(get_default_causal_mask(5), cpu.causal_attention_mask(5)[0, 0])
    assert mappings.torch.cuda.current_device() == "cpu"
    assert mappings.torch.zeros(2, device="cuda").device.type == "cpu"
    assert mappings.torch.tensor([1], device=torch.device("cuda", 0)).device.type == "cpu"
    assert torch.cuda.current_device is not mappings.torch.cuda.current_device
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # the real torch still has no CUDA


def test_rng_tracker_forks_the_cpu_generator() -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("unit-test-rng", 5)
    torch.manual_seed(0)
    outer_expected = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("unit-test-rng"):
        forked = torch.rand(3)
    assert torch.equal(forked, torch.rand(3, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(torch.rand(3), outer_expected)  # the default stream resumes where it was
    with tracker.fork("unit-test-rng"):
        assert not torch.equal(torch.rand(3), forked)  # the forked stream advanced, not restarted
