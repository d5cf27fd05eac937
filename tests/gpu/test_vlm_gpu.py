"""Qwen3-VL / Qwen3-VL-MoE policies on GPU with the Transformer Engine layer spec, against transformers.

The tiny models of tests/vlm_reference.py, built by `build_gpt_model(spec="te")` (vision tower on the GPU
in the parameters' dtype) and loaded through the bridge (TE parameter names):
- fp32: logits of an image+text batch (3 images of 3 sizes over 2 prompts) equal transformers' fp32 CPU
  logits (≤ 1e-4; TF32 off via NVIDIA_TF32_OVERRIDE=0);
- bf16: `PolicyEngine.compute_logprobs` of image+text and text-only samples is within bf16 rounding of
  the fp32 engine's, and one SAPO `train_step` runs with finite loss and grad norm.
Skipped, with the reason, without CUDA or Transformer Engine (tests/gpu/conftest.py). Not yet run: no
GPU has been lent to the task that wrote it.

    python -m pytest tests/gpu/test_vlm_gpu.py -q -rs
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks

LOGIT_TOL = 1e-4
LOGP_MEAN_TOL, LOGP_MAX_TOL = 2e-2, 0.15  # bf16 vs fp32, as tests/gpu/test_engine_gpu.py


def _setup(moe: bool):
    from megatron_sapo.utils.tiny_vlm import build_processor, train_vlm_tokenizer
    from tests.vlm_reference import hf_vlm

    processor = build_processor(train_vlm_tokenizer())
    config, hf = hf_vlm(moe, processor, seed=1)
    return processor, config, hf


def _te_logits(rank: int, world_size: int, moe: bool) -> np.ndarray:
    from megatron_sapo.bridge import load_hf_weights
    from megatron_sapo.megatron.models import build_gpt_model, transformer_config_from_hf
    from megatron_sapo.megatron.parallel import ParallelConfig, init_parallel
    from tests.vlm_reference import image_batch, mrope_positions

    init_parallel(ParallelConfig(), seed=1234)
    processor, config, hf = _setup(moe)
    tc = transformer_config_from_hf(config, dtype=torch.float32)
    model = build_gpt_model(config, spec="te", config=tc).eval()
    load_hf_weights(model, config, hf.state_dict())
    enc = image_batch(processor)
    cuda = {k: v.cuda() for k, v in enc.items()}
    with torch.no_grad():
        logits = model(
            cuda["input_ids"],
            mrope_positions(enc, config).cuda(),
            None,  # TE's causal mask type; right padding sits after every real token
            pixel_values=cuda["pixel_values"],
            image_grid_thw=cuda["image_grid_thw"],
        )
    return logits.float().cpu().numpy()


def _logprobs(rank: int, world_size: int, moe: bool, dtype_name: str) -> dict:
    from megatron_sapo.bridge import load_hf_weights
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.models import build_gpt_model, transformer_config_from_hf
    from megatron_sapo.megatron.parallel import ParallelConfig, init_parallel
    from tests.distributed.test_vlm_engine import _samples

    init_parallel(ParallelConfig(), seed=1234)
    processor, config, hf = _setup(moe)
    state = hf.state_dict()
    tc = transformer_config_from_hf(config, dtype=getattr(torch, dtype_name))

    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        model = build_gpt_model(config, pre_process, post_process, vp_stage=vp_stage, spec="te", config=tc)
        load_hf_weights(model, config, state)
        return model

    engine = PolicyEngine(provide, OptimConfig(lr=1e-3), LossConfig(mini_batches=2))
    samples = _samples(processor)
    old = engine.compute_logprobs(samples)
    metrics = engine.train_step(samples, old)
    return dict(old=[x.float().numpy() for x in old], loss=metrics["loss"], grad_norm=metrics["grad_norm"])


def _spawn(fn, *args):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NVIDIA_TF32_OVERRIDE", "0")  # cuBLAS: fp32 GEMMs in full fp32 (TE's included)
        return run_on_ranks(fn, world_size=1, args=args, backend="nccl")[0]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_te_fp32_vlm_logits_match_transformers(transformer_engine: None, moe: bool) -> None:
    from tests.vlm_reference import image_batch

    processor, _, hf = _setup(moe)
    enc = image_batch(processor)
    with torch.no_grad():
        expected = hf(**enc).logits.numpy()
    got = _spawn(_te_logits, moe)
    real = enc["attention_mask"].bool().numpy()
    err = float(np.abs(got[..., : expected.shape[-1]][real] - expected[real]).max())
    print(f"moe={moe}: fp32 TE vs transformers, image+text: max |logit diff| {err:.2e}")
    assert err <= LOGIT_TOL


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_bf16_vlm_logprobs_and_step(transformer_engine: None, moe: bool) -> None:
    ref = _spawn(_logprobs, moe, "float32")
    got = _spawn(_logprobs, moe, "bfloat16")
    diffs = np.concatenate([np.abs(a - b) for a, b in zip(got["old"], ref["old"])])
    print(f"moe={moe}: bf16 vs fp32 π_old: mean {diffs.mean():.2e}, max {diffs.max():.2e}")
    assert diffs.mean() <= LOGP_MEAN_TOL and diffs.max() <= LOGP_MAX_TOL
    assert np.isfinite(got["loss"]) and np.isfinite(got["grad_norm"])
