"""The SAPO π_old pass and train step on image+text samples: every layout equals the single-process run.

Samples carry their images (`Sample.pixel_values`, `Sample.image_grid_thw`): two image prompts (one with
two images of different sizes) and two text-only prompts, each followed by a random response, 2
mini-batches (the second off-policy) under a token budget that splits them into several micro-batches.
Each layout (TP2 dense, PP2 dense with the vision tower and deepstack on stage 0, EP2 MoE, EP2 MoE with
routing replay R2; data parallelism and PP with R2 are layout-generic, tested on text in test_engine_layouts /
test_engine_routing_replay)
starts from the same transformers weights and must reproduce the world-size-1 run: π_old log-probs,
the loss, the grad norm and every updated weight (exported through the bridge to HF names, vision tower
included). The π_old log-probs of the reference are checked against transformers' own forward.

    python -m pytest tests/distributed/test_vlm_engine.py -q
"""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks

MINI_BATCHES, TOKEN_BUDGET, TOL = 2, 120, 2e-5
LAYOUTS = {  # name -> (world size, parallel sizes, moe, routing replay)
    "tp2": (2, dict(tp=2), False, "off"),
    "pp2": (2, dict(pp=2), False, "off"),
    "moe_ep2": (2, dict(ep=2), True, "off"),
    "moe_ep2_r2": (2, dict(ep=2), True, "r2"),
}


def _setup(moe: bool):
    from megatron_sapo.utils.tiny_vlm import build_processor, train_vlm_tokenizer
    from tests.vlm_reference import hf_vlm

    processor = build_processor(train_vlm_tokenizer())
    config, hf = hf_vlm(moe, processor, seed=3, num_layers=6)  # 6 layers: PP2 keeps deepstack on stage 0
    return processor, config, hf


def _samples(processor) -> list:
    from megatron_sapo.megatron.batching import Sample
    from tests.vlm_reference import images

    prompts = [
        (
            [{"type": "image"}, {"type": "text", "text": "what is 12 + 7"}, {"type": "image"}],
            [(32, 48), (64, 64)],
        ),
        ([{"type": "text", "text": "compute 5 + 3"}], []),
        ([{"type": "text", "text": "the sum of"}, {"type": "image"}], [(48, 96)]),
        ([{"type": "text", "text": "what is 1 plus 2"}], []),
    ]
    generator = torch.Generator().manual_seed(7)
    out = []
    for k, (parts, sizes) in enumerate(prompts):
        text = processor.apply_chat_template(
            [{"role": "user", "content": parts}], add_generation_prompt=True, tokenize=False
        )
        enc = processor(text=[text], images=images(sizes, seed=k) if sizes else None, return_tensors="pt")
        prompt = enc["input_ids"][0]
        response = torch.randint(
            1, 500, (int(torch.randint(3, 8, (1,), generator=generator)),), generator=generator
        )
        extra = dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]) if sizes else {}
        advantage = float(torch.randn((), generator=generator))
        out.append(
            Sample(torch.cat([prompt, response]), response_start=len(prompt), advantage=advantage, **extra)
        )
    return out


def _run(rank: int, world_size: int, layout: dict, moe: bool, replay: str = "off") -> dict:
    from megatron.core import parallel_state

    from megatron_sapo.bridge import export_hf_weights, load_hf_weights
    from megatron_sapo.megatron.batching import shard_for_data_parallel
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu

    init_megatron_cpu(**layout)
    processor, config, hf = _setup(moe)
    state = hf.state_dict()

    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        model = build_gpt_model(config, pre_process, post_process, vp_stage=vp_stage)
        load_hf_weights(model, config, state)
        return model

    # Adam divides by |g| + eps: near-zero gradient entries (lm_head rows of unseen tokens) turn fp32
    # reduction-order noise into update noise; eps 1e-4 keeps the comparison about the gradients (with
    # 1e-5, lm_head differed by 3e-5 at TP2 while the loss agreed to 1e-7 and the other weights to 7e-6).
    engine = PolicyEngine(
        provide,
        OptimConfig(lr=1e-2, weight_decay=0.01, clip_grad=1.0, adam_eps=1e-4),
        LossConfig(mini_batches=MINI_BATCHES, micro_batch_tokens=TOKEN_BUDGET, routing_replay=replay),
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    samples = _samples(processor)
    kw = dict(
        mini_batches=MINI_BATCHES,
        dp_rank=parallel_state.get_data_parallel_rank(),
        dp_size=parallel_state.get_data_parallel_world_size(),
    )
    local, index = (
        shard_for_data_parallel(samples, **kw),
        shard_for_data_parallel(list(range(len(samples))), **kw),
    )
    old = engine.compute_logprobs(local)
    metrics = engine.train_step(local, old)
    weights = {n: t.clone() for bucket in export_hf_weights(engine.model, config) for n, t in bucket}
    return dict(old=dict(zip(index, old)), metrics=metrics, weights=weights)


def _references(rank: int, world_size: int) -> dict[tuple[bool, str], dict]:
    # one process for the three single-process runs: each rebuilds the parallel state and its engine
    return {key: _run(rank, world_size, {}, *key) for key in ((False, "off"), (True, "off"), (True, "r2"))}


@pytest.fixture(scope="module")
def reference() -> dict[tuple[bool, str], dict]:
    return run_on_ranks(_references, world_size=1)[0]


@torch.no_grad()
def test_reference_logprobs_match_transformers_and_the_step_moves_vision(reference) -> None:
    for moe in (False, True):
        ref = reference[moe, "off"]
        processor, config, hf = _setup(moe)
        for i, s in enumerate(_samples(processor)):
            extra = {}
            if s.pixel_values is not None:
                extra = dict(pixel_values=s.pixel_values, image_grid_thw=s.image_grid_thw)
            ids = s.tokens[None, :-1]
            mm = (ids == config.image_token_id).int()
            logits = hf(input_ids=ids, mm_token_type_ids=mm, **extra).logits[0].float()
            logp = torch.log_softmax(logits, -1)[s.response_start - 1 :].gather(
                -1, s.tokens[s.response_start :, None]
            )
            err = (ref["old"][i] - logp[:, 0]).abs().max().item()
            assert err <= 1e-4, f"moe={moe} sample {i}: |π_old - transformers| {err:.2e}"
        before, after = hf.state_dict(), ref["weights"]
        moved = max((after[n] - before[n]).abs().max().item() for n in after if n.startswith("model.visual."))
        assert moved > 1e-4  # the images' gradient reached the vision tower


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_train_step_matches_single_process(layout: str, reference) -> None:
    world_size, parallel, moe, replay = LAYOUTS[layout]
    ref = reference[moe, replay]
    results = run_on_ranks(_run, world_size=world_size, args=(parallel, moe, replay))
    old = {i: x for r in results for i, x in r["old"].items()}
    assert sorted(old) == sorted(ref["old"])
    for i, x in old.items():
        assert (x - ref["old"][i]).abs().max().item() <= TOL, f"π_old of sample {i}"
    for r in results:
        assert abs(r["metrics"]["loss"] - ref["metrics"]["loss"]) <= TOL
        assert r["metrics"]["grad_norm"] == pytest.approx(ref["metrics"]["grad_norm"], rel=1e-5)
    weights = results[0]["weights"]  # export gathers the full tensors on global rank 0
    assert sorted(weights) == sorted(ref["weights"])
    diffs = {n: (weights[n] - ref["weights"][n]).abs().max().item() for n in weights}
    worst = max(diffs, key=diffs.get)
    assert diffs[worst] <= TOL, f"{layout}: {worst} differs by {diffs[worst]:.2e}"


def _r3(rank: int, world_size: int) -> dict:
    """Random `Sample.routing` on image+text samples: π_old under R3 vs a plain replayed forward."""
    from megatron_sapo.bridge import load_hf_weights
    from megatron_sapo.megatron.batching import collate
    from megatron_sapo.megatron.cpu import causal_attention_mask
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.routing_replay import RoutingReplay
    from megatron_sapo.megatron.testing import init_megatron_cpu

    init_megatron_cpu()
    processor, config, hf = _setup(True)
    state, text = hf.state_dict(), config.text_config
    generator = torch.Generator().manual_seed(9)
    samples = _samples(processor)
    for s in samples:  # what SGLang reports: one row per position the model reads
        ids = torch.rand(text.num_hidden_layers, s.seq_len, text.num_experts, generator=generator)
        s.routing = ids.argsort(-1)[..., : text.num_experts_per_tok].int()

    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        model = build_gpt_model(config, pre_process, post_process, vp_stage=vp_stage)
        load_hf_weights(model, config, state)
        return model

    engine = PolicyEngine(provide, OptimConfig(), LossConfig(mini_batches=2, routing_replay="r3"))
    logp = engine.compute_logprobs(samples)
    engine.train_step(samples, logp)  # the update passes replay the same ids (runs, finite)
    model = provide(True, True).eval()
    mrope = model.mrope_tokens
    reference, plain = [], []
    with RoutingReplay([model]) as replay, torch.no_grad():
        for s in samples:
            batch = collate([s], mrope=mrope)
            args = (batch.input_ids, batch.position_ids, causal_attention_mask(s.seq_len, 1))
            for mode, sink in (("replay", reference), ("off", plain)):
                replay.mode = mode
                replay.set_routing(s.routing)
                logits = model(*args, **batch.model_inputs())[0]
                lp = torch.log_softmax(logits.float(), -1).gather(-1, s.tokens[1:, None])[:, 0]
                sink.append(lp[s.response_start - 1 :])
    return dict(
        logp_err=max(float((a - b).abs().max()) for a, b in zip(logp, reference)),
        routing_matters=max(float((a - b).abs().max()) for a, b in zip(reference, plain)),
    )


def test_r3_replays_sample_routing_on_image_prompts() -> None:
    result = run_on_ranks(_r3, world_size=1)[0]
    assert result["routing_matters"] > 1e-3  # random experts change image+text log-probs ...
    assert result["logp_err"] <= 1e-5  # ... exactly as a plain replayed forward does
