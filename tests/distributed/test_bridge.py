"""The weight bridge across layouts: HF checkpoint -> sharded megatron -> logits, and -> HF again, bit-exact.

Tiny random transformers models (every tensor randomised, tests/hf_reference.py) are saved with
`save_pretrained` (per-expert MoE names on disk). For each layout -- TP2, EP2, PP2 with virtual PP2, and
TP2×PP2 on 4 ranks -- every rank loads its slices with `load_hf_weights` from the saved dir, runs a
forward pass (pipeline stages hand hidden states over point-to-point), and exports with
`export_hf_weights` under a small bucket limit. Checked against independent references:
- logits (TP shards of the last stage concatenated, vocab padding dropped) equal transformers' logits;
- the destination rank(s) receive exactly the saved checkpoint: same key set, every tensor bit-exact;
- every bucket is within the byte limit or holds one larger tensor; all ranks yield the same number of
  buckets; non-destination ranks receive nothing.

    python -m pytest tests/distributed/test_bridge.py -q
"""

from __future__ import annotations

import functools

import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks
from tests.hf_reference import (
    llama_config,
    load_checkpoint,
    qwen2_moe_config,
    qwen3_config,
    qwen3_moe_config,
    tiny_hf_model,
)

LOGIT_TOL = 1e-5
BATCH, SEQ = 2, 8
BUCKET_BYTES = 16 << 10  # below the embedding (129 x 64 fp32 = 33 KiB): single-tensor buckets occur

# vocab 129: TP2 pads it to 130. 4 layers: PP2 x VPP2 gives every virtual stage one layer.
MODELS = {
    "qwen3-tied-v129": functools.partial(
        qwen3_config, vocab_size=129, tie_word_embeddings=True, num_hidden_layers=4
    ),
    "qwen3-untied": functools.partial(qwen3_config, tie_word_embeddings=False, num_hidden_layers=4),
    "llama-tied": llama_config,
    "qwen3moe-v129": functools.partial(
        qwen3_moe_config, vocab_size=129, num_hidden_layers=4, mlp_only_layers=[1], tie_word_embeddings=False
    ),
    "qwen2moe": qwen2_moe_config,
}

# layout -> (world size, parallel sizes, models, destination ranks)
LAYOUTS = {
    "tp2": (2, dict(tp=2), ["qwen3-tied-v129", "llama-tied", "qwen3moe-v129"], (0,)),
    "ep2": (2, dict(ep=2), ["qwen3moe-v129", "qwen2moe"], (0,)),
    "pp2-vpp2": (2, dict(pp=2, vpp=2), ["qwen3-tied-v129", "qwen3moe-v129"], (1,)),
    # ranks 0, 1: the TP group of stage 0; both receive stage 1's tensors from ranks 2, 3
    "tp2-pp2": (4, dict(tp=2, pp=2), ["qwen3-untied", "qwen3moe-v129"], (0, 1)),
}


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, dict]:
    """Per model: saved dir, transformers logits, and the saved tensors."""
    out = {}
    for name, make_config in MODELS.items():
        hf = tiny_hf_model(make_config(), seed=11)
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        with torch.no_grad():
            logits = hf(input_ids=_tokens(hf.config.vocab_size)).logits
        out[name] = dict(path=str(path), logits=logits, state=load_checkpoint(path))
    return out


def _pipeline_forward(chunks: list, tokens: torch.Tensor) -> torch.Tensor | None:
    """Logits on the last pipeline stage (None elsewhere); hidden states [S, B, H] go stage to stage."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_sapo.megatron.cpu import causal_attention_mask

    ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    stage, pp = ps.get_pipeline_model_parallel_rank(), len(ranks)
    args = (tokens, torch.arange(SEQ).expand(BATCH, SEQ), causal_attention_mask(SEQ, BATCH))
    out = None
    for chunk in chunks:  # virtual stages run in order: (v0, s0), (v0, s1), (v1, s0), ...
        if not chunk.pre_process:
            hidden = torch.empty(SEQ, BATCH, chunk.config.hidden_size)
            dist.recv(hidden, ranks[(stage - 1) % pp])
            chunk.set_input_tensor(hidden)
        out = chunk(*args)
        if not chunk.post_process:
            dist.send(out.contiguous(), ranks[(stage + 1) % pp])
    return out if chunks[-1].post_process else None


def _rank_fn(rank: int, world_size: int, layout: str, paths: dict[str, str]) -> dict:
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_sapo.bridge import export_hf_weights, load_hf_weights
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu

    _, sizes, models, dst_ranks = LAYOUTS[layout]
    sizes = dict(sizes)
    vpp = sizes.pop("vpp", None)
    init_megatron_cpu(**sizes)
    if vpp is not None:  # init_megatron_cpu has no VPP switch
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(
            pipeline_model_parallel_size=sizes["pp"], virtual_pipeline_model_parallel_size=vpp
        )
    results = {}
    for name in models:
        hf_config = AutoConfig.from_pretrained(paths[name])
        chunks = [build_gpt_model(hf_config, vp_stage=v).eval() for v in (range(vpp) if vpp else [None])]
        load_hf_weights(chunks, hf_config, paths[name])
        with torch.no_grad():
            logits = _pipeline_forward(chunks, _tokens(hf_config.vocab_size))
        exported, buckets = {}, []
        for bucket in export_hf_weights(chunks, hf_config, bucket_bytes=BUCKET_BYTES, dst_ranks=dst_ranks):
            buckets.append([t.numel() * t.element_size() for _, t in bucket])
            exported.update((n, t.clone()) for n, t in bucket)
        results[name] = dict(
            logits=logits,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            exported=exported,
            buckets=buckets,
        )
    return results


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_import_logits_export_round_trip_and_buckets(layout: str, checkpoints: dict) -> None:
    world_size, sizes, models, dst_ranks = LAYOUTS[layout]
    paths = {name: checkpoints[name]["path"] for name in models}
    per_rank = run_on_ranks(_rank_fn, world_size=world_size, args=(layout, paths), timeout=600)
    tp = sizes.get("tp", 1)
    for name in models:
        results = [r[name] for r in per_rank]
        reference = checkpoints[name]

        last_stage = [r for r in results if r["logits"] is not None]
        assert len(last_stage) == world_size // sizes.get("pp", 1)
        shards = sorted(last_stage, key=lambda r: r["tp_rank"])[:tp]
        logits = torch.cat([r["logits"] for r in shards], dim=-1)  # [B, S, V/tp] per TP rank
        expected = reference["logits"]
        err = (logits[..., : expected.shape[-1]] - expected).abs().max().item()
        assert err <= LOGIT_TOL, f"{layout} {name}: max |logit diff| {err:.2e}"

        for rank, result in enumerate(results):
            if rank not in dst_ranks:
                assert not result["exported"] and all(not b for b in result["buckets"]), f"rank {rank}"
                continue
            exported = result["exported"]
            assert sorted(exported) == sorted(reference["state"]), f"{layout} {name} rank {rank}"
            for key, tensor in reference["state"].items():
                assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
            for sizes_in_bucket in result["buckets"]:
                assert sum(sizes_in_bucket) <= BUCKET_BYTES or len(sizes_in_bucket) == 1, sizes_in_bucket
            assert any(len(b) == 1 and b[0] > BUCKET_BYTES for b in result["buckets"])  # oversized alone
        assert len({len(r["buckets"]) for r in results}) == 1  # every rank yields in lockstep


# own-stage export (the parallel weight sync): layout -> (world size, parallel sizes, models)
STAGE_LAYOUTS = {
    "pp4": (4, dict(pp=4), ["qwen3-untied", "qwen3moe-v129"]),
    "tp2-pp2": (4, dict(tp=2, pp=2), ["qwen3-untied"]),
}


def _stage_of(name: str, num_layers: int, pp: int) -> int:
    """Independent reference: which pipeline stage holds an HF tensor (even layer split, megatron's
    default: embeddings on the first stage, final norm and output layer on the last)."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2]) // (num_layers // pp)
    return 0 if name.startswith("model.embed_tokens.") else pp - 1


def _own_stage_fn(rank: int, world_size: int, layout: str, paths: dict[str, str]) -> dict:
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_sapo.bridge import export_hf_weights, load_hf_weights
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu

    _, sizes, models = STAGE_LAYOUTS[layout]
    init_megatron_cpu(**sizes)
    results = {}
    for name in models:
        hf_config = AutoConfig.from_pretrained(paths[name])
        chunks = [build_gpt_model(hf_config).eval()]
        load_hf_weights(chunks, hf_config, paths[name])
        exported, buckets = {}, []
        for bucket in export_hf_weights(chunks, hf_config, bucket_bytes=BUCKET_BYTES, own_stage=True):
            buckets.append([t.numel() * t.element_size() for _, t in bucket])
            exported.update((n, t.clone()) for n, t in bucket)
        results[name] = dict(stage=ps.get_pipeline_model_parallel_rank(), exported=exported, buckets=buckets)
    return results


@pytest.mark.parametrize("layout", sorted(STAGE_LAYOUTS))
def test_own_stage_export_gives_each_stage_exactly_its_share(layout: str, checkpoints: dict) -> None:
    """Every rank of stage s gets exactly the checkpoint tensors stage s holds (bit-exact), no other;
    the stages together give the whole checkpoint once; buckets stay within the limit."""
    world_size, sizes, models = STAGE_LAYOUTS[layout]
    pp = sizes["pp"]
    paths = {name: checkpoints[name]["path"] for name in models}
    per_rank = run_on_ranks(_own_stage_fn, world_size=world_size, args=(layout, paths), timeout=600)
    for name in models:
        state = checkpoints[name]["state"]
        num_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.layers."))
        share = {s: {k for k in state if _stage_of(k, num_layers, pp) == s} for s in range(pp)}
        total = sum(t.numel() * t.element_size() for t in state.values())
        stage_bytes = {}
        for rank, result in enumerate(r[name] for r in per_rank):
            exported, stage = result["exported"], result["stage"]
            assert set(exported) == share[stage], f"{layout} {name} rank {rank} stage {stage}"
            for key, tensor in exported.items():
                assert torch.equal(tensor, state[key]), key
            for sizes_in_bucket in result["buckets"]:
                assert sum(sizes_in_bucket) <= BUCKET_BYTES or len(sizes_in_bucket) == 1, sizes_in_bucket
            stage_bytes[stage] = sum(map(sum, result["buckets"]))
        assert sorted(stage_bytes) == list(range(pp))
        assert sum(stage_bytes.values()) == total  # the stages together: the model, once
        # what global rank 0 (stage 0) carries: its own stage only, about 1/PP of the layers' bytes
        assert stage_bytes[0] == sum(state[k].numel() * state[k].element_size() for k in share[0]) < total
