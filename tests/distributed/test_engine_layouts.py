"""One SAPO `PolicyEngine.train_step` at every parallel layout equals the single-process run.

Each layout (TP=2, PP=2, PP=2 with virtual PP, DP=2, TP=2×PP=2, MoE at EP=2 and EP=4) starts from the
same weights (a TP=PP=EP=1 state dict from a seeded generator, sliced per rank), computes the π_old
log-probs of 8 variable-length samples, then runs one train step of 2 mini-batches (the second one
off-policy: r ≠ 1) with a token budget that yields several micro-batches. Checked against the
single-process (world size 1) run: π_old log-probs, the reported loss and grad norm, and every updated
parameter, gathered to full tensors (TP shards concatenated along `partition_dim`, pipeline stages and
expert shards renamed to their TP=PP=EP=1 names). MoE with TP>1 needs sequence parallelism, which
has no CPU path: not covered here.

    python -m pytest tests/distributed/test_engine_layouts.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks

VOCAB, NUM_SAMPLES, MINI_BATCHES, TOKEN_BUDGET = 64, 8, 2, 40
DENSE_LAYERS, MOE_LAYERS, WEIGHT_SEED = 4, 2, 11
TOL = 1e-5


def _samples() -> list:
    from megatron_sapo.megatron.testing import random_samples

    return random_samples(NUM_SAMPLES, vocab=VOCAB, seed=5)


def _init(**layout) -> None:
    from megatron_sapo.megatron.testing import init_megatron_cpu

    init_megatron_cpu(**layout)


def _provider(moe: bool, weights: dict[str, np.ndarray] | None):
    """A megatron model provider: local-spec GPT for this (virtual) stage, loaded from full weights."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    from megatron_sapo.megatron.testing import full_name, shard_tensor, tiny_gpt_config

    vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size()
    config = tiny_gpt_config(
        num_layers=MOE_LAYERS if moe else DENSE_LAYERS,
        num_moe_experts=4 if moe else None,
        virtual_pipeline_model_parallel_size=vpp,
    )
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts, qk_layernorm=True, normalization=config.normalization
    )

    @torch.no_grad()
    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None) -> GPTModel:
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=VOCAB,
            max_sequence_length=32,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=True,
            position_embedding_type="rope",
            vp_stage=vp_stage,
        )
        if weights is not None:
            offsets = _offsets(model, vp_stage)
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            tp_size = parallel_state.get_tensor_model_parallel_world_size()
            for name, param in model.named_parameters():
                key = full_name(name, **offsets)
                key = "embedding.word_embeddings.weight" if key == "output_layer.weight" else key
                source = torch.from_numpy(weights[key])
                param.copy_(shard_tensor(source, param, name, tp_rank=tp_rank, tp_size=tp_size))
        return model

    def _offsets(model, vp_stage):
        n_local = (config.num_moe_experts or 0) // parallel_state.get_expert_model_parallel_world_size()
        return dict(
            layer_offset=get_transformer_layer_offset(config, vp_stage=vp_stage),
            expert_offset=parallel_state.get_expert_model_parallel_rank() * n_local,
        )

    provide.offsets = _offsets
    return provide


def _local_params(engine, provider) -> list[tuple[str, np.ndarray, int, int | None, bool]]:
    """(full name, local tensor, TP rank, partition dim or None, is GLU fc1) for every parameter."""
    from megatron.core import parallel_state

    from megatron_sapo.megatron.testing import full_name

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    out = []
    for vp, chunk in enumerate(engine.model):
        module = chunk.module
        offsets = provider.offsets(module, vp if len(engine.model) > 1 else None)
        for name, p in module.named_parameters():
            key = full_name(name, **offsets)
            key = "embedding.word_embeddings.weight" if key == "output_layer.weight" else key  # tied copy
            dim = p.partition_dim if tp_size > 1 and getattr(p, "tensor_model_parallel", False) else None
            out.append((key, p.detach().numpy().copy(), tp_rank, dim, ".linear_fc1." in name))
    return out


def _run_engine(rank: int, world_size: int, layout: dict, moe: bool, weights: dict | None) -> dict:
    from megatron.core import parallel_state

    from megatron_sapo.megatron.batching import shard_for_data_parallel
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.testing import randomize_weights

    _init(**layout)
    if weights is None:  # the reference draws the full weights itself
        tmp = _provider(moe, None)(True, True)
        weights = {k: v.numpy() for k, v in randomize_weights(tmp, WEIGHT_SEED + moe).items()}
    provider = _provider(moe, weights)
    engine = PolicyEngine(
        provider,
        # Adam divides by |g| + eps: with the default eps 1e-8 it turns fp32 rounding noise of
        # near-zero gradient entries (~1e-9 absolute) into 1e-5-sized update differences; eps = 1e-5
        # keeps the comparison about the gradients, not about that amplification.
        OptimConfig(lr=1e-2, weight_decay=0.01, clip_grad=1.0, adam_eps=1e-5),
        LossConfig(mini_batches=MINI_BATCHES, micro_batch_tokens=TOKEN_BUDGET),
    )
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    kw = dict(mini_batches=MINI_BATCHES, dp_rank=dp_rank, dp_size=dp_size)
    local = shard_for_data_parallel(_samples(), **kw)
    global_index = shard_for_data_parallel(list(range(NUM_SAMPLES)), **kw)
    old = engine.compute_logprobs(local)
    metrics = engine.train_step(local, old)
    return dict(
        weights=weights,
        metrics=metrics,
        old={i: x.numpy() for i, x in zip(global_index, old)},
        params=_local_params(engine, provider),
    )


def _gather_full(results: list[dict]) -> dict[str, np.ndarray]:
    """Full tensors from every rank's shards; replicas (DP, TP-replicated, tied copies) must agree."""
    slots: dict[str, dict[int, tuple]] = {}
    for result in results:
        for key, arr, tp_rank, dim, glu in result["params"]:
            slot = slots.setdefault(key, {})
            if tp_rank in slot:
                assert np.abs(slot[tp_rank][0] - arr).max() <= TOL, f"replicas of {key} differ"
            else:
                slot[tp_rank] = (arr, dim, glu)
    full = {}
    for key, slot in slots.items():
        parts = [slot[r] for r in sorted(slot)]
        dim, glu = parts[0][1], parts[0][2]
        if dim is None:
            for arr, _, _ in parts[1:]:
                assert np.abs(arr - parts[0][0]).max() <= TOL, f"TP replicas of {key} differ"
            full[key] = parts[0][0]
        elif glu:
            halves = [np.split(arr, 2, axis=dim) for arr, _, _ in parts]
            full[key] = np.concatenate([h[0] for h in halves] + [h[1] for h in halves], axis=dim)
        else:
            full[key] = np.concatenate([arr for arr, _, _ in parts], axis=dim)
    return full


@pytest.fixture(scope="module")
def reference() -> dict[bool, dict]:
    """Single-process runs: dense and MoE, each with the full weights it drew and its updated params."""
    out = {}
    for moe in (False, True):
        result = run_on_ranks(_run_engine, world_size=1, args=({}, moe, None))[0]
        result["full"] = _gather_full([result])
        out[moe] = result
    return out


def test_reference_covers_micro_batches_and_off_policy(reference: dict[bool, dict]) -> None:
    from megatron_sapo.megatron.batching import pack_micro_batches, split_mini_batches

    for mb in split_mini_batches(_samples(), MINI_BATCHES):
        assert len(pack_micro_batches([s.seq_len for s in mb], TOKEN_BUDGET)) >= 2
    metrics = reference[False]["metrics"]
    assert metrics["skipped_steps"] == 0 and np.isfinite(metrics["grad_norm"])
    # On-policy first mini-batch: r = 1 exactly; the second sees the updated policy.
    assert reference[False]["metrics"]["log_ratio/abs_mean"] > 1e-4
    for moe in (False, True):
        before = reference[moe]["weights"]
        after = reference[moe]["full"]
        assert set(before) == set(after)
        assert max(np.abs(after[k] - before[k]).max() for k in before) > 1e-3  # the step moved weights


LAYOUTS = {
    "tp2": (2, dict(tp=2), False),
    "pp2": (2, dict(pp=2), False),
    "pp2_vpp2": (2, dict(pp=2, vpp=2), False),
    "dp2": (2, dict(), False),
    "tp2_pp2": (4, dict(tp=2, pp=2), False),
    "moe_ep2": (2, dict(ep=2), True),
    "moe_ep4": (4, dict(ep=4), True),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_step_matches_single_process(layout: str, reference: dict[bool, dict]) -> None:
    world_size, parallel, moe = LAYOUTS[layout]
    ref = reference[moe]
    results = run_on_ranks(_run_engine, world_size=world_size, args=(parallel, moe, ref["weights"]))
    old = {i: x for r in results for i, x in r["old"].items()}
    assert sorted(old) == list(range(NUM_SAMPLES))
    for i, x in old.items():
        assert np.abs(x - ref["old"][i]).max() <= TOL, f"old logprobs of sample {i}"
    for r in results:  # every rank reports the global (DP-reduced, last-stage) metrics
        assert abs(r["metrics"]["loss"] - ref["metrics"]["loss"]) <= TOL
        for k in range(MINI_BATCHES):
            key = f"loss/mini_batch_{k}"
            assert abs(r["metrics"][key] - ref["metrics"][key]) <= TOL, key
        assert r["metrics"]["grad_norm"] == pytest.approx(ref["metrics"]["grad_norm"], rel=1e-5)
    full = _gather_full(results)
    assert set(full) == set(ref["full"])
    diffs = {k: float(np.abs(full[k] - ref["full"][k]).max()) for k in full}
    worst = max(diffs, key=diffs.get)
    print(f"{layout}: max |param - ref| = {diffs[worst]:.2e} ({worst})")
    assert diffs[worst] <= TOL, worst


def _non_finite(rank: int, world_size: int) -> dict:
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.testing import randomize_weights

    _init()
    provider = _provider(False, None)

    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        model = provider(pre_process, post_process, vp_stage)
        randomize_weights(model, WEIGHT_SEED)
        return model

    engine = PolicyEngine(provide, OptimConfig(lr=1e-2), LossConfig(mini_batches=2, micro_batch_tokens=1000))
    samples = _samples()[:4]
    samples[0].advantage = float("nan")  # poisons the first mini-batch's gradient only
    before = [p.detach().clone() for p in engine.model[0].parameters()]
    metrics = engine.train_step(samples)
    moved = [float((p.detach() - b).abs().max()) for p, b in zip(engine.model[0].parameters(), before)]
    return dict(metrics=metrics, moved=max(moved))


def test_non_finite_gradient_skips_the_step() -> None:
    result = run_on_ranks(_non_finite, world_size=1)[0]
    assert result["metrics"]["skipped_steps"] == 1.0
    assert np.isfinite(result["metrics"]["grad_norm"])  # the second mini-batch stepped
    assert result["moved"] > 0
