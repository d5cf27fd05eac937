"""Data parallelism splits the work: the trainer's policy update (`loop._update_policy`: rank 0's samples
→ `PolicyEngine.scatter` → π_old pass → `gather` → `train_step`) equals the single-process run.

Each layout (DP=2; DP=2 with a tiny MoE at EP=2; DP=2 × PP=2) starts from the same full weights (a
seeded TP=PP=EP=1 state dict, sliced per rank) and runs two trainer steps: 16 samples of varied lengths
(2 global mini-batches, several micro-batches each, the second mini-batch off-policy), then 3 samples
(mini-batch 1 holds one sample, so one DP rank has none and runs the masked filler inside the
collectives). Checked against the DP1 single-process run of the same code (the independent reference):
π_old log-probs gathered on rank 0, the logged loss / per-mini-batch loss / grad norm on every rank, and
every updated parameter (pipeline stages and expert shards renamed to their TP=PP=EP=1 names). A forward
pre-hook on the embedding counts the real (non-pad) tokens each rank feeds its model: per rank it is its
share's tokens, the DP ranks' counts add up to the DP1 count, and in every mini-batch no rank exceeds
mean + longest sample (the token-balanced split's bound). The shares' global indices are disjoint across
DP ranks, cover the step, and are equal within a model-parallel group. Errors stop every rank together:
too few samples on rank 0 (scatter's ValueError) and non-finite π_old log-probs on rank 1's share only
(`PolicyDiverged` on both ranks, naming the poisoned samples, before any update).

Tolerance 1e-5 (fp32): the DP sum of partial gradients and the different micro-batch grouping change
the summation order (~1e-7 relative); Adam (eps 1e-5 here, see test_engine_layouts) keeps that from
being amplified on near-zero gradient entries; lr 1e-2 moves weights by ~1e-2, so 1e-5 still catches
a wrong normaliser, a dropped or duplicated sample, or a mini-batch mix-up (each ≥ 1e-3). The second
step's π_old log-probs get 1e-4: they are of weights that already differ by step 0's rounding (≤ 1e-5),
which four layers of 0.2-scale weights amplify about tenfold in a log-prob (seen: 1.6e-5 at DP2).

    python -m pytest tests/distributed/test_data_parallel.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks

VOCAB, MINI_BATCHES, TOKEN_BUDGET, WEIGHT_SEED = 64, 2, 60, 7
STEPS = ((16, 21), (3, 22))  # (samples, seed) per trainer step
DENSE_LAYERS, MOE_LAYERS = 4, 2
TOL = 1e-5
TOL_AFTER_UPDATE = 1e-4  # log-probs of weights that already carry step 0's rounding (see the docstring)


def _steps() -> list[list]:
    from megatron_sapo.megatron.testing import random_samples

    return [random_samples(n, vocab=VOCAB, seed=seed, lengths=(8, 30)) for n, seed in STEPS]


def _config(moe: bool):
    from megatron_sapo.megatron.testing import tiny_gpt_config

    return tiny_gpt_config(num_layers=MOE_LAYERS if moe else DENSE_LAYERS, num_moe_experts=4 if moe else None)


def _run(rank: int, world_size: int, layout: dict, moe: bool, weights: dict | None) -> dict:
    from megatron.core import parallel_state

    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.testing import (
        build_tiny_gpt,
        full_name,
        init_megatron_cpu,
        load_full_weights,
        randomize_weights,
        shard_offsets,
    )
    from megatron_sapo.train.loop import _update_policy

    init_megatron_cpu(**layout)
    if weights is None:  # the DP1 reference draws the full weights itself
        weights = {
            k: v.numpy() for k, v in randomize_weights(build_tiny_gpt(_config(moe)), WEIGHT_SEED).items()
        }

    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        model = build_tiny_gpt(_config(moe), vocab_size=VOCAB)  # pre/post follow this rank's stage
        full = {k: torch.from_numpy(v) for k, v in weights.items()}
        load_full_weights(model, full, tp_rank=0, tp_size=1)
        return model

    engine = PolicyEngine(
        provide,
        OptimConfig(lr=1e-2, weight_decay=0.01, clip_grad=1.0, adam_eps=1e-5),
        LossConfig(mini_batches=MINI_BATCHES, micro_batch_tokens=TOKEN_BUDGET),
    )
    module = engine.model[0].module
    seen = [0]  # real tokens fed to this rank's model (the first pipeline stage has the embedding)
    if module.pre_process:
        module.embedding.word_embeddings.register_forward_pre_hook(
            lambda _, args: seen.__setitem__(0, seen[0] + int((args[0] != 0).sum()))
        )
    per_mini_batch: list[int] = []  # tokens of each update's forward, in order
    step_fn = engine._mini_batch_step

    def counted(*args, **kwargs):
        before = seen[0]
        out = step_fn(*args, **kwargs)
        per_mini_batch.append(seen[0] - before)
        return out

    engine._mini_batch_step = counted
    shares, steps = [], []
    for samples in _steps():
        scatter = engine.scatter

        def keep(arg, scatter=scatter):
            shares.append(scatter(arg))
            return shares[-1]

        engine.scatter = keep
        start = seen[0]
        old, metrics = _update_policy(engine, samples if rank == 0 else None)
        engine.scatter = scatter
        steps.append(
            dict(
                old=None if old is None else [x.numpy() for x in old],
                metrics=metrics,
                tokens=seen[0] - start,
                per_mini_batch=per_mini_batch[-MINI_BATCHES:],
            )
        )
    params = {}
    offsets = shard_offsets(module)
    for name, p in module.named_parameters():
        key = full_name(name, **offsets)
        key = "embedding.word_embeddings.weight" if key == "output_layer.weight" else key  # tied copy
        params.setdefault(key, []).append(p.detach().numpy().copy())
    return dict(
        weights=weights,
        steps=steps,
        params=params,
        shares=[(s.indices, s.mini_batch_sizes, [x.tokens.tolist() for x in s.samples]) for s in shares],
        dp_rank=parallel_state.get_data_parallel_rank(),
        first_stage=bool(module.pre_process),
    )


def _full(results: list[dict]) -> dict[str, np.ndarray]:
    """Every parameter by TP=PP=EP=1 name; copies (DP replicas, tied embedding/output) must agree."""
    full: dict[str, np.ndarray] = {}
    for result in results:
        for key, arrays in result["params"].items():
            for arr in arrays:
                if key in full:
                    assert np.abs(full[key] - arr).max() <= TOL, f"copies of {key} differ"
                else:
                    full[key] = arr
    return full


@pytest.fixture(scope="module")
def reference() -> dict[bool, dict]:
    """DP1, one process: dense and MoE, with the full weights each drew and its updated parameters."""
    out = {}
    for moe in (False, True):
        result = run_on_ranks(_run, world_size=1, args=({}, moe, None))[0]
        result["full"] = _full([result])
        out[moe] = result
    return out


def test_reference_moves_weights_and_is_off_policy(reference: dict[bool, dict]) -> None:
    for moe in (False, True):
        ref = reference[moe]
        metrics = ref["steps"][0]["metrics"]
        assert metrics["skipped_steps"] == 0 and np.isfinite(metrics["grad_norm"])
        assert metrics["log_ratio/abs_mean"] > 1e-4  # mini-batch 1 saw the updated policy
        before, after = ref["weights"], ref["full"]
        assert set(before) == set(after)
        assert max(np.abs(after[k] - before[k]).max() for k in before) > 1e-3
        # DP1 feeds every sample once to the π_old pass and once to the updates
        for samples, step in zip(_steps(), ref["steps"]):
            assert step["tokens"] == 2 * sum(s.seq_len for s in samples)


LAYOUTS = {
    "dp2": (2, dict(), False),
    "dp2_ep2_moe": (2, dict(ep=2), True),
    "dp2_pp2": (4, dict(pp=2), False),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_scattered_step_matches_single_process(layout: str, reference: dict[bool, dict]) -> None:
    world_size, parallel, moe = LAYOUTS[layout]
    ref = reference[moe]
    results = run_on_ranks(_run, world_size=world_size, args=(parallel, moe, ref["weights"]), timeout=600)
    dp_size = 2
    assert sorted({r["dp_rank"] for r in results}) == list(range(dp_size))
    steps = _steps()
    for s, samples in enumerate(steps):
        n = len(samples)
        # shares: disjoint, covering, identical within a model-parallel group, holding the real samples
        by_dp: dict[int, tuple] = {}
        for r in results:
            indices, sizes, tokens = r["shares"][s]
            assert len(indices) == len(tokens) == sum(sizes) and len(sizes) == MINI_BATCHES
            assert tokens == [samples[i].tokens.tolist() for i in indices]
            assert by_dp.setdefault(r["dp_rank"], (indices, sizes)) == (indices, sizes)
        covered = sorted(i for indices, _ in by_dp.values() for i in indices)
        assert covered == list(range(n))
        if n < 2 * dp_size:  # the 3-sample step: some rank has no sample in a mini-batch
            assert any(0 in sizes for _, sizes in by_dp.values())

        # work: each DP rank's model sees its share only; together they see what DP1 saw
        ref_step = ref["steps"][s]
        firsts = [r for r in results if r["first_stage"]]
        assert len(firsts) == dp_size
        half = (n + 1) // 2
        mini = [range(half), range(half, n)]  # DP1's global mini-batches: contiguous, sizes differ ≤ 1
        for r in firsts:
            indices = r["shares"][s][0]
            assert r["steps"][s]["tokens"] == 2 * sum(samples[i].seq_len for i in indices)
            for k, mb in enumerate(mini):
                lens = [samples[i].seq_len for i in mb]
                bound = sum(lens) / dp_size + max(lens)
                assert r["steps"][s]["per_mini_batch"][k] <= bound, (s, k)
                assert (
                    sum(f["steps"][s]["per_mini_batch"][k] for f in firsts) == ref_step["per_mini_batch"][k]
                )
        assert sum(r["steps"][s]["tokens"] for r in firsts) == ref_step["tokens"]
        shares = [r["steps"][s]["tokens"] / ref_step["tokens"] for r in firsts]
        print(f"{layout} step {s}: token share per DP rank {[round(x, 3) for x in shares]}")

        # numbers: gathered π_old on rank 0 only, metrics on every rank
        assert all(r["steps"][s]["old"] is None for r in results[1:])
        old = results[0]["steps"][s]["old"]
        assert len(old) == n
        worst_old = max(float(np.abs(old[i] - ref_step["old"][i]).max()) for i in range(n))
        print(f"{layout} step {s}: max |old logprob - DP1| = {worst_old:.2e}")
        assert worst_old <= (TOL if s == 0 else TOL_AFTER_UPDATE), s
        for r in results:
            got, want = r["steps"][s]["metrics"], ref_step["metrics"]
            for key in ["loss", *(f"loss/mini_batch_{k}" for k in range(MINI_BATCHES))]:
                assert abs(got[key] - want[key]) <= TOL, (s, key)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
            assert got["skipped_steps"] == 0

    full = _full(results)
    assert set(full) == set(ref["full"])
    diffs = {k: float(np.abs(full[k] - ref["full"][k]).max()) for k in full}
    worst = max(diffs, key=diffs.get)
    print(f"{layout}: max |param - DP1| = {diffs[worst]:.2e} ({worst})")
    assert diffs[worst] <= TOL, worst


def _errors(rank: int, world_size: int) -> dict:
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.testing import build_tiny_gpt, init_megatron_cpu, randomize_weights
    from megatron_sapo.rollout.types import PolicyDiverged
    from megatron_sapo.train.loop import _update_policy

    init_megatron_cpu()

    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        model = build_tiny_gpt(_config(False), vocab_size=VOCAB)
        randomize_weights(model, WEIGHT_SEED)
        return model

    engine = PolicyEngine(provide, OptimConfig(lr=1e-2), LossConfig(mini_batches=MINI_BATCHES))
    samples = _steps()[0]
    out = {}
    try:  # fewer samples than mini-batches on rank 0: every rank raises instead of waiting for a share
        engine.scatter(samples[:1] if rank == 0 else None)
    except ValueError as exc:
        out["too_few"] = str(exc)
    if rank == 1:  # a non-finite log-prob on rank 1's share only: rank 0 finds it, every rank stops
        compute, scatter = engine.compute_logprobs, engine.scatter
        engine.compute_logprobs = lambda s: [x.fill_(float("nan")) for x in compute(s)]
        engine.scatter = lambda s: out.setdefault("share", scatter(s))
    before = [p.detach().clone() for p in engine.model[0].parameters()]
    try:
        _update_policy(engine, samples if rank == 0 else None)
    except PolicyDiverged as exc:
        out["diverged"] = str(exc)
    out["moved"] = max(
        float((p.detach() - b).abs().max()) for p, b in zip(engine.model[0].parameters(), before)
    )
    return out


def test_errors_stop_every_rank() -> None:
    results = run_on_ranks(_errors, world_size=2)
    poisoned = results[1]["share"].indices
    assert 0 < len(poisoned) < 16
    for r in results:
        assert r["too_few"] == "cannot split 1 samples into 2 mini-batches"
        assert r["diverged"] == (
            f"policy diverged: the trainer's log-probs of {len(poisoned)} of 16 rollout samples are not "
            f"finite (first: sample {min(poisoned)})"
        )
        assert r["moved"] == 0.0  # stopped before any update, on both ranks
