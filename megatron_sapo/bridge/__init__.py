"""HF <-> Megatron weight bridge: declarative per-architecture tables, streaming export, sliced import.

    from megatron_sapo.bridge import export_hf_weights, load_hf_weights, save_safetensors_sharded

    load_hf_weights(model, hf_config, "/ckpt/Qwen3-8B")              # each rank reads its slices only
    for bucket in export_hf_weights(model, hf_config, dst_ranks=(0,)):   # all ranks iterate
        ...                                                           # [(hf_name, full tensor)] on rank 0
    save_safetensors_sharded((t for b in export_hf_weights(...) for t in b), out_dir)   # on a dst rank

Architectures: `megatron_sapo/bridge/arch/`, one file per HF `model_type` holding its megatron config facts
and its mapping table, found by the registry there (`architecture_of`, `mapping_table`, `ARCHITECTURES`);
primitives: `mapping.py`; every safetensors read and write: `safetensors_io.py`; a whole HF directory
(shards + config, tokenizer, processor): `snapshot.py`; per-expert <-> fused expert tensors:
`fused_experts.py`.
Tests: `python -m pytest tests/unit/test_bridge_mapping.py tests/distributed/test_bridge.py -q`
"""

from megatron_sapo.bridge.arch import ARCHITECTURES, Architecture, architecture_of, mapping_table
from megatron_sapo.bridge.export import DEFAULT_BUCKET_BYTES, export_hf_weights
from megatron_sapo.bridge.layout import ParallelGroups
from megatron_sapo.bridge.load import load_hf_weights, open_source
from megatron_sapo.bridge.safetensors_io import SafetensorsReader, save_safetensors_sharded

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_BUCKET_BYTES",
    "Architecture",
    "ParallelGroups",
    "SafetensorsReader",
    "architecture_of",
    "export_hf_weights",
    "load_hf_weights",
    "mapping_table",
    "open_source",
    "save_safetensors_sharded",
]
