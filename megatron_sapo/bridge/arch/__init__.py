"""Registry of per-architecture mapping tables, keyed by the HF `model_type` (one file per architecture).

    from megatron_sapo.bridge.arch import mapping_table
    table = mapping_table(hf_config)          # MappingTable bound to this config's dims

A new architecture is a new file defining `MODEL_TYPE` and `MAPPINGS`, listed in `_MODULES` below.
Tests: `python -m pytest tests/unit/test_bridge_mapping.py -q`
"""

from __future__ import annotations

from typing import Any

from megatron_sapo.bridge.arch import llama, qwen2_moe, qwen3, qwen3_moe
from megatron_sapo.bridge.mapping import Mapping, MappingTable, ModelDims

_MODULES = (qwen3, qwen3_moe, qwen2_moe, llama)
TABLES: dict[str, tuple[Mapping, ...]] = {module.MODEL_TYPE: module.MAPPINGS for module in _MODULES}


def mapping_table(hf_config: Any) -> MappingTable:
    """The table for `hf_config.model_type`; ValueError naming the supported model types."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in TABLES:
        raise ValueError(
            f"bridge: unknown architecture model_type={model_type!r} "
            f"(architectures={getattr(hf_config, 'architectures', None)}); supported: {sorted(TABLES)}"
        )
    return MappingTable(model_type, TABLES[model_type], ModelDims.from_hf(hf_config))
