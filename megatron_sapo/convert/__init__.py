"""Checkpoint conversion Hugging Face <-> Megatron distributed checkpoints (the library behind tools/).

    from megatron_sapo.convert import ParallelConfig, hf_to_megatron, megatron_to_hf, parallel_session, process_group

    with parallel_session(ParallelConfig(tp=2)):          # under torchrun --nproc-per-node 2
        hf_to_megatron("/ckpt/hf", "/ckpt/mcore")
    with process_group():                                 # any number of ranks, or none
        megatron_to_hf("/ckpt/mcore", "/ckpt/hf-back")

Text models and vision-language ones (Qwen3-VL, Qwen3-VL-MoE: processor files carried, experts fused
per layer on the way back as in the official checkpoints) alike.
CLIs: `tools/convert_hf_to_megatron.py`, `tools/convert_megatron_to_hf.py` (`--help`).
Tests: `python -m pytest tests/e2e/test_converters.py tests/e2e/test_vlm_converters.py -q`
"""

from megatron_sapo.convert.assets import load_hf_config, read_metadata
from megatron_sapo.convert.checkpoints import hf_to_megatron, load_megatron_model
from megatron_sapo.convert.layout import (
    ConversionError,
    ParallelConfig,
    check_layout,
    default_layout,
    parallel_session,
    process_group,
    world_size,
)
from megatron_sapo.convert.to_hf import megatron_to_hf

__all__ = [
    "ConversionError",
    "ParallelConfig",
    "check_layout",
    "default_layout",
    "hf_to_megatron",
    "load_hf_config",
    "load_megatron_model",
    "megatron_to_hf",
    "parallel_session",
    "process_group",
    "read_metadata",
    "world_size",
]
