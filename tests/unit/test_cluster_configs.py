"""The cluster configs (configs/qwen3_*_sapo.yaml) load, keep the SAPO paper's settings, and their
parallel layouts fit the trainer world sizes their launch scripts give them (docs/multinode.md).

Run: `python -m pytest tests/unit/test_cluster_configs.py -q`.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from megatron_sapo.megatron.parallel import check_layout
from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.utils.typed_config import load_config

ROOT = Path(__file__).resolve().parents[2]


def _colocated(mem_fraction_static: float) -> list[str]:
    """PLACEMENT=colocated* of the sbatch scripts: 2 engines x TP 4 beside the trainers."""
    return [
        "cluster.placement=colocated",
        "cluster.engine_nodes=0",
        "rollout.num_engines=2",
        "rollout.server.tp_size=4",
        f"rollout.server.mem_fraction_static={mem_fraction_static}",
    ]


FIRST_NODE = ["cluster.colocated_engines=first_node", "rollout.weight_sync.transport=tensor"]
EVERY_NODE = ["cluster.colocated_engines=every_node", "rollout.weight_sync.transport=distributed"]
# config -> (overrides the sbatch script adds, trainer world size): 30B-A3B and VL-30B-A3B on 4 nodes x 8
# GPUs disaggregated (3 train nodes) and colocated on node 1 / every node (PLACEMENT=colocated /
# colocated-every-node in examples/slurm/qwen3_30b_a3b_sapo.sbatch, qwen3_vl_30b_a3b_sapo.sbatch; the VL
# engines get less memory beside the vision tower), 8B on 1 node
CASES = {
    "30b-disaggregated": ("qwen3_30b_a3b_sapo.yaml", [], 24),
    "30b-colocated": ("qwen3_30b_a3b_sapo.yaml", [*_colocated(0.45), *FIRST_NODE], 32),
    "30b-colocated-every-node": ("qwen3_30b_a3b_sapo.yaml", [*_colocated(0.45), *EVERY_NODE], 32),
    "8b-colocated": ("qwen3_8b_sapo.yaml", [], 8),
    "vl-30b-disaggregated": ("qwen3_vl_30b_a3b_sapo.yaml", [], 24),
    "vl-30b-colocated": ("qwen3_vl_30b_a3b_sapo.yaml", [*_colocated(0.35), *FIRST_NODE], 32),
    "vl-30b-colocated-every-node": ("qwen3_vl_30b_a3b_sapo.yaml", [*_colocated(0.35), *EVERY_NODE], 32),
}


def _hf(model_type: str, heads: int, kv_heads: int, ffn: int, layers: int, **moe: int) -> SimpleNamespace:
    """The config.json fields that the layout check reads."""
    return SimpleNamespace(
        model_type=model_type,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        **moe,
    )


QWEN3_30B_A3B = _hf("qwen3_moe", 32, 4, 6144, 48, num_experts=128, moe_intermediate_size=768)
# Qwen3-30B-A3B, Qwen3-8B and Qwen3-VL-30B-A3B-Instruct as published (the VL model's text tower is
# Qwen3-30B-A3B's; its vision tower adds the deepstack layers that must sit on the first pipeline stage)
QWEN3 = {
    "qwen3_30b_a3b_sapo.yaml": QWEN3_30B_A3B,
    "qwen3_8b_sapo.yaml": _hf("qwen3", 32, 8, 12288, 36),
    "qwen3_vl_30b_a3b_sapo.yaml": SimpleNamespace(
        model_type="qwen3_vl_moe",
        tie_word_embeddings=False,
        text_config=QWEN3_30B_A3B,
        vision_config=SimpleNamespace(
            patch_size=16, spatial_merge_size=2, deepstack_visual_indexes=[8, 16, 24]
        ),
    ),
}


def test_every_cluster_config_has_a_case() -> None:
    configs = {p.name for p in (ROOT / "configs").glob("qwen3_*_sapo.yaml")}
    assert configs == {name for name, _, _ in CASES.values()} == set(QWEN3)


@pytest.mark.parametrize("case", list(CASES))
def test_cluster_config_loads_and_fits(case: str) -> None:
    name, overrides, world = CASES[case]
    cfg = load_config(TrainJobConfig, ROOT / "configs" / name, overrides)
    check_layout(cfg.parallel, world=world, hf_config=QWEN3[name], dtype=cfg.model.dtype, gpu=True)
    assert cfg.loss.name == "sapo" and cfg.loss.mini_batches == 4
    assert cfg.loss.params == {"tau_pos": 1.0, "tau_neg": 1.05}
    assert cfg.loss.aggregation == "seq-mean-token-mean"
    assert cfg.model.dtype == "bfloat16" and cfg.rollout.server.device == "cuda"
    assert cfg.rollout.sampling.temperature == 1.0 and cfg.rollout.sampling.top_p == 1.0
    if cfg.cluster.placement == "colocated":
        # the engines run on trainer rank 0's node (or each node): they must fit a node's GPUs
        assert cfg.rollout.num_engines * cfg.rollout.server.tp_size <= cfg.cluster.gpus_per_node
    else:
        assert cfg.cluster.engines_per_node * cfg.rollout.server.tp_size <= cfg.cluster.gpus_per_node
    # the micro-batch budget holds one longest sample (docs/multinode.md sizes activations for it)
    assert cfg.data.max_prompt_tokens + cfg.rollout.sampling.max_new_tokens <= cfg.loss.micro_batch_tokens
    vision = getattr(QWEN3[name], "vision_config", None)
    if vision is not None:
        # one image token per (patch x merge)^2 pixels: the largest image takes at most half the prompt
        pixels_per_token = (vision.patch_size * vision.spatial_merge_size) ** 2
        assert cfg.data.image_fields and cfg.data.min_pixels <= cfg.data.max_pixels
        assert cfg.data.max_pixels // pixels_per_token <= cfg.data.max_prompt_tokens // 2
