"""Qwen3-VL and Qwen3-VL-MoE on real CPU SGLang servers: image prompts, weight sync, the embedding cache.

Tiny random checkpoints (`utils/tiny_vlm.py`, "old" = seed 0 served, "new" = seed 1 pushed). The
reference is always transformers fp32 on the HF processor's expanded tokens and pixels of the same
prompt, teacher-forced on the tokens SGLang sampled:
- image prompts (several images of different sizes, base64 and data URI) and a text-only prompt;
- a sync of every tensor of "new" (MoE experts under per-expert names) through our
  `SGLangWeightUpdater`; a sync of the vision tower alone moves image answers, not text ones;
- the trap `SGLANG_VLM_CACHE_SIZE_MB=0` (rollout/server.py) closes: a server without it keeps serving
  the old vision tower's embeddings of an image it has seen, after the update and a cache flush;
- the trap the weight manifest closes: fused and per-expert expert names in one request lose the latter.
Run: `python -m pytest tests/e2e/test_vlm_sglang.py -q` (three tiny servers, ~1.5 min on 2 cores).
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from megatron_sapo.rollout.client import SGLangEngine
from megatron_sapo.rollout.server import ServerConfig, SGLangServer
from megatron_sapo.rollout.sglang_updates import SGLangWeightUpdater
from megatron_sapo.rollout.types import RolloutError
from megatron_sapo.utils.tiny_vlm import VISION_TOKENS, save_tiny_vlm, tiny_vlm_config, train_vlm_tokenizer
from tests.e2e.helpers import running

IMAGE, TEXT = {"type": "image"}, lambda t: {"type": "text", "text": t}
# (images as (width, height, pixel seed), content parts); sizes are multiples of 32 (patch 16 x merge 2)
PROMPTS = [
    ([(64, 32, 0), (32, 96, 1)], [IMAGE, TEXT("what is left of"), IMAGE, TEXT("?")]),
    ([(96, 64, 2)], [TEXT("describe"), IMAGE]),
    ([], [TEXT("1 + 2 =")]),
]
# fp32 engine vs fp32 transformers, measured <= 2e-6 everywhere below (2 runs, dense and MoE); a stale
# vision tower or an old tensor left behind moved them by 0.49 to 3.4 (sampled tokens vary run to run)
TOL = 0.01


class _ServerWithVlmCache(SGLangServer):
    """A server launched without our SGLANG_VLM_CACHE_SIZE_MB=0 (SGLang's default 100 MB cache)."""

    def _env(self) -> dict[str, str]:
        env = super()._env()
        env.pop("SGLANG_VLM_CACHE_SIZE_MB")
        return env


@pytest.fixture(scope="module")
def vlms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    root, tok = tmp_path_factory.mktemp("tiny_vlms"), train_vlm_tokenizer()
    out: dict[str, dict[str, str]] = {}
    for name in ("dense", "moe"):
        for version, seed in (("old", 0), ("new", 1)):
            config = tiny_vlm_config(moe=name == "moe")
            # 0.1, not 0.02: peaked distributions, so a vision-weight change moves log-probs by ~1
            for c in (config, config.text_config, config.vision_config):
                c.initializer_range = 0.1
            out.setdefault(name, {})[version] = str(
                save_tiny_vlm(root / f"{name}-{version}", config, tok, seed=seed)
            )
    return out


@pytest.fixture(scope="module")
def servers(vlms, tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("sglang_vlm_logs")
    servers = {
        "dense": SGLangServer(ServerConfig(model_path=vlms["dense"]["old"], log_dir=str(logs))),
        "moe": SGLangServer(ServerConfig(model_path=vlms["moe"]["old"], log_dir=str(logs))),
        "dense-cache": _ServerWithVlmCache(ServerConfig(model_path=vlms["dense"]["old"], log_dir=str(logs))),
    }
    with running(servers):  # all three load at once
        yield servers


def _engine(servers, vlms, server: str) -> SGLangEngine:
    """An engine on `server`, reset to the old checkpoint (earlier tests may have synced it)."""
    path = vlms[server.removesuffix("-cache")]["old"]
    engine = SGLangEngine([servers[server]], model_path=path)
    payload = {"model_path": path, "weight_version": "old", "flush_cache": True}
    engine.request(engine.endpoints[0], "POST", "/update_weights_from_disk", payload)
    return engine


def _image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _encoded(image: Image.Image, data_uri: bool) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    b64 = base64.b64encode(buf.getvalue()).decode()
    return f"data:image/png;base64,{b64}" if data_uri else b64  # SGLang takes both


def _prompt(processor, content: list[dict]) -> str:
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _generate(engine: SGLangEngine, processor, images: list, content: list[dict]) -> dict:
    payload = {
        "text": _prompt(processor, content),
        "sampling_params": {"max_new_tokens": 8, "temperature": 1.0},
        "return_logprob": True,
        "logprob_start_len": 0,
    }
    if images:
        payload["image_data"] = [
            _encoded(_image(*spec), data_uri=i % 2 == 0) for i, spec in enumerate(images)
        ]
    return engine.request(engine.endpoints[0], "POST", "/generate", payload)


class Reference:
    """transformers fp32 log-probs of the sampled tokens, on the HF processor's expansion of the prompt."""

    def __init__(self, model_dir: str, *, vision_from: str | None = None) -> None:
        self.processor = AutoProcessor.from_pretrained(model_dir)
        self.model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
        if vision_from is not None:  # the old language model under a new vision tower
            new = AutoModelForImageTextToText.from_pretrained(vision_from, dtype=torch.float32)
            self.model.model.visual.load_state_dict(new.model.visual.state_dict())

    def encode(self, images: list, content: list[dict]) -> dict:
        pil = [_image(*spec) for spec in images] or None
        return self.processor(text=[_prompt(self.processor, content)], images=pil, return_tensors="pt")

    @torch.no_grad()
    def logprobs(self, images: list, content: list[dict], tokens: list[int]) -> torch.Tensor:
        """Log-probs of `tokens` [K] after the prompt, up to and including the first vision token
        sampled (a random model samples them): fed back, transformers would take it for an image's."""
        vision = self.processor.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))
        cut = next((i for i, t in enumerate(tokens) if t in vision), len(tokens) - 1)
        enc = self.encode(images, content)
        n = enc["input_ids"].shape[1]
        enc["input_ids"] = torch.cat(
            [enc["input_ids"], torch.tensor([tokens[:cut]], dtype=torch.long)], dim=1
        )
        enc["attention_mask"] = torch.ones_like(enc["input_ids"])
        text = torch.zeros(1, cut, dtype=enc["mm_token_type_ids"].dtype)
        enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], text], dim=1)
        logits = self.model(**enc).logits[0, n - 1 :].float()
        return torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(tokens[: cut + 1])[:, None])[:, 0]


def _diff(out: dict, ref: Reference, images: list, content: list[dict]) -> float:
    pairs = out["meta_info"]["output_token_logprobs"]
    expected = ref.logprobs(images, content, [t for _, t, _ in pairs])
    served = torch.tensor([lp for lp, _, _ in pairs[: len(expected)]])
    return (served - expected).abs().max().item()


def _diffs(engine: SGLangEngine, ref: Reference) -> list[float]:
    return [_diff(_generate(engine, ref.processor, im, c), ref, im, c) for im, c in PROMPTS]


def _per_expert(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """HF per-expert linear weights from the official fused [E, H, 2I] / [E, I, H] tensors."""
    out = []
    for name, tensor in state.items():
        if name.endswith(".mlp.experts.gate_up_proj"):
            prefix, inter = name.removesuffix(".gate_up_proj"), tensor.shape[2] // 2
            for e, w in enumerate(tensor):  # w [H, 2I]: gate | up along the last dim
                out += [(f"{prefix}.{e}.gate_proj.weight", w[:, :inter].T.contiguous())]
                out += [(f"{prefix}.{e}.up_proj.weight", w[:, inter:].T.contiguous())]
        elif name.endswith(".mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            out += [(f"{prefix}.{e}.down_proj.weight", w.T.contiguous()) for e, w in enumerate(tensor)]
        else:
            out.append((name, tensor))
    return out


def _push(engine: SGLangEngine, bucket: list[tuple[str, torch.Tensor]], version: str) -> None:
    updater = SGLangWeightUpdater(engine)
    updater.begin()
    updater.load_tensors(bucket)
    updater.end()
    updater.finish(version)  # new version + /flush_cache


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_image_prompts_match_transformers(name, servers, vlms) -> None:
    engine = _engine(servers, vlms, name)
    ref = Reference(vlms[name]["old"])
    pad = ref.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    diffs = []
    for images, content in PROMPTS:
        out = _generate(engine, ref.processor, images, content)
        expanded = ref.encode(images, content)["input_ids"][0].tolist()
        # SGLang expands each image as the HF processor does, but reports the pads' ids as 0
        assert out["meta_info"]["prompt_tokens"] == len(expanded)
        assert [t for _, t, _ in out["meta_info"]["input_token_logprobs"]] == [
            0 if t == pad else t for t in expanded
        ]
        diffs.append(_diff(out, ref, images, content))
    # measured: <= 1.5e-6 (dense and MoE)
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_sync_of_every_tensor_matches_transformers_on_new_weights(name, servers, vlms) -> None:
    engine = _engine(servers, vlms, name)
    old, new = Reference(vlms[name]["old"]), Reference(vlms[name]["new"])
    before = _diffs(engine, old)  # also puts the images through the tower (and any cache) first
    bucket = _per_expert(load_file(f"{vlms[name]['new']}/model.safetensors"))
    names = [n for n, _ in bucket]
    assert any(n.startswith("model.visual.") for n in names)
    if name == "moe":
        assert "model.language_model.layers.3.mlp.experts.3.down_proj.weight" in names
        assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
    stale = _diffs(engine, new)
    _push(engine, bucket, "new")
    after = _diffs(engine, new)
    assert engine.weight_version == "new"
    assert max(before) <= TOL and min(stale) > 0.05, (before, stale)  # the update changes every answer
    # measured: before <= 1.5e-6, stale 1.5 to 3.4, after <= 1.9e-6 (dense and MoE): every tensor
    # arrived, per-expert MoE names included
    assert max(after) <= TOL, after


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_sync_of_the_vision_tower_moves_image_answers_only(name, servers, vlms) -> None:
    engine = _engine(servers, vlms, name)
    old, mixed = Reference(vlms[name]["old"]), Reference(vlms[name]["old"], vision_from=vlms[name]["new"])
    assert max(_diffs(engine, old)) <= TOL  # the images went through the old tower before the sync
    state = load_file(f"{vlms[name]['new']}/model.safetensors")
    _push(engine, [(n, t) for n, t in state.items() if n.startswith("model.visual.")], "new-vision")
    to_mixed, to_old = _diffs(engine, mixed), _diffs(engine, old)
    # image prompts: the new tower (measured <= 1.5e-6), far from the old one (0.49 to 2.3)
    assert max(to_mixed) <= TOL and min(to_old[:2]) > 0.05, (to_mixed, to_old)
    assert to_old[2] <= TOL  # the text-only prompt never touches the tower


def test_without_our_setting_the_vlm_cache_serves_the_old_tower(servers, vlms) -> None:
    """SGLang's default (SGLANG_VLM_CACHE_SIZE_MB unset): image embeddings are cached by image content
    and survive a weight update and /flush_cache. The same vision-only sync as above then leaves an
    image seen before on the old tower, while an image never seen gets the new one."""
    engine = _engine(servers, vlms, "dense-cache")
    old = Reference(vlms["dense"]["old"])
    mixed = Reference(vlms["dense"]["old"], vision_from=vlms["dense"]["new"])
    seen, unseen = PROMPTS[0], ([(64, 64, 9)], [IMAGE, TEXT("and this?")])
    assert _diff(_generate(engine, old.processor, *seen), old, *seen) <= TOL  # cached now
    state = load_file(f"{vlms['dense']['new']}/model.safetensors")
    _push(engine, [(n, t) for n, t in state.items() if n.startswith("model.visual.")], "new-vision")
    out = _generate(engine, old.processor, *seen)
    # measured: <= 1.9e-6 to the old tower, 1.3 and 1.7 to the new one
    assert _diff(out, old, *seen) <= TOL
    assert _diff(out, mixed, *seen) > 0.05
    assert _diff(_generate(engine, old.processor, *unseen), mixed, *unseen) <= TOL  # the sync did arrive


def test_fused_then_per_expert_names_in_one_bucket_lose_the_per_expert_ones(
    servers, vlms, monkeypatch
) -> None:
    """Why the manifest refuses a bucket with both expert forms: SGLang's Qwen3-VL-MoE loader, once it
    met a fused name, drops every later per-expert name of the request (a log warning, no error)."""
    engine = _engine(servers, vlms, "moe")
    new = load_file(f"{vlms['moe']['new']}/model.safetensors")
    fused = [(n, t) for n, t in new.items() if n.startswith("model.language_model.layers.0.mlp.experts.")]
    layer1 = [
        (n, t) for n, t in _per_expert(new) if n.startswith("model.language_model.layers.1.mlp.experts.")
    ]
    updater = SGLangWeightUpdater(engine)
    updater.begin()
    with pytest.raises(RolloutError, match="fused and per-expert"):
        updater.load_tensors(fused + layer1)
    monkeypatch.setattr(updater.manifest, "check", lambda bucket: None)  # send it anyway
    updater.load_tensors(fused + layer1)
    updater.end()
    updater.finish("mixed")
    refs = {}
    for layers in ((0,), (0, 1)):
        refs[layers] = ref = Reference(vlms["moe"]["old"])
        source = Reference(vlms["moe"]["new"]).model.model.language_model.layers
        for layer in layers:
            ref.model.model.language_model.layers[layer].mlp.experts.load_state_dict(
                source[layer].mlp.experts.state_dict()
            )
    images, content = PROMPTS[2]
    out = _generate(engine, refs[(0,)].processor, images, content)
    # measured: 4.8e-7 to layer 0 new + layer 1 old; 0.78 to both new
    assert _diff(out, refs[(0,)], images, content) <= TOL
    assert _diff(out, refs[(0, 1)], images, content) > 0.05


def _policy_sync(rank: int, world: int, url: str, key, model_dir: str, disk_dir: str) -> dict:
    """EP2 megatron policy loaded from the served checkpoint, perturbed (vision and language), synced
    through `WeightSync`; the server's log-probs of an image prompt vs the trainer's, before and after."""
    from functools import partial

    import torch.distributed as dist
    from transformers import AutoConfig

    from megatron_sapo.bridge import load_hf_weights
    from megatron_sapo.megatron.batching import Sample
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu
    from megatron_sapo.rollout.client import Endpoint
    from megatron_sapo.rollout.weight_sync import WeightSync, WeightSyncConfig

    init_megatron_cpu(ep=2)
    config = AutoConfig.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    policy = PolicyEngine(partial(build_gpt_model, config), OptimConfig(), LossConfig(mini_batches=1))
    load_hf_weights(policy.model, config, model_dir)  # official fused experts on disk
    engine = SGLangEngine([Endpoint(url, key)], model_path=model_dir) if rank == 0 else None
    images, content = PROMPTS[0]
    vision = processor.tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))

    def served_vs_trainer() -> float:
        out = [_generate(engine, processor, images, content) if rank == 0 else None]
        dist.broadcast_object_list(out, src=0)
        pairs = out[0]["meta_info"]["output_token_logprobs"]
        tokens = [t for _, t, _ in pairs]
        cut = next((i for i, t in enumerate(tokens) if t in vision), len(tokens))  # see Reference.logprobs
        enc = processor(
            text=[_prompt(processor, content)], images=[_image(*s) for s in images], return_tensors="pt"
        )
        prompt = enc["input_ids"][0]
        sample = Sample(
            torch.cat([prompt, torch.tensor(tokens[:cut])]),
            response_start=len(prompt),
            advantage=0.0,
            pixel_values=enc["pixel_values"],
            image_grid_thw=enc["image_grid_thw"],
        )
        trainer = policy.compute_logprobs([sample])[0]
        served = torch.tensor([lp for lp, _, _ in pairs[:cut]])
        return (served - trainer).abs().max().item()

    before = served_vs_trainer()
    g = torch.Generator().manual_seed(3)  # same on both EP ranks: replicated weights stay equal
    with torch.no_grad():
        for chunk in policy.model:
            for p in chunk.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    stale = served_vs_trainer()
    tensor = WeightSyncConfig(transport="tensor", bucket_bytes=64 << 10)
    WeightSync(engine, policy.model, config, tensor).sync(version="v1")
    after = served_vs_trainer()
    # again through an exported checkpoint: the "disk" transport writes the policy as HF safetensors
    # (plus config, tokenizer and processor files) and the server loads that directory
    with torch.no_grad():
        for chunk in policy.model:
            for p in chunk.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    stale_disk = served_vs_trainer()
    disk = WeightSyncConfig(transport="disk", disk_dir=disk_dir)
    WeightSync(engine, policy.model, config, disk).sync(version="v2")
    after_disk = served_vs_trainer()
    return dict(before=before, stale=stale, after=after, stale_disk=stale_disk, after_disk=after_disk)


def test_megatron_policy_sync_into_the_vlm_server_matches_the_trainer(servers, vlms, tmp_path) -> None:
    """The trainer's path: a sharded Qwen3-VL-MoE policy (EP2) -> bridge export -> SGLang, vision included."""
    from megatron_sapo.utils.spawn import run_on_ranks

    _engine(servers, vlms, "moe")  # back to the checkpoint the policy loads
    server = servers["moe"]
    args = (server.url, server.key, vlms["moe"]["old"], str(tmp_path / "sync"))
    result = run_on_ranks(_policy_sync, world_size=2, args=args)[0]
    print(f"served vs trainer: {result}")
    assert result["before"] <= TOL  # same weights: the trainer's π on the served image prompt
    assert result["stale"] > 0.1  # perturbed policy, server not synced yet
    assert result["after"] <= TOL, result
    assert result["stale_disk"] > 0.1 and result["after_disk"] <= TOL, result
