"""Qwen3-VL / Qwen3-VL-MoE on megatron-core (one rank): M-RoPE positions, logits and weights vs transformers.

The references are transformers' own `Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration`
(fp32, same random weights loaded through the bridge) and its `get_rope_index`.
Run: `python -m pytest tests/unit/test_vlm.py -q`
"""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.bridge import export_hf_weights, load_hf_weights
from megatron_sapo.megatron.cpu import causal_attention_mask
from megatron_sapo.megatron.models import build_gpt_model
from megatron_sapo.megatron.mrope import InterleavedMRoPE, rope_index
from megatron_sapo.utils.tiny_vlm import build_processor, tiny_vlm_config, train_vlm_tokenizer
from tests.vlm_reference import hf_vlm, image_batch, mrope_positions
from tests.vlm_reference import mrope_tokens as _tokens

LOGIT_TOL = 1e-4  # fp32 on both sides; measured <= 3e-7 (dense and MoE, image+text and text only)


pytestmark = pytest.mark.usefixtures("megatron_tp1")  # tests/conftest.py


@pytest.fixture(scope="module")
def processor():
    return build_processor(train_vlm_tokenizer())


def test_rope_index_matches_transformers(processor) -> None:
    config, hf = hf_vlm(False, processor)
    enc = image_batch(processor)
    mask = enc["attention_mask"]
    expected, _ = hf.model.get_rope_index(
        enc["input_ids"], enc["mm_token_type_ids"], enc["image_grid_thw"], attention_mask=mask
    )
    got = mrope_positions(enc, config)
    # left or right padding: compare the real tokens (transformers leaves padded positions at its own values)
    real = mask.bool()
    assert torch.equal(got[:, real], expected[:, real])
    assert got.max() < enc["input_ids"].shape[1]  # image tokens compress positions: a real check


def test_rope_index_rejects_token_grid_mismatch(processor) -> None:
    config, _ = hf_vlm(False, processor)
    enc = image_batch(processor)
    ids = enc["input_ids"][0]
    keep = ids != config.image_token_id
    keep[torch.nonzero(~keep)[0]] = True  # drop all but one pad of the prompt's images
    with pytest.raises(ValueError, match="image tokens"):
        rope_index(ids[keep], enc["image_grid_thw"][:2], *_tokens(config))
    with pytest.raises(ValueError, match="grids"):
        rope_index(ids, enc["image_grid_thw"][:1], *_tokens(config))


def test_interleaved_mrope_equals_transformers_rotary() -> None:
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    config = tiny_vlm_config().text_config
    pos = torch.randint(0, 50, (3, 2, 9))
    cos, sin = Qwen3VLTextRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), pos)
    ours = InterleavedMRoPE(16, 10000.0, [4, 2, 2])(pos)  # [T, B, 1, D]
    angles = ours[:, :, 0].transpose(0, 1)
    assert torch.allclose(angles.cos(), cos, atol=1e-6) and torch.allclose(angles.sin(), sin, atol=1e-6)
    # and the layout is not Qwen2-VL's contiguous one: the H/W rows matter
    assert not torch.allclose(InterleavedMRoPE(16, 10000.0, [4, 2, 2])(pos.flip(0)), ours)


@torch.no_grad()
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_logits_and_weights_match_transformers(moe: bool, processor) -> None:
    config, hf = hf_vlm(moe, processor)
    model = build_gpt_model(config).eval()
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())
    load_hf_weights(model, config, hf.state_dict())

    enc = image_batch(processor)
    b, t = enc["input_ids"].shape
    expected = hf(**enc).logits
    got = model(
        enc["input_ids"],
        mrope_positions(enc, config),
        causal_attention_mask(t, b),
        pixel_values=enc["pixel_values"],
        image_grid_thw=enc["image_grid_thw"],
    )
    real = enc["attention_mask"].bool()
    err = (got[real] - expected[real]).abs().max().item()
    assert err <= LOGIT_TOL, f"image+text: max |logit diff| {err:.2e}"
    assert expected.std().item() > 1e3 * LOGIT_TOL

    # text only, through the same policy: no vision pass
    text = processor.tokenizer(["what is 3 + 4"], return_tensors="pt")
    ids = text["input_ids"]
    expected = hf(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids)).logits
    got = model(
        ids, rope_index(ids[0], None, *_tokens(config))[:, None], causal_attention_mask(ids.shape[1], 1)
    )
    assert (got - expected).abs().max().item() <= LOGIT_TOL

    # export gives back every HF tensor bit-exact under its checkpoint name (experts per expert)
    exported = {name: t for bucket in export_hf_weights(model, config) for name, t in bucket}
    expected = {}
    for name, tensor in hf.state_dict().items():
        if name.endswith(".mlp.experts.gate_up_proj"):  # transformers in memory: [E, 2I, H]
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                expected[f"{name[: -len('gate_up_proj')]}{e}.gate_proj.weight"] = gate[e]
                expected[f"{name[: -len('gate_up_proj')]}{e}.up_proj.weight"] = up[e]
        elif name.endswith(".mlp.experts.down_proj"):  # [E, H, I]
            for e in range(tensor.shape[0]):
                expected[f"{name[: -len('down_proj')]}{e}.down_proj.weight"] = tensor[e]
        else:
            expected[name] = tensor
    assert sorted(exported) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name


@torch.no_grad()
def test_official_moe_checkpoint_loads_through_the_transposed_experts(tmp_path) -> None:
    """Files fuse experts as [E, H, 2I] / [E, I, H]; loading them must give transformers' own weights."""
    from transformers import AutoModelForImageTextToText

    from megatron_sapo.utils.tiny_vlm import save_tiny_vlm

    path = save_tiny_vlm(tmp_path / "hf", tiny_vlm_config(moe=True), seed=4)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    config = hf.config
    from_files, from_memory = build_gpt_model(config), build_gpt_model(config)
    load_hf_weights(from_files, config, path)
    load_hf_weights(from_memory, config, hf.state_dict())
    a, b = from_files.state_dict(), from_memory.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b if torch.is_tensor(b[k]))
    experts = [k for k in b if "local_experts" in k]
    assert experts and any(b[k].std() > 0 for k in experts)


def test_bad_image_inputs_are_refused_naming_the_mismatch(processor) -> None:
    from megatron_sapo.megatron.batching import Sample, collate

    config, _ = hf_vlm(False, processor)
    enc = image_batch(processor)
    tokens = enc["input_ids"][1][enc["attention_mask"][1].bool()]
    grid, pixels = enc["image_grid_thw"][2:], enc["pixel_values"][-int(enc["image_grid_thw"][2].prod()) :]
    with pytest.raises(ValueError, match="both or neither"):
        Sample(tokens, response_start=5, advantage=1.0, pixel_values=pixels)
    with pytest.raises(ValueError, match="one row per patch"):
        Sample(tokens, response_start=5, advantage=1.0, pixel_values=pixels[1:], image_grid_thw=grid)
    good = Sample(tokens, response_start=5, advantage=1.0, pixel_values=pixels, image_grid_thw=grid)
    with pytest.raises(ValueError, match="vision-language policy"):
        collate([good])  # a text policy has no M-RoPE tokens
    batch = collate([good], mrope=_tokens(config))
    assert batch.position_ids.shape == (3, 1, good.seq_len) and torch.equal(batch.image_grid_thw, grid)
    wrong_grid = grid * torch.tensor([[1, 2, 1]])  # twice the patches: pixels no longer match either
    with pytest.raises(ValueError, match="image 0"):
        collate(
            [Sample(tokens, 5, 1.0, pixel_values=torch.cat([pixels, pixels]), image_grid_thw=wrong_grid)],
            mrope=_tokens(config),
        )


def test_full_recompute_with_deepstack_is_refused() -> None:
    from megatron_sapo.megatron.models import transformer_config_from_hf

    config = tiny_vlm_config()
    tc = transformer_config_from_hf(
        config, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
    )
    with pytest.raises(ValueError, match="recompute"):
        build_gpt_model(config, config=tc)
