"""Qwen3-VL policies at TP2 (dense), PP2 (vision tower and deepstack on stage 0) and EP2 (MoE) vs transformers.

Two gloo ranks each build their part of `megatron/vlm.py`'s `Qwen3VLModel`, load their slices of the
transformers weights through the bridge, and run one image+text batch (three images of different sizes
over two prompts) and one text-only prompt; the gathered logits equal transformers' fp32 logits.
At PP2 stage 0 sends its hidden states to stage 1 by hand (the model level; the engine's schedules are
tested with the train step).

    python -m pytest tests/distributed/test_vlm_parallel.py -q
"""

from __future__ import annotations

import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks

LOGIT_TOL = 1e-4  # fp32 both sides

# name -> (moe, parallel sizes, config overrides)
CASES = {
    "dense-tp2": (False, dict(tp=2), {}),
    "dense-pp2": (False, dict(pp=2), dict(num_layers=6)),  # 3 layers per stage: deepstack's 3 on stage 0
    "moe-ep2": (True, dict(ep=2), {}),
}


def _inputs(config, processor):
    from megatron_sapo.megatron.mrope import rope_index
    from tests.vlm_reference import image_batch, mrope_positions, mrope_tokens

    enc = image_batch(processor)
    text = processor.tokenizer(["what is 3 + 4"], return_tensors="pt")["input_ids"]
    return enc, mrope_positions(enc, config), text, rope_index(text[0], None, *mrope_tokens(config))[:, None]


def _rank_fn(rank: int, world_size: int, case: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_sapo.bridge import load_hf_weights
    from megatron_sapo.megatron.cpu import causal_attention_mask
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu
    from megatron_sapo.utils.tiny_vlm import build_processor, train_vlm_tokenizer
    from tests.vlm_reference import hf_vlm

    moe, sizes, overrides = CASES[case]
    init_megatron_cpu(**sizes)
    processor = build_processor(train_vlm_tokenizer())
    config, hf = hf_vlm(moe, processor, seed=2, **overrides)
    model = build_gpt_model(config).eval()
    load_hf_weights(model, config, hf.state_dict())
    enc, positions, text, text_positions = _inputs(config, processor)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    outputs = []
    with torch.no_grad():
        for ids, pos, extra in (
            (
                enc["input_ids"],
                positions,
                dict(pixel_values=enc["pixel_values"], image_grid_thw=enc["image_grid_thw"]),
            ),
            (text, text_positions, {}),
        ):
            b, t = ids.shape
            if pp > 1 and pp_rank == 1:
                hidden = torch.empty(t, b, config.text_config.hidden_size)
                dist.recv(hidden, src=0)
                model.set_input_tensor(hidden)
            out = model(ids, pos, causal_attention_mask(t, b), **(extra if pp_rank == 0 else {}))
            if pp > 1 and pp_rank == 0:
                dist.send(out.contiguous(), dst=1)
            outputs.append(out)
    return dict(
        logits=outputs,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        last=parallel_state.is_pipeline_last_stage(),
        has_vision=hasattr(model, "vision"),
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case: str) -> None:
    from megatron_sapo.utils.tiny_vlm import build_processor, train_vlm_tokenizer
    from tests.vlm_reference import hf_vlm

    moe, sizes, overrides = CASES[case]
    results = run_on_ranks(_rank_fn, world_size=2, args=(case,))
    processor = build_processor(train_vlm_tokenizer())
    config, hf = hf_vlm(moe, processor, seed=2, **overrides)
    enc, _, text, _ = _inputs(config, processor)
    with torch.no_grad():
        expected = [hf(**enc).logits, hf(input_ids=text, mm_token_type_ids=torch.zeros_like(text)).logits]
    vocab = config.text_config.vocab_size
    tp = sizes.get("tp", 1)
    if tp > 1:  # vocab-parallel: concatenate the TP ranks' columns
        ranks = sorted(results, key=lambda r: r["tp_rank"])
        got = [torch.cat([r["logits"][i] for r in ranks], dim=-1) for i in range(2)]
    else:
        got = next(r for r in results if r["last"])["logits"]
    if sizes.get("pp", 1) > 1:  # the vision tower lives on stage 0 only
        assert [r["has_vision"] for r in results] == [True, False]
    real = enc["attention_mask"].bool()
    err_image = (got[0][..., :vocab][real] - expected[0][real]).abs().max().item()
    err_text = (got[1][..., :vocab] - expected[1]).abs().max().item()
    assert err_image <= LOGIT_TOL and err_text <= LOGIT_TOL, f"{case}: {err_image:.2e} / {err_text:.2e}"
    if sizes.get("ep", 1) > 1:  # both EP ranks see the whole batch and must agree
        torch.testing.assert_close(results[0]["logits"][0], results[1]["logits"][0], rtol=0, atol=LOGIT_TOL)


def _bad_stage_fn(rank: int, world_size: int) -> str:
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu
    from megatron_sapo.utils.tiny_vlm import tiny_vlm_config

    init_megatron_cpu(pp=2)
    try:
        build_gpt_model(tiny_vlm_config(num_layers=4))  # stage 0 holds layers 0-1, deepstack needs 0-2
    except ValueError as error:
        return str(error)
    return ""


def test_deepstack_layers_off_the_first_stage_are_refused() -> None:
    messages = run_on_ranks(_bad_stage_fn, world_size=2)
    assert all("first pipeline stage" in m for m in messages), messages
