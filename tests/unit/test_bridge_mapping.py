"""Bridge primitives, safetensors I/O and load errors, in one process (TP=PP=EP=1 for model-level checks).

Primitives against hand-written layouts (per-head loops, not the primitives' reshapes): fused QKV rows
per KV group, GLU halves per TP rank, vocab padding, transformers-5 fused experts read as per-expert
tensors, per-expert tensors written expert by expert as the official Qwen3-VL-MoE fused ones (= the
in-memory ones transposed). The sharded writer against its byte bound, HF's index format and `save_file`'s bytes (every
dtype); the header reader against the tensors written. Loads from a multi-shard
checkpoint and from fused expert names on disk reproduce the model; missing tensors, shape mismatches
and unknown architectures fail with messages naming them. A new architecture is one file: a copy of
`bridge/arch/llama.py` under another model_type, put on the package's path, is built and loaded by the
megatron side and the bridge alike; a model_type defined twice is refused.

    python -m pytest tests/unit/test_bridge_mapping.py -q
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("CPU tests (the CPU compatibility layer refuses CUDA machines)", allow_module_level=True)

from safetensors.torch import save_file
from transformers import GPT2Config

import megatron_sapo.bridge.arch as arch_package
from megatron_sapo.bridge import (
    ARCHITECTURES,
    SafetensorsReader,
    export_hf_weights,
    load_hf_weights,
    mapping_table,
    save_safetensors_sharded,
)
from megatron_sapo.bridge.arch import discover
from megatron_sapo.bridge.fused_experts import official_fused_experts
from megatron_sapo.bridge.load import StateDictSource, open_source
from megatron_sapo.bridge.mapping import FusedQKV, GatedMLP, ModelDims, VocabParallel
from megatron_sapo.bridge.safetensors_io import DTYPES, ShardWriter
from megatron_sapo.megatron.models import architecture_of, build_gpt_model
from megatron_sapo.utils.tiny_vlm import official_expert_layout
from tests.hf_reference import (
    checkpoint_state_dict,
    llama_config,
    qwen3_config,
    qwen3_moe_config,
    tiny_hf_model,
)

DIMS = ModelDims(
    num_attention_heads=4, num_query_groups=2, head_dim=3, vocab_size=5, tie_word_embeddings=False
)


def _arange(*shape: int) -> torch.Tensor:
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape)


@pytest.mark.parametrize("tail", [(7,), ()])  # weight [rows, H] and bias [rows]
def test_fused_qkv_groups_q_heads_with_their_kv_head_per_tp_rank(tail: tuple[int, ...]) -> None:
    q, k, v = _arange(4 * 3, *tail), 100 + _arange(2 * 3, *tail), 200 + _arange(2 * 3, *tail)
    source = StateDictSource({"q": q, "k": k, "v": v})
    mapping = FusedQKV("qkv", "q", "k", "v")
    # GQA 4 heads / 2 groups: group g = [q head 2g, q head 2g+1, k head g, v head g], head_dim 3 rows each
    head = lambda t, i: t[3 * i : 3 * i + 3]  # noqa: E731
    groups = [torch.cat([head(q, 2 * g), head(q, 2 * g + 1), head(k, g), head(v, g)]) for g in range(2)]
    for rank in range(2):  # TP2: one group per rank
        local = mapping.load(source, ["q", "k", "v"], (12, *tail), (rank, 2), DIMS)
        assert torch.equal(local, groups[rank])
    full = mapping.load(source, ["q", "k", "v"], (24, *tail), (0, 1), DIMS)
    assert torch.equal(full, torch.cat(groups))
    assert all(torch.equal(a, b) for a, b in zip(mapping.to_hf(full, DIMS), (q, k, v)))


def test_gated_mlp_splits_gate_and_up_separately() -> None:
    gate, up = _arange(4, 3), 100 + _arange(4, 3)
    mapping = GatedMLP("fc1", "gate", "up")
    source = StateDictSource({"gate": gate, "up": up})
    shards = [mapping.load(source, ["gate", "up"], (4, 3), (r, 2), DIMS) for r in range(2)]
    assert torch.equal(shards[1], torch.cat([gate[2:], up[2:]]))  # [gate_r; up_r]
    full = mapping.merge_tp(shards)
    assert torch.equal(full, torch.cat([gate, up]))
    assert all(torch.equal(a, b) for a, b in zip(mapping.to_hf(full, DIMS), (gate, up)))


def test_vocab_rows_padded_with_zeros_and_unpadded_on_export() -> None:
    embed = 1 + _arange(5, 2)  # vocab 5 -> padded 6 at TP2
    mapping = VocabParallel("emb", "embed")
    shards = [
        mapping.load(StateDictSource({"embed": embed}), ["embed"], (3, 2), (r, 2), DIMS) for r in range(2)
    ]
    assert torch.equal(shards[1], torch.cat([embed[3:], torch.zeros(1, 2)]))
    assert torch.equal(mapping.to_hf(mapping.merge_tp(shards), DIMS)[0], embed)


def test_fused_expert_tensors_read_as_per_expert_slices() -> None:
    gate_up, down = _arange(3, 8, 5), _arange(3, 5, 4)  # E=3, I=4, H=5: [E, 2I, H], [E, H, I]
    source = open_source({"m.experts.gate_up_proj": gate_up, "m.experts.down_proj": down})
    assert source.shape("m.experts.2.up_proj.weight") == (4, 5)
    assert source.shape("m.experts.2.down_proj.weight") == (5, 4)
    assert source.shape("m.experts.2.other.weight") is None
    up_rows = source.read("m.experts.2.up_proj.weight", (slice(2, 4),))
    assert torch.equal(up_rows, gate_up[2, 6:8])
    assert torch.equal(source.read("m.experts.1.gate_proj.weight", ()), gate_up[1, :4])
    assert torch.equal(
        source.read("m.experts.0.down_proj.weight", (slice(None), slice(2, 4))), down[0, :, 2:]
    )


def test_per_expert_tensors_fuse_into_the_official_layout_expert_by_expert(tmp_path) -> None:
    """Per-expert tensors (read from transformers' in-memory fusion) written back fused: the official
    files' tensors are the in-memory ones with dims 1 and 2 swapped (tiny_vlm.official_expert_layout),
    filled one expert at a time by the shard writer, in any order; other tensors pass through."""
    gen = torch.Generator().manual_seed(0)
    memory = {  # E=3, I=4, H=5; the norm after the experts in the checkpoint's order
        "l.0.mlp.experts.gate_up_proj": torch.randn(3, 8, 5, generator=gen),
        "l.0.mlp.experts.down_proj": torch.randn(3, 5, 4, generator=gen),
        "l.0.norm.weight": torch.randn(5, generator=gen),
    }
    official = official_expert_layout(memory)
    source = open_source(memory)
    names = [
        f"l.0.mlp.experts.{e}.{p}.weight" for e in range(3) for p in ("gate_proj", "up_proj", "down_proj")
    ] + ["l.0.norm.weight"]
    metas = [(n, source.shape(n), torch.float32) for n in names]
    files, fused = official_fused_experts(metas)
    assert files == [(n, tuple(t.shape), torch.float32) for n, t in official.items()]  # where expert 0 was
    assert [m[1] for m in files[:2]] == [(3, 5, 8), (3, 4, 5)]  # [E, H, 2I], [E, I, H]
    with ShardWriter(tmp_path / "model.safetensors", files) as writer:
        writer.write("l.0.norm.weight", memory["l.0.norm.weight"])
        for name, tensor in fused.items():
            for e in (2, 0, 1):
                writer.write(name, tensor.block([source.read(n, ()) for n in tensor.parts[e]]), start=e)
                if e == 2:
                    with pytest.raises(ValueError, match="written twice"):
                        writer.write(name, torch.zeros(1, *tensor.shape[1:]), start=2)
    with SafetensorsReader(tmp_path) as reader:
        assert sorted(reader.names()) == sorted(official)
        assert all(torch.equal(reader.read(n, ()), t) for n, t in official.items())
    with (
        pytest.raises(RuntimeError, match="never written"),
        ShardWriter(tmp_path / "part", files[:1]) as writer,
    ):
        writer.write(files[0][0], torch.zeros(1, *files[0][1][1:]), start=0)  # expert 0 of 3 only
    with pytest.raises(ValueError, match="do not each have"):
        official_fused_experts(metas[:7] + metas[8:])  # expert 2 without its up_proj
    with pytest.raises(ValueError, match="do not each have"):
        official_fused_experts(metas[:5] + metas[6:])  # down_proj of experts 0 and 2 only


def test_sharded_writer_bounds_shards_and_reads_back(tmp_path) -> None:
    tensors = [(f"t{i}", torch.full((10 * (i + 1),), float(i))) for i in range(5)]  # 40..200 bytes
    index = save_safetensors_sharded(iter(tensors), tmp_path, max_shard_bytes=130)
    written = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert written == index and index["metadata"]["total_size"] == sum(t.numel() * 4 for _, t in tensors)
    by_file: dict[str, int] = {}
    for name, file in index["weight_map"].items():
        by_file[file] = by_file.get(file, 0) + dict(tensors)[name].numel() * 4
    assert len(by_file) == 4 and all(size <= 130 or size == 160 or size == 200 for size in by_file.values())
    assert sorted(by_file)[0] == "model-00001-of-00004.safetensors"
    with SafetensorsReader(tmp_path) as reader:
        assert reader.shape("t4") == (50,) and reader.shape("nope") is None
        assert torch.equal(reader.read("t3", (slice(5, 9),)), torch.full((4,), 3.0))
    single = tmp_path / "single"
    save_safetensors_sharded(tensors[:2], single)
    assert sorted(p.name for p in single.iterdir()) == ["model.safetensors"]
    with pytest.raises(ValueError, match="given twice"):
        save_safetensors_sharded([tensors[0], tensors[0]], tmp_path / "dup")


def test_writer_matches_save_file_and_reader_reads_headers(tmp_path) -> None:
    """Every dtype of the table, in one shard: the bytes of `save_file`; the reader's headers and data."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        f"w.{code.lower()}": (torch.rand(3, 5, generator=gen) * 100).to(dtype)
        for code, dtype in DTYPES.items()
    }
    tensors["a.scalar"] = torch.tensor(1.5, dtype=torch.bfloat16)
    save_file(tensors, str(tmp_path / "reference.safetensors"), metadata={"format": "pt"})
    save_safetensors_sharded(tensors.items(), tmp_path / "ours")
    written = (tmp_path / "ours" / "model.safetensors").read_bytes()
    assert written == (tmp_path / "reference.safetensors").read_bytes()
    with SafetensorsReader(tmp_path / "ours") as reader:
        assert sorted(reader.names()) == sorted(tensors)
        for name, tensor in tensors.items():
            header = reader.header(name)
            assert DTYPES[header.dtype] == tensor.dtype and header.shape == tuple(tensor.shape)
            assert header.nbytes == tensor.numel() * tensor.element_size()
            assert torch.equal(reader.read(name, ()), tensor)
        assert reader.header("nope") is None
    with pytest.raises(ValueError, match=r"'c' is torch.complex64"):
        save_safetensors_sharded([("c", torch.zeros(2, dtype=torch.complex64))], tmp_path / "complex")


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.usefixtures("megatron_tp1")
def test_export_to_shards_and_fused_experts_on_disk_load_back(tmp_path) -> None:
    hf_config = qwen3_moe_config(mlp_only_layers=[1])
    hf = tiny_hf_model(hf_config, seed=4)
    reference = build_gpt_model(hf_config)
    load_hf_weights(reference, hf_config, hf.state_dict())
    # transformers-5 in-memory (fused expert) names written to disk load the same weights
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "fused.safetensors"))
    from_fused = build_gpt_model(hf_config)
    load_hf_weights(from_fused, hf_config, tmp_path / "fused.safetensors")
    # our own multi-shard export loads back into a fresh model bit-exactly
    stream = (t for bucket in export_hf_weights(reference, hf_config, bucket_bytes=8 << 10) for t in bucket)
    index = save_safetensors_sharded(stream, tmp_path / "out", max_shard_bytes=64 << 10)
    assert len(set(index["weight_map"].values())) > 1
    assert sorted(index["weight_map"]) == sorted(checkpoint_state_dict(hf))
    reloaded = build_gpt_model(hf_config)
    load_hf_weights(reloaded, hf_config, tmp_path / "out")
    expected = _params(reference)
    for model in (from_fused, reloaded):
        got = _params(model)
        assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)


@pytest.fixture
def arch_dir(tmp_path: Path):
    """A directory on `megatron_sapo.bridge.arch`'s path: a file written there is one of its modules."""
    path = list(arch_package.__path__)
    arch_package.__path__.append(str(tmp_path))
    yield tmp_path
    arch_package.__path__[:] = path
    for module in tmp_path.glob("*.py"):
        sys.modules.pop(f"{arch_package.__name__}.{module.stem}", None)
        vars(arch_package).pop(module.stem, None)


@pytest.mark.usefixtures("megatron_tp1")
def test_a_new_architecture_is_one_file(arch_dir: Path, monkeypatch) -> None:
    # llama.py copied under another model_type, and nothing else: discovery makes it a model the megatron
    # side builds and the bridge loads, the same weights as the llama it copies
    llama = Path(arch_package.__file__).with_name("llama.py").read_text()
    assert llama.count('model_type="llama",') == 1
    (arch_dir / "llama_copy.py").write_text(llama.replace('model_type="llama",', 'model_type="llama_copy",'))
    found = discover()  # what importing the package does; it is imported already, so add the new entry
    assert found.keys() == {*ARCHITECTURES, "llama_copy"}
    monkeypatch.setitem(ARCHITECTURES, "llama_copy", found["llama_copy"])

    hf_config, copy_config = llama_config(tie_word_embeddings=False), llama_config(tie_word_embeddings=False)
    copy_config.model_type = "llama_copy"
    assert architecture_of(copy_config) == dataclasses.replace(
        ARCHITECTURES["llama"], model_type="llama_copy"
    )
    table = mapping_table(copy_config)
    assert table.model_type == "llama_copy" and table.mappings == mapping_table(hf_config).mappings
    state = checkpoint_state_dict(tiny_hf_model(hf_config, seed=2))
    models = []
    for config in (hf_config, copy_config):
        models.append(build_gpt_model(config))
        load_hf_weights(models[-1], config, state)
    expected, got = _params(models[0]), _params(models[1])
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)


def test_a_model_type_defined_twice_is_an_error(arch_dir: Path) -> None:
    llama = Path(arch_package.__file__).with_name("llama.py").read_text()
    (arch_dir / "llama_again.py").write_text(llama)
    with pytest.raises(
        ValueError, match=r"'llama' is defined twice: in .*arch\.llama and .*arch\.llama_again"
    ):
        discover()


@pytest.mark.usefixtures("megatron_tp1")
def test_load_errors_name_the_tensor_file_and_shapes(tmp_path) -> None:
    hf_config = qwen3_config(tie_word_embeddings=False)
    state = checkpoint_state_dict(tiny_hf_model(hf_config))
    model = build_gpt_model(hf_config)

    missing = {k: v for k, v in state.items() if k != "model.layers.1.mlp.up_proj.weight"}
    save_file(missing, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*not found in .*model\.safetensors"
    ):
        load_hf_weights(model, hf_config, tmp_path)

    wrong = {**state, "model.norm.weight": torch.ones(63)}
    with pytest.raises(ValueError, match=r"'model\.norm\.weight'.*shape \(63,\).*needs \(64,\)"):
        load_hf_weights(model, hf_config, wrong)

    # a megatron parameter the table does not map (Llama's table has no QK-norm) is named
    with pytest.raises(ValueError, match=r"no bridge mapping for megatron parameter .*q_layernorm"):
        load_hf_weights(model, llama_config(tie_word_embeddings=False), state)

    with pytest.raises(ValueError, match="unknown architecture model_type='gpt2'"):
        mapping_table(GPT2Config(n_layer=1))
    with pytest.raises(ValueError, match="unknown architecture"):
        load_hf_weights(model, GPT2Config(n_layer=1), state)
