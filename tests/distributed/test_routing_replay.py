"""MoE routing replay (R2/R3) on a real megatron-core MoE (4 experts, top-2, 2 layers) under gloo.

One single-process run records / replays routing on a tiny GPT and on a lone MoE layer; the tests assert
on what it returns: replayed experts survive large router-weight noise (and do not without replay),
replaying unchanged weights reproduces the logits, externally supplied (R3) experts are used, and the
MoE layer's output and router gradient under replay equal a hand-written MoE forward at the same
indices. Then EP=2 (2 ranks) replays the EP=1 recording and must match the EP=1 replayed logits.
The experts a router *used* are read from its returned routing map (a forward hook), not from the
replay object.

    python -m pytest tests/distributed/test_routing_replay.py -q
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks

VOCAB, BATCH, SEQ, WEIGHT_SEED, TOPK, EXPERTS = 64, 2, 8, 11, 2, 4
NOISE = 3.0  # router weights are ~N(0, 0.2^2): this reshuffles most tokens' experts


def _batch(seed: int) -> dict[str, torch.Tensor]:
    from megatron_sapo.megatron.cpu import causal_attention_mask

    generator = torch.Generator().manual_seed(seed)
    return dict(
        input_ids=torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator),
        position_ids=torch.arange(SEQ).expand(BATCH, SEQ),
        attention_mask=causal_attention_mask(SEQ, BATCH),
    )


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"], batch["position_ids"], batch["attention_mask"])


def _used_experts(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, np.ndarray]:
    """Logits and the experts each router dispatched to, `[L, S*B, k]` sorted, from its routing map."""
    from megatron.core.transformer.moe.router import TopKRouter

    maps: list[torch.Tensor] = []
    handles = [
        m.register_forward_hook(lambda mod, inp, out: maps.append(out[1]))
        for m in model.modules()
        if isinstance(m, TopKRouter)
    ]
    try:
        logits = _logits(model, batch)
    finally:
        for h in handles:
            h.remove()
    routing_map = torch.stack(maps)  # [L, T, E] bool
    assert bool((routing_map.sum(-1) == TOPK).all())
    experts = routing_map.float().topk(TOPK, dim=-1).indices.sort(dim=-1).values
    return logits, experts.numpy()


def _sorted(routing: torch.Tensor) -> np.ndarray:
    return routing.sort(dim=-1).values.numpy()


def _rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    """Max abs error relative to the reference's largest entry (grads here are O(10): fp32 sums differ)."""
    return float((value - reference).abs().max() / reference.abs().max())


def _moe_layer_case(score_function: str, pre_softmax: bool) -> dict[str, float]:
    """Lone MoE layer, replayed indices: output and grads vs a hand-written MoE at those indices."""
    from megatron_sapo.megatron.routing_replay import RoutingReplay
    from megatron_sapo.megatron.testing import build_tiny_gpt, randomize_weights, tiny_gpt_config

    config = tiny_gpt_config(
        num_moe_experts=EXPERTS, moe_router_score_function=score_function, moe_router_pre_softmax=pre_softmax
    )
    model = build_tiny_gpt(config, vocab_size=VOCAB)
    randomize_weights(model, WEIGHT_SEED + 1)
    layer = model.decoder.layers[0].mlp.train()
    generator = torch.Generator().manual_seed(5)
    num_tokens, hidden = SEQ * BATCH, config.hidden_size
    x = torch.randn(SEQ, BATCH, hidden, generator=generator, requires_grad=True)
    indices = torch.rand(num_tokens, EXPERTS, generator=generator).argsort(dim=-1)[:, :TOPK]
    weight_out = torch.randn(SEQ, BATCH, hidden, generator=generator)

    with RoutingReplay([model]) as replay:
        replay.mode = "replay"
        replay.set_routing(torch.stack([indices, indices]))  # layer 0 is the one called
        out, _ = layer(x)
        (out * weight_out).sum().backward()

    # Reference: same weights, same indices, plain torch.
    w_router = layer.router.weight.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    tokens = x_ref.reshape(num_tokens, hidden)  # token s * B + b, as megatron flattens [S, B, H]
    logits = tokens @ w_router.T
    if score_function == "sigmoid":
        scores = torch.sigmoid(logits).gather(1, indices)
        probs = scores / scores.sum(-1, keepdim=True)
    elif pre_softmax:
        probs = torch.softmax(logits, dim=-1).gather(1, indices)
    else:
        probs = torch.softmax(logits.gather(1, indices), dim=-1)
    expert_outs = []
    for expert in layer.experts.local_experts:
        gate, up = (tokens @ expert.linear_fc1.weight.detach().T).chunk(2, dim=-1)
        expert_outs.append((torch.nn.functional.silu(gate) * up) @ expert.linear_fc2.weight.detach().T)
    chosen = torch.stack(expert_outs, dim=1)[torch.arange(num_tokens)[:, None], indices]  # [T, k, H]
    ref = (probs[..., None] * chosen).sum(1).view(SEQ, BATCH, hidden)
    (ref * weight_out).sum().backward()
    return dict(
        out_err=float((out.detach() - ref.detach()).abs().max()),
        router_grad_norm=float(layer.router.weight.grad.norm()),
        router_grad_rel_err=_rel_err(layer.router.weight.grad, w_router.grad),
        input_grad_rel_err=_rel_err(x.grad, x_ref.grad),
    )


def _single(rank: int, world_size: int) -> dict:
    from megatron_sapo.megatron.routing_replay import RoutingReplay
    from megatron_sapo.megatron.testing import (
        build_tiny_gpt,
        init_megatron_cpu,
        randomize_weights,
        tiny_gpt_config,
    )

    init_megatron_cpu()
    model = build_tiny_gpt(tiny_gpt_config(num_moe_experts=EXPERTS), vocab_size=VOCAB).eval()
    randomize_weights(model, WEIGHT_SEED)
    batches = [_batch(200), _batch(201)]
    out: dict = {}

    replay = RoutingReplay([model]).attach()
    logits_off, used_off = _used_experts(model, batches[0])
    replay.mode = "record"
    logits_rec, used_rec = _used_experts(model, batches[0])
    assert (used_rec == used_off).all()
    recorded = [replay.pop_recorded()]
    _logits(model, batches[1])
    recorded.append(replay.pop_recorded())  # [L, S*B, k] per batch
    out.update(
        record_changes_logits=float((logits_rec - logits_off).abs().max()),
        record_matches_used=bool((_sorted(recorded[0]) == used_rec).all()),
        recorded=[r.numpy() for r in recorded],
    )

    replay.mode = "replay"
    replay.set_routing(recorded[0])
    out["replay_same_weights_err"] = float((_logits(model, batches[0]) - logits_off).abs().max())

    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for router in replay.routers:
            router.weight.add_(NOISE * torch.randn(router.weight.shape, generator=generator))
    replay.mode = "off"
    _, used_perturbed_off = _used_experts(model, batches[0])
    replay.mode = "record"
    _logits(model, batches[0])
    recorded_perturbed = [replay.pop_recorded()]
    _logits(model, batches[1])
    recorded_perturbed.append(replay.pop_recorded())
    replay.mode = "replay"
    replay_logits = []
    for batch, routing in zip(batches, recorded):
        replay.set_routing(routing)
        logits, used = _used_experts(model, batch)
        replay_logits.append(logits.numpy())
    out.update(
        changed_without_replay=float((used_perturbed_off != used_off).any(-1).mean()),
        replay_keeps_experts=bool((used == _sorted(recorded[1])).all()),
        perturbed_replay_logit_change=float((torch.from_numpy(replay_logits[0]) - logits_off).abs().max()),
        replay_logits=replay_logits,
        recorded_perturbed=[r.numpy() for r in recorded_perturbed],
    )

    # R3: expert ids from elsewhere (here: random, as a rollout engine would send them).
    external = torch.rand(2, SEQ * BATCH, EXPERTS, generator=generator).argsort(dim=-1)[..., :TOPK]
    replay.set_routing(list(external.to(torch.int32)))  # per-layer tensors, engine-style int32
    _, used_external = _used_experts(model, batches[0])
    out["external_used"] = bool((used_external == _sorted(external)).all())

    replay.set_routing(external[:, : SEQ * BATCH - 1])  # one token short: must fail, not broadcast
    try:
        _logits(model, batches[0])
        out["wrong_token_count_raises"] = False
    except ValueError:
        out["wrong_token_count_raises"] = True

    replay.detach()
    _, used_after_detach = _used_experts(model, batches[0])
    out["detached"] = all(r.router_replay is None for r in replay.routers) and bool(
        (used_after_detach == used_perturbed_off).all()
    )
    out["weights"] = {n: p.detach().numpy().copy() for n, p in model.named_parameters()}
    out["moe_layer"] = {
        f"{score}{'_pre' if pre else ''}": _moe_layer_case(score, pre)
        for score, pre in (("softmax", False), ("softmax", True), ("sigmoid", False))
    }
    return out


@pytest.fixture(scope="module")
def single() -> dict:
    return run_on_ranks(_single, world_size=1)[0]


def test_recording_is_passive_and_replay_reproduces_logits(single: dict) -> None:
    assert single["record_changes_logits"] == 0.0
    assert single["record_matches_used"]
    assert single["replay_same_weights_err"] <= 1e-6


def test_replay_keeps_experts_under_router_noise(single: dict) -> None:
    assert single["changed_without_replay"] > 0.3  # the perturbation does reroute without replay
    assert single["replay_keeps_experts"]
    assert single["perturbed_replay_logit_change"] > 1e-3  # ... and acts through the probabilities
    assert not np.array_equal(single["recorded"][0], single["recorded_perturbed"][0])


def test_external_routing_is_used_r3(single: dict) -> None:
    assert single["external_used"]


def test_detach_restores_megatron_routing_and_shapes_are_checked(single: dict) -> None:
    assert single["detached"]
    assert single["wrong_token_count_raises"]


@pytest.mark.parametrize("case", ["softmax", "softmax_pre", "sigmoid"])
def test_moe_layer_output_and_router_grad_match_hand_written_moe(single: dict, case: str) -> None:
    result = single["moe_layer"][case]
    assert result["router_grad_norm"] > 1e-3
    assert result["out_err"] <= 1e-6
    assert result["router_grad_rel_err"] <= 1e-6
    assert result["input_grad_rel_err"] <= 1e-6


def _ep2(rank: int, world_size: int, weights: dict, recorded: list, recorded_perturbed: list) -> dict:
    from megatron_sapo.megatron.routing_replay import RoutingReplay
    from megatron_sapo.megatron.testing import (
        build_tiny_gpt,
        init_megatron_cpu,
        load_full_weights,
        tiny_gpt_config,
    )

    init_megatron_cpu(ep=2)
    model = build_tiny_gpt(tiny_gpt_config(num_moe_experts=EXPERTS), vocab_size=VOCAB).eval()
    load_full_weights(model, {k: torch.from_numpy(v) for k, v in weights.items()}, tp_rank=0, tp_size=1)
    batch = _batch(200 + rank)  # each rank its own tokens; they cross ranks in the alltoall dispatch
    with RoutingReplay([model]) as replay:
        replay.mode = "record"
        _logits(model, batch)
        record_matches = bool((replay.pop_recorded().numpy() == recorded_perturbed[rank]).all())
        replay.mode = "replay"
        replay.set_routing(torch.from_numpy(recorded[rank]))
        return dict(logits=_logits(model, batch).numpy(), record_matches=record_matches)


def test_ep2_replay_matches_ep1_replay(single: dict) -> None:
    args = (single["weights"], single["recorded"], single["recorded_perturbed"])
    results = run_on_ranks(_ep2, world_size=2, args=args)
    for rank, result in enumerate(results):
        assert result["record_matches"]
        assert np.abs(result["logits"] - single["replay_logits"][rank]).max() <= 1e-5
