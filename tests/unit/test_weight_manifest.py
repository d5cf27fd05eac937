"""What a weight update may send to a Qwen3-VL-MoE server: `WeightManifest` of rollout/sglang_updates.py.

The checkpoint holds fused experts `gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]`; SGLang's loader
also takes per-expert `{gate,up}_proj.weight [I, H]` / `down_proj.weight [H, I]`, but drops per-expert
names that follow a fused one in the same request (shown in tests/e2e/test_vlm_sglang.py).
Run: `python -m pytest tests/unit/test_weight_manifest.py -q` (seconds).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from megatron_sapo.rollout.sglang_updates import WeightManifest
from megatron_sapo.rollout.types import RolloutError
from megatron_sapo.utils.tiny_vlm import save_tiny_vlm, tiny_vlm_config

E, H, INTER, LAYERS = 4, 64, 48, 4  # tiny_vlm_config(moe=True): experts, hidden, moe_intermediate, layers
F32 = torch.float32


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> WeightManifest:
    path = save_tiny_vlm(tmp_path_factory.mktemp("vlm_moe"), tiny_vlm_config(moe=True), seed=0)
    return WeightManifest.from_hf_dir(path)


def _meta(name: str, *shape: int) -> tuple[str, tuple[int, ...], torch.dtype]:
    return (name, shape, F32)


def test_per_expert_names_of_every_layer_and_expert_pass(manifest) -> None:
    metas = []
    for layer in range(LAYERS):
        for e in range(E):
            prefix = f"model.language_model.layers.{layer}.mlp.experts.{e}"
            metas += [
                _meta(f"{prefix}.gate_proj.weight", INTER, H),
                _meta(f"{prefix}.up_proj.weight", INTER, H),
            ]
            metas.append(_meta(f"{prefix}.down_proj.weight", H, INTER))
    manifest.check_metas(metas)
    assert len(metas) == LAYERS * E * 3 == 48


def test_fused_names_pass_in_the_official_orientation_only(manifest) -> None:
    fused = "model.language_model.layers.2.mlp.experts"
    manifest.check_metas(
        [_meta(f"{fused}.gate_up_proj", E, H, 2 * INTER), _meta(f"{fused}.down_proj", E, INTER, H)]
    )
    with pytest.raises(RolloutError, match=r"shape \(4, 96, 64\), server has \(4, 64, 96\)"):
        manifest.check_metas([_meta(f"{fused}.gate_up_proj", E, 2 * INTER, H)])  # transformers' in-memory


@pytest.mark.parametrize(
    "meta,problem",
    [
        (
            _meta("model.language_model.layers.0.mlp.experts.1.gate_proj.weight", H, INTER),
            "shape",
        ),  # [H, INTER]
        (
            _meta("model.language_model.layers.0.mlp.experts.4.up_proj.weight", INTER, H),
            "not a tensor",
        ),  # e = E
        (_meta("model.language_model.layers.4.mlp.experts.0.down_proj.weight", H, INTER), "not a tensor"),
        (
            _meta("model.language_model.layers.0.mlp.experts.0.gate_up_proj.weight", 2 * INTER, H),
            "not a tensor",
        ),
    ],
)
def test_wrong_per_expert_tensors_are_rejected(manifest, meta, problem) -> None:
    with pytest.raises(RolloutError, match=problem):
        manifest.check_metas([meta])


def test_fused_and_per_expert_names_never_share_a_bucket(manifest) -> None:
    mixed = [
        _meta("model.language_model.layers.0.mlp.experts.gate_up_proj", E, H, 2 * INTER),
        _meta("model.language_model.layers.1.mlp.experts.0.down_proj.weight", H, INTER),
    ]
    with pytest.raises(RolloutError, match="fused and per-expert"):
        manifest.check_metas(mixed)
    for meta in mixed:  # each alone is fine
        manifest.check_metas([meta])


def test_a_checkpoint_of_fused_experts_in_the_other_orientation_takes_no_per_expert_tensor(tmp_path) -> None:
    # transformers' in-memory [E, 2I, H] / [E, H, I] saved as is: SGLang would load it transposed, wrongly
    save_file(
        {
            "x.mlp.experts.gate_up_proj": torch.zeros(E, 2 * INTER, H),
            "x.mlp.experts.down_proj": torch.zeros(E, H, INTER),
        },
        str(tmp_path / "model.safetensors"),
    )
    manifest = WeightManifest.from_hf_dir(tmp_path)
    for meta in (
        _meta("x.mlp.experts.0.gate_proj.weight", INTER, H),
        _meta("x.mlp.experts.0.down_proj.weight", H, INTER),
    ):
        with pytest.raises(RolloutError, match="shape"):
            manifest.check_metas([meta])


def test_a_per_expert_checkpoint_derives_nothing(tmp_path) -> None:
    # Qwen3-MoE files are per-expert already: the transformers-5 fused name stays unknown (DESIGN's trap)
    save_file(
        {"model.layers.0.mlp.experts.0.gate_proj.weight": torch.zeros(INTER, H)},
        str(tmp_path / "model.safetensors"),
    )
    manifest = WeightManifest.from_hf_dir(tmp_path)
    assert manifest.entries.keys() == {"model.layers.0.mlp.experts.0.gate_proj.weight"}
    with pytest.raises(RolloutError, match="not a tensor"):
        manifest.check_metas([_meta("model.layers.0.mlp.experts.gate_up_proj", 1, 2 * INTER, H)])
