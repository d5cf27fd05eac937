"""SAPO `PolicyEngine.train_step` on GPU with the Transformer Engine layer spec, against references.

Tiny Qwen3 (dense, 2 layers) and Qwen3-MoE (3 layers, 4 experts top-2) from transformers configs
(tests/hf_reference.py), built by `megatron_sapo.megatron.models.build_gpt_model(spec="te")` and loaded
with the transformers model's weights by `megatron_sapo.bridge.load_hf_weights` (TE parameter names):

- fp32, TP=1: logits equal transformers' fp32 CPU logits (≤ 1e-4; TF32 off via NVIDIA_TF32_OVERRIDE=0).
- bf16, TP=1: π_old log-probs, loss, grad norm, gradients and updated parameters of one `train_step`
  (2 mini-batches, the second off-policy) equal the fp32 run's within bf16 tolerances.
- 2 GPUs: dense and MoE (EP=1) at TP=2 with sequence parallelism vs. the same bf16 step on one GPU;
  TP shards are gathered into the TP=1 run's tensors by shape; TP replicas (norms, router) must agree.

Gradients are those of the last mini-batch, read from megatron DDP's `main_grad` buffers (kept until the
next step zeroes them); clipping is off so they are the raw gradients. Every sample has an even number
of positions: sequence parallelism splits each micro-batch's T over the TP ranks and `PolicyEngine`
does not pad T to a multiple of TP. Each run is a fresh process (`run_on_ranks(backend="nccl")`).
Skipped, with the reason, without CUDA, without Transformer Engine, or (TP=2 tests) with one GPU.

    python -m pytest tests/gpu/test_engine_gpu.py -q -rs
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks
from tests.hf_reference import qwen3_config, qwen3_moe_config, tiny_hf_model

NUM_SAMPLES, MINI_BATCHES, TOKEN_BUDGET, LR = 8, 2, 40, 1e-3
LOGIT_TOL = 1e-4  # fp32 TE vs fp32 transformers
# bf16 tolerances (bf16 keeps 8 significant bits: 2^-8 ≈ 4e-3 relative rounding per operation).
LOGP_MEAN_TOL, LOGP_MAX_TOL = 2e-2, 0.15
LOSS_REL, GRAD_NORM_REL = 2e-2, 5e-2
GRAD_REL_GLOBAL, GRAD_REL_TENSOR = 5e-2, 0.25
# Adam's first steps move each weight by about lr whatever the gradient's size, so two runs whose
# gradients differ in sign on tiny entries differ by up to ~2 lr per step, plus bf16 rounding of the value.
PARAM_ATOL, PARAM_RTOL = 4 * LR, 2**-7


def _hf_case(moe: bool) -> tuple[Any, dict[str, np.ndarray], torch.nn.Module]:
    """(transformers config, its state dict by HF name as numpy, the transformers model), on CPU."""
    config = qwen3_moe_config() if moe else qwen3_config()
    hf = tiny_hf_model(config, seed=1)
    return config, {k: v.numpy() for k, v in hf.state_dict().items()}, hf


def _samples(vocab: int) -> list:
    from megatron_sapo.megatron.batching import Sample

    generator = torch.Generator().manual_seed(5)
    out = []
    for _ in range(NUM_SAMPLES):
        length = 2 * int(torch.randint(5, 13, (1,), generator=generator)) + 1  # seq_len = length - 1: even
        prompt = int(torch.randint(3, 7, (1,), generator=generator))
        tokens = torch.randint(1, vocab, (length,), generator=generator)
        out.append(
            Sample(tokens, response_start=prompt, advantage=float(torch.randn((), generator=generator)))
        )
    return out


# ---------------------------------------------------------------- inside the spawned ranks


def _init(tp: int) -> None:
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)


def _te_model(
    hf_config: Any,
    hf_state: dict[str, np.ndarray],
    dtype: torch.dtype,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
) -> torch.nn.Module:
    """A TE-spec GPTModel for this rank (parallel state initialised), loaded from the HF state dict."""
    from megatron.core import parallel_state

    from megatron_sapo.bridge import load_hf_weights
    from megatron_sapo.megatron.models import build_gpt_model, transformer_config_from_hf

    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = transformer_config_from_hf(hf_config, tp=tp, dtype=dtype)
    model = build_gpt_model(hf_config, pre_process, post_process, vp_stage=vp_stage, spec="te", config=config)
    load_hf_weights(model, hf_config, {k: torch.from_numpy(v) for k, v in hf_state.items()})
    return model


def _te_logits(rank: int, world_size: int, hf_config: Any, hf_state: dict, tokens: np.ndarray) -> np.ndarray:
    _init(tp=1)
    model = _te_model(hf_config, hf_state, torch.float32).eval()
    ids = torch.from_numpy(tokens).cuda()
    b, t = ids.shape
    with torch.no_grad():
        logits = model(ids, torch.arange(t, device=ids.device).expand(b, t), None)
    return logits.float().cpu().numpy()


def _train(rank: int, world_size: int, hf_config: Any, hf_state: dict, tp: int, dtype_name: str) -> dict:
    """π_old pass + one `train_step`; this rank's log-probs, metrics, params and last grads by name."""
    from megatron.core import parallel_state

    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine

    _init(tp=tp)
    dtype = getattr(torch, dtype_name)

    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None) -> torch.nn.Module:
        return _te_model(hf_config, hf_state, dtype, pre_process, post_process, vp_stage)

    engine = PolicyEngine(
        provide,
        OptimConfig(lr=LR, clip_grad=0.0),
        LossConfig(mini_batches=MINI_BATCHES, micro_batch_tokens=TOKEN_BUDGET),
    )
    module = engine.model[0].module
    before = {n: p.detach().float().cpu().clone() for n, p in module.named_parameters()}
    samples = _samples(hf_config.vocab_size)
    old = engine.compute_logprobs(samples)
    metrics = engine.train_step(samples, old)
    named = list(module.named_parameters())
    return dict(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        dtypes={str(p.dtype) for _, p in named},
        sequence_parallel=module.config.sequence_parallel,
        old=[x.numpy() for x in old],
        metrics=metrics,
        moved=max(float((p.detach().float().cpu() - before[n]).abs().max()) for n, p in named),
        params={n: p.detach().float().cpu().numpy() for n, p in named},
        grads={n: p.main_grad.detach().float().cpu().numpy() for n, p in named},
    )


# ---------------------------------------------------------------- in the test process


def _spawn(fn: Callable, world_size: int, *args: Any) -> list:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NVIDIA_TF32_OVERRIDE", "0")  # cuBLAS: fp32 GEMMs in full fp32 (TE's included)
        return run_on_ranks(fn, world_size=world_size, args=args, timeout=600, backend="nccl")


def _need_gpus(count: int) -> None:
    found = torch.cuda.device_count()
    if found < count:
        pytest.skip(f"needs {count} GPUs (found {found}): one GPU per rank for the TP={count} layout")


def _split_dim(full_shape: tuple[int, ...], local_shape: tuple[int, ...]) -> int | None:
    """The dimension tensor parallelism split, found by shape (TE leaves expert weights unmarked)."""
    dims = [d for d, (f, s) in enumerate(zip(full_shape, local_shape)) if f != s]
    assert len(dims) <= 1, f"shapes {full_shape} vs {local_shape}"
    return dims[0] if dims else None


def _gather(results: list[dict], field: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Full tensors (of the given shapes) from the TP ranks' shards of `field`; TP replicas must agree."""
    by_name: dict[str, dict[int, np.ndarray]] = {}
    for r in results:
        for name, arr in r[field].items():
            by_name.setdefault(name, {})[r["tp_rank"]] = arr
    out = {}
    for name, by_rank in by_name.items():
        parts = [by_rank[k] for k in sorted(by_rank)]
        dim = _split_dim(shapes[name], parts[0].shape)
        if dim is None:
            for part in parts[1:]:
                np.testing.assert_allclose(part, parts[0], rtol=1e-5, atol=1e-6, err_msg=f"{field} {name}")
            out[name] = parts[0]
        elif ".linear_fc1." in name:  # GLU fc1: shard r is [gate_r; up_r], the full tensor [gate; up]
            halves = [np.split(p, 2, axis=dim) for p in parts]
            out[name] = np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=dim)
        else:
            out[name] = np.concatenate(parts, axis=dim)
    return out


def _assert_same_step(got: list[dict], ref: list[dict], label: str) -> None:
    """`got` (one result per rank) made the same train step as the TP=1 run `ref`, within bf16 tolerances."""
    diffs = np.concatenate([np.abs(a - b) for a, b in zip(got[0]["old"], ref[0]["old"])])
    print(f"{label}: old logp |diff| mean {diffs.mean():.2e} max {diffs.max():.2e}")
    assert diffs.mean() <= LOGP_MEAN_TOL and diffs.max() <= LOGP_MAX_TOL
    for r in got:
        for key in ["loss"] + [f"loss/mini_batch_{k}" for k in range(MINI_BATCHES)]:
            assert r["metrics"][key] == pytest.approx(ref[0]["metrics"][key], rel=LOSS_REL, abs=1e-3), key
        assert r["metrics"]["grad_norm"] == pytest.approx(ref[0]["metrics"]["grad_norm"], rel=GRAD_NORM_REL)
        assert r["metrics"]["skipped_steps"] == 0

    ref_grads = ref[0]["grads"]
    grads = _gather(got, "grads", {k: v.shape for k, v in ref_grads.items()})
    assert set(grads) == set(ref_grads)
    err = {k: float(np.linalg.norm(grads[k] - ref_grads[k])) for k in ref_grads}
    size = {k: float(np.linalg.norm(ref_grads[k])) for k in ref_grads}
    total = np.linalg.norm(list(err.values())) / np.linalg.norm(list(size.values()))
    per_tensor = {k: err[k] / max(size[k], 1e-12) for k in ref_grads}
    worst = max(per_tensor, key=per_tensor.get)
    print(f"{label}: grads rel err global {total:.2e}, worst {per_tensor[worst]:.2e} ({worst})")
    assert total <= GRAD_REL_GLOBAL
    assert per_tensor[worst] <= GRAD_REL_TENSOR, worst

    assert ref[0]["moved"] >= LR / 2, "the reference step did not move the weights"
    ref_params = ref[0]["params"]
    params = _gather(got, "params", {k: v.shape for k, v in ref_params.items()})
    for k, expected in ref_params.items():
        np.testing.assert_allclose(params[k], expected, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=k)


@pytest.fixture(scope="module")
def bridge() -> None:
    """The HF -> megatron weight loader these tests load with (skips where it is not in the tree)."""
    pytest.importorskip("megatron_sapo.bridge", reason="needs megatron_sapo.bridge (load_hf_weights)")


@pytest.fixture(scope="module")
def dense() -> tuple[Any, dict[str, np.ndarray], torch.nn.Module]:
    return _hf_case(moe=False)


def test_te_fp32_logits_match_transformers(transformer_engine: None, bridge: None, dense) -> None:
    config, hf_state, hf = dense
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(input_ids=tokens).logits.numpy()
    got = _spawn(_te_logits, 1, config, hf_state, tokens.numpy())[0]
    assert got.shape == expected.shape
    err = float(np.abs(got - expected).max())
    print(f"fp32 TE vs transformers: max |logit diff| {err:.2e}")
    assert err <= LOGIT_TOL
    assert expected.std() > 1e2 * LOGIT_TOL  # the comparison is sensitive


def test_bf16_train_step_matches_fp32(transformer_engine: None, bridge: None, dense) -> None:
    config, hf_state, _ = dense
    ref = _spawn(_train, 1, config, hf_state, 1, "float32")
    got = _spawn(_train, 1, config, hf_state, 1, "bfloat16")
    assert got[0]["dtypes"] == {"torch.bfloat16"} and ref[0]["dtypes"] == {"torch.float32"}
    _assert_same_step(got, ref, "bf16 vs fp32")


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_tp2_sequence_parallel_matches_one_gpu(transformer_engine: None, bridge: None, moe: bool) -> None:
    _need_gpus(2)
    config, hf_state, _ = _hf_case(moe)
    ref = _spawn(_train, 1, config, hf_state, 1, "bfloat16")
    got = _spawn(_train, 2, config, hf_state, 2, "bfloat16")
    assert all(r["sequence_parallel"] for r in got) and not ref[0]["sequence_parallel"]
    _assert_same_step(got, ref, f"{'moe' if moe else 'dense'} TP=2+SP vs TP=1")
