"""The tiny offline Qwen3-VL / Qwen3-VL-MoE checkpoints of `megatron_sapo/utils/tiny_vlm.py`.

Vision tokens are single ids and match the config; the processor expands each image to
t*h*w/merge^2 pads (counted from the image size, not from the processor's own grid); the MoE
checkpoint on disk has the official expert orientation; transformers loads each checkpoint back equal,
tensor by tensor, to a model built independently from the same config and seed. The VLM quickstart's
tokenizer (`train/setup.py`) makes every answer of its task one token, so answer + EOS fit its
`max_new_tokens` (a colour name split into 5 byte tokens could never be answered in 4).
Run: `python -m pytest tests/unit/test_tiny_vlm.py -q` (~10 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from megatron_sapo.data.visual_task import VisualTask
from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.train.setup import _save_tiny_vlm
from megatron_sapo.utils.tiny_vlm import VISION_TOKENS, save_tiny_vlm, tiny_vlm_config
from megatron_sapo.utils.typed_config import load_config

SEED = 3
CONFIG_IDS = {
    "<|vision_start|>": "vision_start_token_id",
    "<|vision_end|>": "vision_end_token_id",
    "<|image_pad|>": "image_token_id",
    "<|video_pad|>": "video_token_id",
}


@pytest.fixture(scope="module")
def tiny_vlms(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tiny_vlm")
    return {
        name: save_tiny_vlm(root / name, tiny_vlm_config(moe=name == "moe"), seed=SEED)
        for name in ("dense", "moe")
    }


def _image(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_vision_tokens_are_single_ids_matching_the_config(tiny_vlms) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_vlms["dense"])
    config = json.loads((tiny_vlms["dense"] / "config.json").read_text())
    ids = {}
    for token in VISION_TOKENS:
        (ids[token],) = tok.encode(token, add_special_tokens=False)
        assert tok.decode([ids[token]]) == token
        assert config[CONFIG_IDS[token]] == ids[token], token
    assert len(set(ids.values())) == 4
    # inside running text too (a BPE merge across the boundary would hide the image from the processor)
    text = tok.encode("look<|vision_start|><|image_pad|><|vision_end|>here", add_special_tokens=False)
    assert text.count(ids["<|image_pad|>"]) == 1


def test_processor_expands_each_image_pad_by_its_size(tiny_vlms) -> None:
    proc = AutoProcessor.from_pretrained(tiny_vlms["dense"])
    pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    # (width, height): multiples of patch 16 x merge 2, inside [min, max] pixels, so no resize:
    # t = 1 (a still image fills the temporal patch of 2), grid h/16 x w/16, pads = t*h*w / merge^2
    sizes = [(64, 32), (32, 96), (96, 64)]
    enc = proc(
        text=[f"a{image}b{image}c", f"{image}d"],
        images=[[_image(*sizes[0], 0), _image(*sizes[1], 1)], [_image(*sizes[2], 2)]],
        padding=True,
        return_tensors="pt",
    )
    expected = [(w // 16) * (h // 16) // 4 for w, h in sizes]
    assert expected == [2, 3, 6]
    assert enc["image_grid_thw"].tolist() == [[1, h // 16, w // 16] for w, h in sizes]
    counts = (enc["input_ids"] == pad).sum(dim=1).tolist()
    assert counts == [expected[0] + expected[1], expected[2]]
    # the model's text/image mask marks exactly the pads
    assert torch.equal(enc["mm_token_type_ids"].bool(), enc["input_ids"] == pad)
    assert enc["pixel_values"].shape == (sum(4 * e for e in expected), 3 * 2 * 16 * 16)


def test_moe_checkpoint_on_disk_has_official_expert_orientation(tiny_vlms) -> None:
    state = load_file(tiny_vlms["moe"] / "model.safetensors")
    text = tiny_vlm_config(moe=True).text_config
    experts, hidden, inter = text.num_experts, text.hidden_size, text.moe_intermediate_size
    assert inter * 2 != hidden  # the two orientations differ in shape, not only in values
    for layer in range(text.num_hidden_layers):
        prefix = f"model.language_model.layers.{layer}.mlp.experts"
        assert state[f"{prefix}.gate_up_proj"].shape == (experts, hidden, 2 * inter)
        assert state[f"{prefix}.down_proj"].shape == (experts, inter, hidden)
    assert not any(".experts.0." in name for name in state)  # fused only: no per-expert names


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_transformers_loads_the_model_built_from_config_and_seed(name, tiny_vlms) -> None:
    config = AutoConfig.from_pretrained(tiny_vlms[name])
    torch.manual_seed(SEED)
    reference = AutoModelForImageTextToText.from_config(config).state_dict()
    loaded = AutoModelForImageTextToText.from_pretrained(tiny_vlms[name], dtype=torch.float32).state_dict()
    assert loaded.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(loaded[key], value), key
    assert any(k.startswith("model.visual.deepstack_merger_list.2.") for k in loaded)
    if name == "moe":
        # on disk [E, H, 2I]: transformers' in-memory [E, 2I, H] transposed, the values unchanged
        disk = load_file(tiny_vlms[name] / "model.safetensors")
        fused = "model.language_model.layers.1.mlp.experts.gate_up_proj"
        assert torch.equal(disk[fused], reference[fused].transpose(1, 2))


@pytest.mark.parametrize("kind", ["color", "count"])
def test_quickstart_tokenizer_makes_every_answer_one_token(kind, tmp_path) -> None:
    config = Path(__file__).resolve().parents[2] / "configs" / "vlm_quickstart.yaml"
    cfg = load_config(TrainJobConfig, config, [f"data.visual.kind={kind}"])
    _save_tiny_vlm(cfg, tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    task = VisualTask(**{k: getattr(cfg.data.visual, k) for k in VisualTask.__dataclass_fields__})
    for answer in task.answers():
        ids = tokenizer.encode(answer, add_special_tokens=False)
        assert len(ids) == 1, (answer, tokenizer.convert_ids_to_tokens(ids))
        assert tokenizer.decode(ids) == answer
    assert cfg.rollout.sampling.max_new_tokens >= 2  # the answer and EOS
