"""Image prompts through the in-process engine and the SGLang client's payload; VL-MoE experts in and out.

- `TransformersEngine` on `ImagePrompt`s (several images, a text-only one, n = 2, left padding in one
  batch): every sampled token's log-prob equals transformers' own forward, teacher-forced on the
  processor's expansion and pixels (the reference computes M-RoPE itself);
- a Qwen3-VL-MoE engine takes the bridge's per-expert names into its fused experts, and official files
  (fused [E, H, 2I] / [E, I, H]) from disk: both give the other checkpoint's weights exactly;
- `fuse_stream` turns per-expert tensors back into the official fused layout the checkpoint files hold;
- the SGLang client sends image prompts as text + PNG data URIs and refuses a mix with token prompts.
Run: `python -m pytest tests/unit/test_vlm_rollout.py -q` (~15 s).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from megatron_sapo.bridge.fused_experts import fuse_stream
from megatron_sapo.data import ImagePrompt
from megatron_sapo.rollout.client import _image_payloads
from megatron_sapo.rollout.hf_engine import TransformersEngine
from megatron_sapo.rollout.types import RolloutError, SamplingParams
from megatron_sapo.utils.tiny_vlm import save_tiny_vlm, tiny_vlm_config


@pytest.fixture(scope="module")
def vlms(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tiny_vlms")
    return {
        "dense": str(save_tiny_vlm(root / "dense", tiny_vlm_config(moe=False), seed=0)),
        "moe": str(save_tiny_vlm(root / "moe", tiny_vlm_config(moe=True), seed=0)),
        "moe-1": str(save_tiny_vlm(root / "moe-1", tiny_vlm_config(moe=True), seed=1)),
    }


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _prompts(processor) -> list[ImagePrompt]:
    out = []
    for specs, question in (
        ([(64, 32, 0), (32, 96, 1)], "which is larger?"),
        ([(96, 64, 2)], "what?"),
        ([], "hi"),
    ):
        content = [{"type": "image"} for _ in specs] + [{"type": "text", "text": question}]
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        images = [_image(*s) for s in specs]
        enc = processor(text=[text], images=images or None, return_tensors="pt")
        out.append(
            ImagePrompt(
                text, images, enc["input_ids"][0].tolist(), enc.get("pixel_values"), enc.get("image_grid_thw")
            )
        )
    return out


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_image_prompts_logprobs_equal_transformers(vlms, name) -> None:
    path = vlms[name]
    processor = AutoProcessor.from_pretrained(path)
    prompts = _prompts(processor)
    assert len({len(p) for p in prompts}) == 3  # one batch, left-padded rows
    gens = TransformersEngine(path).generate(prompts, SamplingParams(max_new_tokens=5, seed=3), n=2)
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(p, s) for p in range(3) for s in range(2)]
    ref = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    worst = 0.0
    for g in gens:
        p = prompts[g.prompt_index]
        assert g.prompt_ids == p.input_ids
        ids = torch.tensor([p.input_ids + g.token_ids[:-1]])
        extra = {}
        if p.pixel_values is not None:
            types = torch.zeros_like(ids)
            types[0, : len(p.input_ids)] = (ids[0, : len(p.input_ids)] == ref.config.image_token_id).long()
            extra = dict(
                pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw, mm_token_type_ids=types
            )
        with torch.no_grad():
            logits = ref(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits[0].float()
        expected = torch.log_softmax(logits[len(p.input_ids) - 1 :], -1).gather(
            -1, torch.tensor(g.token_ids)[:, None]
        )
        worst = max(worst, (expected[:, 0] - torch.tensor(g.logprobs)).abs().max().item())
    assert worst < 1e-4  # measured <= 5e-7


def test_text_engine_refuses_image_prompts(vlms, tmp_path) -> None:
    from transformers import Qwen3Config

    from megatron_sapo.utils.tiny import save_tiny_model, train_tokenizer

    tokenizer = train_tokenizer(vocab_size=300)
    config = Qwen3Config(
        vocab_size=320,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        intermediate_size=64,
    )
    text = save_tiny_model(tmp_path / "text", config, tokenizer, seed=0)
    prompt = _prompts(AutoProcessor.from_pretrained(vlms["dense"]))[1]
    with pytest.raises(RolloutError, match="image prompts"):
        TransformersEngine(text).generate([prompt], SamplingParams(max_new_tokens=2))


def _per_expert(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The official fused files as the bridge exports them: per-expert [I, H] / [H, I] linears."""
    out = []
    for name, tensor in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):  # [E, H, 2I]
            prefix, inter = name.removesuffix(".gate_up_proj"), tensor.shape[2] // 2
            for e, w in enumerate(tensor):
                out += [(f"{prefix}.{e}.gate_proj.weight", w[:, :inter].T.contiguous())]
                out += [(f"{prefix}.{e}.up_proj.weight", w[:, inter:].T.contiguous())]
        elif name.endswith(".mlp.experts.down_proj"):  # [E, I, H]
            prefix = name.removesuffix(".down_proj")
            out += [(f"{prefix}.{e}.down_proj.weight", w.T.contiguous()) for e, w in enumerate(tensor)]
        else:
            out.append((name, tensor))
    return out


def test_moe_engine_takes_per_expert_names_and_official_files(vlms) -> None:
    want = AutoModelForImageTextToText.from_pretrained(vlms["moe-1"], dtype=torch.float32).state_dict()
    official = load_file(f"{vlms['moe-1']}/model.safetensors")
    by_tensors = TransformersEngine(vlms["moe"])
    by_tensors.update_weights_from_tensors(_per_expert(official), version="1")
    by_disk = TransformersEngine(vlms["moe"])
    by_disk.update_weights_from_disk(vlms["moe-1"], version="2")
    for engine in (by_tensors, by_disk):
        got = engine.model.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), [
            k for k in want if not torch.equal(got[k], want[k])
        ]
    with pytest.raises(RolloutError, match="lacks"):  # one expert missing from a complete load
        TransformersEngine(vlms["moe"])._load(_per_expert(official)[1:], version="3", complete=True)


def test_fuse_stream_writes_the_official_layout(vlms) -> None:
    official = load_file(f"{vlms['moe']}/model.safetensors")
    experts = tiny_vlm_config(moe=True).text_config.num_experts
    fused = dict(fuse_stream(_per_expert(official), experts))
    assert fused.keys() == official.keys()
    assert all(torch.equal(fused[k], official[k]) for k in official)
    with pytest.raises(ValueError, match="ended with"):
        list(
            fuse_stream([(n, t) for n, t in _per_expert(official) if ".experts.3.up_proj" not in n], experts)
        )


def test_sglang_payload_is_text_and_data_uris(vlms) -> None:
    prompts = _prompts(AutoProcessor.from_pretrained(vlms["dense"]))
    payloads = _image_payloads(prompts)
    assert [text for text, _ in payloads] == [p.text for p in prompts]
    assert [len(uris) for _, uris in payloads] == [2, 1, 0]
    assert all(u.startswith("data:image/png;base64,") for _, uris in payloads for u in uris)
    assert _image_payloads([[1, 2, 3]]) is None
    with pytest.raises(RolloutError, match="image prompts and token"):
        _image_payloads([prompts[0], [1, 2, 3]])
