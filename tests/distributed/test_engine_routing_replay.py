"""`PolicyEngine` with MoE routing replay (R2, R3) on a tiny megatron-core MoE (4 experts, top-2, 2 layers).

The experts a forward *used* are read from each router's returned routing map (forward hooks), matched to
samples through the model's input ids — never from the engine's own replay state. One single-process
run checks: R2 replays the π_old pass's experts in every update forward after large router noise (while
replay "off" reroutes) and the router still gets a gradient; with unperturbed weights R2 reproduces the
"off" first mini-batch loss and update (to fp32 rounding), and in the second mini-batch (router moved by the
first update) follows the recording; R3 uses `Sample.routing` in both passes and its log-probs equal a
plain model forward with `RoutingReplay` set to those ids, one sample at a time. Then EP=2 and PP=2
(2 ranks each; each rank records its own samples / its own stage's layers) with R2 must update the
parameters as the single-process run.

    python -m pytest tests/distributed/test_engine_routing_replay.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks

VOCAB, NUM_SAMPLES, MINI_BATCHES, TOKEN_BUDGET = 64, 8, 2, 40
EXPERTS, TOPK, MOE_LAYERS, WEIGHT_SEED = 4, 2, 2, 11
NOISE = 3.0  # router weights are ~N(0, 0.2^2): this reroutes most tokens
TOL = 1e-5
# R2's on-policy update equals "off"'s up to the order in which the CPU kernels sum the router gradient: bit-equal
# on one Intel machine, 1 ulp (<= 1.2e-7 on weights ~0.7) on an AMD EPYC. Rerouting moves weights by ~lr = 5e-2.
ROUNDING = 1e-6


def _samples() -> list:
    from megatron_sapo.megatron.testing import random_samples

    return random_samples(NUM_SAMPLES, vocab=VOCAB, seed=5)


def _provider(weights: dict[str, torch.Tensor]):
    from megatron_sapo.megatron.testing import build_tiny_gpt, load_full_weights, tiny_gpt_config

    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        model = build_tiny_gpt(tiny_gpt_config(num_moe_experts=EXPERTS), vocab_size=VOCAB)
        load_full_weights(model, weights, tp_rank=0, tp_size=1)
        return model

    return provide


def _engine(weights: dict[str, torch.Tensor], replay: str, lr: float = 1e-2):
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine

    return PolicyEngine(
        _provider(weights),
        # weight_decay 0: a router weight that moves got a gradient. Adam's g / (|g| + eps) turns fp32
        # rounding noise in near-zero gradient entries into update differences (see test_engine_layouts);
        # the router noise saturates some routing probabilities, making such entries common: eps 1e-3.
        OptimConfig(lr=lr, weight_decay=0.0, clip_grad=1.0, adam_eps=1e-3),
        LossConfig(mini_batches=MINI_BATCHES, micro_batch_tokens=TOKEN_BUDGET, routing_replay=replay),
    )


class _Observer:
    """Per forward: the input ids and, per MoE layer, the experts its router dispatched each token to."""

    def __init__(self, model: torch.nn.Module) -> None:
        from megatron.core.models.gpt import GPTModel
        from megatron.core.transformer.moe.router import TopKRouter

        self.forwards: list[dict] = []
        gpt = next(m for m in model.modules() if isinstance(m, GPTModel))
        self.handles = [gpt.register_forward_pre_hook(self._start)]
        self.handles += [
            m.register_forward_hook(self._route) for m in model.modules() if isinstance(m, TopKRouter)
        ]

    def _start(self, module, args) -> None:
        self.forwards.append(dict(input_ids=args[0].detach().clone(), experts=[]))

    def _route(self, module, inputs, output) -> None:
        routing_map = output[1]  # [T, E] bool
        assert bool((routing_map.sum(-1) == TOPK).all())
        self.forwards[-1]["experts"].append(routing_map.float().topk(TOPK, dim=-1).indices.sort(-1).values)

    def per_sample(self, samples: list) -> list[list[np.ndarray]]:
        """For each sample, every forward's `[L, S_i, k]` sorted experts of its positions, in call order."""
        out: list[list[np.ndarray]] = [[] for _ in samples]
        for fwd in self.forwards:
            ids = fwd["input_ids"]
            b = ids.shape[0]
            experts = torch.stack(fwd["experts"]).view(MOE_LAYERS, ids.shape[1], b, TOPK)  # token s*B + b
            for row in range(b):
                for i, s in enumerate(samples):
                    if s.seq_len <= ids.shape[1] and torch.equal(ids[row, : s.seq_len], s.tokens[:-1]):
                        out[i].append(experts[:, : s.seq_len, row].numpy())
        return out

    def reset(self) -> None:
        self.forwards.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _router_weights(engine) -> list[torch.nn.Parameter]:
    from megatron.core.transformer.moe.router import TopKRouter

    return [m.weight for m in engine.model[0].modules() if isinstance(m, TopKRouter)]


@torch.no_grad()
def _perturb_routers(engine) -> None:
    """Add noise seeded by global layer number, so pipeline stages perturb as the single process does."""
    from megatron.core.transformer.moe.router import TopKRouter

    for router in (m for m in engine.model[0].modules() if isinstance(m, TopKRouter)):
        generator = torch.Generator().manual_seed(99 + router.layer_number)
        router.weight.add_(NOISE * torch.randn(router.weight.shape, generator=generator))


def _full_params(engine) -> dict[str, np.ndarray]:
    from megatron_sapo.megatron.testing import full_name, shard_offsets

    module = engine.model[0].module
    offsets = shard_offsets(module)
    out = {full_name(n, **offsets): p.detach().numpy().copy() for n, p in module.named_parameters()}
    if "output_layer.weight" in out:  # the last pipeline stage's copy of the tied embedding
        out["embedding.word_embeddings.weight"] = out.pop("output_layer.weight")
    return out


def _fraction_different(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """Fraction of (layer, token) slots whose expert sets differ."""
    flags = np.concatenate([(x != y).any(-1).ravel() for x, y in zip(a, b)])
    return float(flags.mean())


def _r2_perturbed(weights: dict) -> dict:
    """Record in compute_logprobs, perturb routers, train: experts used vs recorded, R2 and off."""
    out = {}
    for replay in ("r2", "off"):
        engine = _engine(weights, replay)
        samples = _samples()
        observer = _Observer(engine.model[0])
        old = engine.compute_logprobs(samples)
        recorded = [obs[0] for obs in observer.per_sample(samples)]
        _perturb_routers(engine)
        before = [w.detach().clone() for w in _router_weights(engine)]
        observer.reset()
        engine.train_step(samples, old)
        used = observer.per_sample(samples)
        out[replay] = dict(
            one_forward_each=all(len(u) == 1 for u in used),
            different=_fraction_different(recorded, [u[0] for u in used]),
            router_grad=min(float(w.main_grad.norm()) for w in _router_weights(engine)),
            router_moved=min(
                float((w.detach() - b).abs().max()) for w, b in zip(_router_weights(engine), before)
            ),
            hooks_installed=any(
                getattr(m, "router_replay", None) is not None for m in engine.model[0].modules()
            ),
        )
    return out


def _snapshot_after_first_step(engine) -> list[dict[str, np.ndarray]]:
    """Parameters right after the first optimizer step (train_step steps the scheduler after each)."""
    snapshots: list[dict[str, np.ndarray]] = []
    step = engine.scheduler.step

    def snapshot_then_step(*args, **kwargs):
        if not snapshots:
            snapshots.append(_full_params(engine))
        return step(*args, **kwargs)

    engine.scheduler.step = snapshot_then_step
    return snapshots


def _r2_on_policy(weights: dict) -> dict:
    """Unperturbed weights: R2 vs off, first mini-batch loss and update; second mini-batch's experts."""
    out = {}
    for replay in ("r2", "off"):
        engine = _engine(weights, replay, lr=5e-2)
        samples = _samples()
        observer = _Observer(engine.model[0])
        old = engine.compute_logprobs(samples)
        recorded = [obs[0] for obs in observer.per_sample(samples)]
        observer.reset()
        after_first = _snapshot_after_first_step(engine)
        metrics = engine.train_step(samples, old)
        used = [u[0] for u in observer.per_sample(samples)]
        second = range(NUM_SAMPLES // MINI_BATCHES, NUM_SAMPLES)
        out[replay] = dict(
            loss0=metrics["loss/mini_batch_0"],
            params0=after_first[0],
            first_differs=_fraction_different(recorded[: second.start], used[: second.start]),
            second_differs=_fraction_different([recorded[i] for i in second], [used[i] for i in second]),
        )
    return out


def _r3(weights: dict) -> dict:
    """Random `Sample.routing`: used in both passes; log-probs vs a plain replayed forward per sample."""
    from megatron_sapo.megatron.cpu import causal_attention_mask
    from megatron_sapo.megatron.routing_replay import RoutingReplay

    generator = torch.Generator().manual_seed(7)
    samples = _samples()
    for k, s in enumerate(samples):
        # Rollout engines report L - 1 positions; half the samples carry an extra (ignored) last row.
        n = s.tokens.numel() - (k % 2 == 0)
        s.routing = torch.rand(MOE_LAYERS, n, EXPERTS, generator=generator).argsort(-1)[..., :TOPK].int()
    given = [s.routing[:, : s.seq_len].sort(-1).values.numpy() for s in samples]

    engine = _engine(weights, "r3")
    observer = _Observer(engine.model[0])
    logp = engine.compute_logprobs(samples)
    used_old = [u[0] for u in observer.per_sample(samples)]
    observer.reset()
    engine.train_step(samples, logp)
    used_update = [u[0] for u in observer.per_sample(samples)]
    observer.remove()

    model = _provider(weights)(True, True).eval()
    reference, plain = [], []
    with RoutingReplay([model]) as replay, torch.no_grad():
        for s in samples:
            inputs = s.tokens[:-1][None]
            args = (inputs, torch.arange(s.seq_len)[None], causal_attention_mask(s.seq_len, 1))
            for mode, sink in (("replay", reference), ("off", plain)):
                replay.mode = mode
                replay.set_routing(s.routing[:, : s.seq_len])  # B = 1: token index s*B + b = position
                logits = model(*args)[0]
                lp = torch.log_softmax(logits.float(), -1).gather(-1, s.tokens[1:, None])[:, 0]
                sink.append(lp[s.response_start - 1 :])
    return dict(
        used_old_equal=all(np.array_equal(u, g) for u, g in zip(used_old, given)),
        used_update_equal=all(np.array_equal(u, g) for u, g in zip(used_update, given)),
        logp_err=max(float((a - b).abs().max()) for a, b in zip(logp, reference)),
        routing_matters=max(float((a - b).abs().max()) for a, b in zip(reference, plain)),
    )


def _errors(weights: dict) -> dict:
    from megatron_sapo.megatron.batching import Sample
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.testing import build_tiny_gpt, tiny_gpt_config

    out = {}
    try:
        LossConfig(routing_replay="r4")
    except ValueError as e:
        out["bad_name"] = str(e)
    try:
        PolicyEngine(
            lambda pre, post, vp_stage=None: build_tiny_gpt(tiny_gpt_config(), vocab_size=VOCAB),
            OptimConfig(),
            LossConfig(routing_replay="r2"),
        )
    except ValueError as e:
        out["dense"] = str(e)
    try:
        Sample(torch.arange(1, 10), 3, 1.0, routing=torch.zeros(MOE_LAYERS, 7, TOPK, dtype=torch.long))
    except ValueError as e:
        out["short_routing"] = str(e)
    engine = _engine(weights, "r3")
    try:
        engine.compute_logprobs(_samples())
    except ValueError as e:
        out["r3_missing"] = str(e)
    return out


def _ep1_r2(weights: dict) -> dict[str, np.ndarray]:
    engine = _engine(weights, "r2")
    samples = _samples()
    old = engine.compute_logprobs(samples)
    _perturb_routers(engine)
    engine.train_step(samples, old)
    return _full_params(engine)


def _single(rank: int, world_size: int) -> dict:
    from megatron_sapo.megatron.testing import init_megatron_cpu, randomize_weights

    init_megatron_cpu()
    weights = randomize_weights(_fresh_model(), WEIGHT_SEED)
    return dict(
        weights={k: v.numpy() for k, v in weights.items()},
        r2_perturbed=_r2_perturbed(weights),
        r2_on_policy=_r2_on_policy(weights),
        r3=_r3(weights),
        errors=_errors(weights),
        ep1=_ep1_r2(weights),
    )


def _fresh_model() -> torch.nn.Module:
    from megatron_sapo.megatron.testing import build_tiny_gpt, tiny_gpt_config

    return build_tiny_gpt(tiny_gpt_config(num_moe_experts=EXPERTS), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def single() -> dict:
    return run_on_ranks(_single, world_size=1)[0]


def test_r2_replays_old_pass_experts_after_router_moved(single: dict) -> None:
    r2, off = single["r2_perturbed"]["r2"], single["r2_perturbed"]["off"]
    assert r2["one_forward_each"] and off["one_forward_each"]  # train_step regrouped, no extra pass
    assert off["different"] > 0.3  # the noise does reroute without replay ...
    assert r2["different"] == 0.0  # ... and R2 keeps every token's experts
    assert r2["router_grad"] > 1e-4 and r2["router_moved"] > 1e-4  # the router keeps learning
    assert r2["hooks_installed"] and not off["hooks_installed"]  # "off" leaves megatron untouched


def test_r2_is_a_no_op_on_policy_and_follows_the_recording_later(single: dict) -> None:
    r2, off = single["r2_on_policy"]["r2"], single["r2_on_policy"]["off"]
    assert r2["loss0"] == pytest.approx(off["loss0"], rel=ROUNDING)
    assert set(r2["params0"]) == set(off["params0"])
    diffs = {k: float(np.abs(r2["params0"][k] - off["params0"][k]).max()) for k in r2["params0"]}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= ROUNDING, (worst, diffs[worst])
    assert r2["first_differs"] == 0.0 and off["first_differs"] == 0.0
    assert off["second_differs"] > 0.0  # the first update moved some tokens to other experts ...
    assert r2["second_differs"] == 0.0  # ... which R2 does not follow


def test_r3_uses_sample_routing_in_both_passes(single: dict) -> None:
    r3 = single["r3"]
    assert r3["used_old_equal"] and r3["used_update_equal"]
    assert r3["routing_matters"] > 1e-3  # random experts change the log-probs ...
    assert r3["logp_err"] <= 1e-5  # ... exactly as a plain replayed forward does


def test_errors_name_the_problem(single: dict) -> None:
    errors = single["errors"]
    assert "routing_replay" in errors["bad_name"] and "'r4'" in errors["bad_name"]
    assert "MoE" in errors["dense"]
    assert "routing must be" in errors["short_routing"]
    assert "Sample.routing" in errors["r3_missing"]


def _parallel_r2(rank: int, world_size: int, layout: dict, weights: dict) -> list:
    from megatron.core import parallel_state

    from megatron_sapo.megatron.batching import shard_for_data_parallel
    from megatron_sapo.megatron.testing import init_megatron_cpu

    init_megatron_cpu(**layout)
    engine = _engine({k: torch.from_numpy(v) for k, v in weights.items()}, "r2")
    kw = dict(
        mini_batches=MINI_BATCHES,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )
    samples = shard_for_data_parallel(_samples(), **kw)
    old = engine.compute_logprobs(samples)
    _perturb_routers(engine)
    engine.train_step(samples, old)
    return _full_params(engine)


@pytest.mark.parametrize("layout", [dict(ep=2), dict(pp=2)], ids=["ep2", "pp2"])
def test_r2_update_matches_single_process(single: dict, layout: dict) -> None:
    results = run_on_ranks(_parallel_r2, world_size=2, args=(layout, single["weights"]))
    merged: dict[str, np.ndarray] = {}
    for params in results:
        for key, value in params.items():
            if key in merged:  # replicated across ranks (router, attention, tied embedding): must agree
                assert np.abs(merged[key] - value).max() <= TOL, key
            merged[key] = value
    assert set(merged) == set(single["ep1"])
    diffs = {k: float(np.abs(merged[k] - single["ep1"][k]).max()) for k in merged}
    worst = max(diffs, key=diffs.get)
    print(f"{layout}: max |param - ref| = {diffs[worst]:.2e} ({worst})")
    assert diffs[worst] <= TOL, (worst, diffs[worst])
