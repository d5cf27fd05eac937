"""The in-process transformers rollout engine against independent references.

Log-probs are checked against a teacher-forced transformers forward on prompt + response, greedy output
against `model.generate`, routing against the router logits of that forward, weight updates against the
model whose `save_pretrained` files (per-expert checkpoint names) were loaded. Tiny random models.

    python -m pytest tests/unit/test_hf_engine.py -q
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megatron_sapo.rollout.hf_engine import TransformersEngine
from megatron_sapo.rollout.types import PolicyDiverged, RolloutError, SamplingParams
from tests.hf_reference import (
    checkpoint_state_dict,
    llama_config,
    qwen2_moe_config,
    qwen3_config,
    qwen3_moe_config,
    tiny_hf_model,
)

PROMPTS = [[5, 9, 17], [40, 41, 42, 43, 44, 45, 46], [7] * 2 + list(range(60, 70))]
CORPUS = ["the quick brown fox jumps over the lazy dog", "a policy samples tokens and a reward scores them"]


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        CORPUS, trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"])
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    configs = {
        "dense": qwen3_config,
        "moe": qwen3_moe_config,
        "qwen2_moe": qwen2_moe_config,
        "llama": llama_config,
    }
    config = configs[kind]()
    return tiny_hf_model(config, seed=seed)


@torch.no_grad()
def teacher_forced(model, prompt_ids, token_ids, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) of each response token from one unpadded forward, [R] fp32."""
    ids = torch.tensor([list(prompt_ids) + list(token_ids)])
    logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logp.gather(-1, torch.tensor(token_ids)[:, None]).squeeze(-1)


def greedy_reference(model, prompt_ids, max_new_tokens: int) -> list[int]:
    out = model.generate(
        torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None
    )
    return out[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_logprobs_match_teacher_forcing_in_padded_batches(kind):
    model = build(kind)
    # max_batch_size 4 mixes prompts of lengths 3 / 7 / 12 in one left-padded batch.
    engine = TransformersEngine(copy.deepcopy(model), max_batch_size=4)
    sampling = SamplingParams(max_new_tokens=10, temperature=0.8, seed=3)
    gens = engine.generate(PROMPTS, sampling, n=3)
    assert [(g.prompt_index, g.sample_index) for g in gens] == [(i, j) for i in range(3) for j in range(3)]
    for g in gens:
        assert g.prompt_ids == PROMPTS[g.prompt_index]
        assert len(g.token_ids) == len(g.logprobs) == 10 and g.finish_reason == "length"
        ref = teacher_forced(model, g.prompt_ids, g.token_ids, 0.8)
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=1e-5, rtol=0)
    assert len({tuple(g.token_ids) for g in gens}) > 3  # n samples are drawn independently


def test_top_p_top_k_report_full_distribution_logprobs():
    model = build("dense")
    engine = TransformersEngine(copy.deepcopy(model))
    sampling = SamplingParams(max_new_tokens=6, temperature=1.3, top_p=0.5, top_k=5, seed=1)
    for g in engine.generate(PROMPTS[:2], sampling, n=2):
        ref = teacher_forced(model, g.prompt_ids, g.token_ids, 1.3)
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=1e-5, rtol=0)
        # Every drawn token lies in the top-5 of the full distribution.
        ids = torch.tensor([g.prompt_ids + g.token_ids])
        logits = model(ids).logits[0, len(g.prompt_ids) - 1 : -1]
        top5 = logits.topk(5, dim=-1).indices
        assert all(t in row for t, row in zip(g.token_ids, top5.tolist()))


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_greedy_matches_generate(kind):
    model = build(kind)
    engine = TransformersEngine(copy.deepcopy(model), max_batch_size=8)
    gens = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0.0))
    for g in gens:
        assert g.token_ids == greedy_reference(model, g.prompt_ids, 8)
        ref = teacher_forced(model, g.prompt_ids, g.token_ids, 0.0)  # raw logits when greedy
        torch.testing.assert_close(torch.tensor(g.logprobs), ref, atol=1e-5, rtol=0)


def test_eos_and_stop_token_ids_end_a_sample_inclusively():
    model = build("dense")
    engine = TransformersEngine(copy.deepcopy(model))
    greedy = greedy_reference(model, PROMPTS[0], 8)
    k = max(i for i, t in enumerate(greedy[:6]) if greedy.index(t) == i)  # a token first seen at position k
    stop = engine.generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0, stop_token_ids=[greedy[k]])
    )
    assert stop[0].token_ids == greedy[: k + 1] and stop[0].finish_reason == "stop"
    assert len(stop[0].logprobs) == k + 1

    engine.model.generation_config.eos_token_id = greedy[0]
    eos = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0))[0]
    assert eos.token_ids == greedy[:1] and eos.finish_reason == "stop"
    length = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=4, temperature=0))[0]
    assert len(length.token_ids) == 4 and length.finish_reason == "length"


def test_stop_strings_and_text():
    tok = tokenizer()
    model = build("dense")
    engine = TransformersEngine(copy.deepcopy(model), tokenizer=tok)
    prompt = "the lazy fox"
    ids = tok(prompt)["input_ids"]
    greedy = greedy_reference(model, ids, 10)
    plain = engine.generate([prompt], SamplingParams(max_new_tokens=10, temperature=0))[0]
    assert plain.prompt_ids == ids and plain.token_ids == greedy
    assert plain.text == tok.decode(greedy, skip_special_tokens=True)

    pieces = [tok.decode([t]) for t in greedy]
    k = next(i for i in range(3, 10) if pieces[i].strip() and pieces[i] not in tok.decode(greedy[:i]))
    stop_str = pieces[k]
    g = engine.generate(
        [prompt], SamplingParams(max_new_tokens=10, temperature=0, stop=["zzz-never", stop_str])
    )[0]
    # Tokens run through the one completing the stop string (SGLang's output_ids); the text stops before it.
    assert g.finish_reason == "stop" and g.token_ids == greedy[: k + 1]
    full = tok.decode(greedy[: k + 1], skip_special_tokens=True)
    assert g.text == full[: full.index(stop_str)] and stop_str not in g.text


def test_seeds():
    model = build("dense")
    a = TransformersEngine(copy.deepcopy(model), max_batch_size=2)
    b = TransformersEngine(copy.deepcopy(model), max_batch_size=32)
    sampling = SamplingParams(max_new_tokens=8, seed=11)
    first = [g.token_ids for g in a.generate(PROMPTS, sampling, n=2)]
    # Same seed, different batching: same samples.
    assert [g.token_ids for g in b.generate(PROMPTS, sampling, n=2)] == first
    other = [g.token_ids for g in a.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=12), n=2)]
    assert other != first
    # Without a request seed, the engine seed decides.
    unseeded = SamplingParams(max_new_tokens=8)
    c, d = (TransformersEngine(copy.deepcopy(model), seed=5) for _ in range(2))
    assert [g.token_ids for g in c.generate(PROMPTS, unseeded)] == [
        g.token_ids for g in d.generate(PROMPTS, unseeded)
    ]
    e = TransformersEngine(copy.deepcopy(model), seed=6)
    assert [g.token_ids for g in e.generate(PROMPTS, unseeded)] != [
        g.token_ids for g in d.generate(PROMPTS, unseeded)
    ]


def assert_same_state(model, other) -> None:
    ref = other.state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, ref[name], atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("kind", ["moe", "qwen2_moe"])
def test_update_weights_from_tensors_with_per_expert_names(kind):
    old, new = build(kind, seed=0), build(kind, seed=1)
    named = checkpoint_state_dict(new)  # read back from save_pretrained's safetensors
    assert "model.layers.0.mlp.experts.3.gate_proj.weight" in named
    assert not any(name.endswith("experts.gate_up_proj") for name in named)
    engine = TransformersEngine(copy.deepcopy(old))
    # Streamed in two buckets, as the bridge does.
    items = sorted(named.items())
    engine.update_weights_from_tensors(items[: len(items) // 2], version="7")
    engine.update_weights_from_tensors(items[len(items) // 2 :], version="8")
    assert engine.weight_version == "8"
    assert_same_state(engine.model, new)

    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, seed=0)
    for g in engine.generate(PROMPTS, sampling):
        assert g.weight_version == "8"
        lp = torch.tensor(g.logprobs)
        torch.testing.assert_close(lp, teacher_forced(new, g.prompt_ids, g.token_ids, 1.0), atol=1e-5, rtol=0)
        assert (lp - teacher_forced(old, g.prompt_ids, g.token_ids, 1.0)).abs().max() > 1e-2


def test_bad_updates_are_refused_before_any_write():
    model = build("moe")
    engine = TransformersEngine(copy.deepcopy(model), weight_version="3")
    good = checkpoint_state_dict(build("moe", seed=1))
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    cases = {
        "model.layers.9.mlp.experts.0.up_proj.weight": good[name],  # unknown name
        "model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 64, 64),  # fused in-memory name
        name: good[name][:-1],  # wrong shape
        "model.norm.weight": good["model.norm.weight"].double(),  # wrong dtype
    }
    for bad_name, bad in cases.items():
        # A valid tensor first: nothing may be written when a later one is bad.
        with pytest.raises(RolloutError, match=re.escape(bad_name)):
            engine.update_weights_from_tensors([(name, good[name]), (bad_name, bad)], version="4")
        assert engine.weight_version == "3"
        assert_same_state(engine.model, model)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
@pytest.mark.parametrize("poison", ["nan_norm", "inf_lm_head_row"])
def test_non_finite_policy_raises_policy_diverged(poison, temperature):
    """NaN / inf weights (what an absurd learning rate leaves): PolicyDiverged naming the sample and token,
    not torch.multinomial's RuntimeError (sampling) or a garbage token (greedy)."""
    engine = TransformersEngine(build("dense"), weight_version="7")
    state = checkpoint_state_dict(engine.model)
    if poison == "nan_norm":
        update = {"model.norm.weight": torch.full_like(state["model.norm.weight"], float("nan"))}
    else:  # one token's logit is +inf or -inf: either way no distribution is left
        head = state["lm_head.weight"].clone()
        head[3] = float("inf")
        update = {"lm_head.weight": head}
    engine.update_weights_from_tensors(update.items(), version="8")
    with pytest.raises(PolicyDiverged) as exc:
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4, temperature=temperature, seed=0), n=2)
    message = str(exc.value)
    assert message.startswith("policy diverged: TransformersEngine: non-finite next-token probabilities")
    assert "weight version 8, prompt 0, sample 0, response token 0;" in message
    assert isinstance(exc.value, RolloutError) and exc.value.step is None


def test_update_weights_from_disk(tmp_path):
    new = build("moe", seed=2)
    new.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    engine = TransformersEngine(copy.deepcopy(build("moe")))
    engine.update_weights_from_disk(str(tmp_path / "sharded"), version="disk-1")
    assert engine.weight_version == "disk-1"
    assert_same_state(engine.model, new)
    g = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=5, seed=0))[0]
    assert g.weight_version == "disk-1"
    torch.testing.assert_close(
        torch.tensor(g.logprobs), teacher_forced(new, PROMPTS[0], g.token_ids, 1.0), atol=1e-5, rtol=0
    )
    with pytest.raises(RolloutError, match=r"no model\.safetensors"):
        engine.update_weights_from_disk(str(tmp_path), version="x")


def test_tied_lm_head():
    model, new = build("llama"), build("llama", seed=4)
    engine = TransformersEngine(copy.deepcopy(model))
    named = checkpoint_state_dict(new)
    assert "lm_head.weight" not in named
    embed = named["model.embed_tokens.weight"]
    with pytest.raises(RolloutError, match="tied"):
        engine.update_weights_from_tensors([("lm_head.weight", embed)], version="1")
    with pytest.raises(RolloutError, match="tied"):
        engine.update_weights_from_tensors(
            [("model.embed_tokens.weight", embed), ("lm_head.weight", embed + 1)], version="1"
        )
    assert_same_state(engine.model, model)
    engine.update_weights_from_tensors([*named.items(), ("lm_head.weight", embed.clone())], version="1")
    assert_same_state(engine.model, new)
    assert engine.model.lm_head.weight.data_ptr() == engine.model.model.embed_tokens.weight.data_ptr()


@torch.no_grad()
def test_routed_experts_match_router_of_teacher_forced_forward():
    model = build("moe")
    engine = TransformersEngine(copy.deepcopy(model), max_batch_size=4)
    gens = engine.generate(PROMPTS, SamplingParams(max_new_tokens=5, seed=0), n=2, return_routed_experts=True)
    for g in gens:
        routed = g.routed_experts
        length = len(g.prompt_ids) + len(g.token_ids) - 1
        assert routed.shape == (length, 3, 2) and routed.dtype == np.int32
        ids = torch.tensor([g.prompt_ids + g.token_ids[:-1]])
        router_logits = model(ids, output_router_logits=True).router_logits  # layers x [T, E]
        ref = torch.stack([r.reshape(length, -1).topk(2, dim=-1).indices for r in router_logits], dim=1)
        np.testing.assert_array_equal(np.sort(routed, -1), np.sort(ref.numpy(), -1))
    dense = TransformersEngine(build("dense"))
    with pytest.raises(RolloutError, match="no MoE router"):
        dense.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2), return_routed_experts=True)


def test_engine_from_directory(tmp_path):
    model, tok = build("dense"), tokenizer()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = TransformersEngine(tmp_path, weight_version="base")
    g = engine.generate(["the quick fox", [3, 4]], SamplingParams(max_new_tokens=4, temperature=0))
    assert g[0].prompt_ids == tok("the quick fox")["input_ids"]
    assert g[1].prompt_ids == [3, 4] and g[0].weight_version == "base"
    assert g[0].token_ids == greedy_reference(model, g[0].prompt_ids, 4)
    with pytest.raises(RolloutError, match="no tokenizer"):
        TransformersEngine(model).generate(["text"], SamplingParams())
