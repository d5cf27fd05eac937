"""The checkpoint converter CLIs end to end: HF -> Megatron (torchrun, 2 ranks) -> HF (1-3 ranks), bit-exact.

A tiny random Qwen3-MoE (every tensor randomised, tests/hf_reference.py) and a dense Qwen3 with vocab 129
(padded to 130 at TP=2) are saved with `save_pretrained`, next to a BPE tokenizer trained here with the
`tokenizers` library. `torchrun --nproc-per-node 2 tools/convert_hf_to_megatron.py` (EP=2 / TP=2), then
`python tools/convert_megatron_to_hf.py` (1 rank, small shards). Checked against the originals: same key
set, every tensor bit-exact (dtype included), transformers' logits from the converted dir equal the
original model's, the tokenizer encodes identically, chat template kept. The streaming Megatron -> HF
path writes byte-identical files at 1, 2 and 3 ranks, and never holds more than one full tensor (+ its
HF views) even when one shard is the whole model. Error paths exit 2 with one `error:` line naming the
field and no traceback.

    python -m pytest tests/e2e/test_converters.py -q
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from tests.e2e.helpers import LiveStorages, launcher
from tests.hf_reference import load_checkpoint, qwen3_config, qwen3_moe_config, tiny_hf_model

ROOT = Path(__file__).resolve().parents[2]
TO_MEGATRON = str(ROOT / "tools" / "convert_hf_to_megatron.py")
TO_HF = str(ROOT / "tools" / "convert_megatron_to_hf.py")
CORPUS = ["the quick brown fox jumps over the lazy dog", "a policy samples tokens and a reward scores them"]
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
TEXTS = ["the lazy fox scores tokens", "a reward over the dog"]


def save_tokenizer(path: Path, vocab_size: int) -> None:
    """A BPE tokenizer trained on CORPUS, saved as transformers would (tokenizer.json + config + template)."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = ["<unk>", "<s>", "</s>", "<pad>"]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


def run(tool: str, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*launcher(nproc), tool, *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


MODELS = {
    "qwen3moe-ep2": (lambda: qwen3_moe_config(tie_word_embeddings=False), ["--ep", "2"]),
    "qwen3-v129-tp2": (lambda: qwen3_config(vocab_size=129, tie_word_embeddings=True), ["--tp", "2"]),
}


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for name, (make_config, _) in MODELS.items():
        path = tmp_path_factory.mktemp(name)
        tiny_hf_model(make_config(), seed=5).save_pretrained(path)
        save_tokenizer(path, vocab_size=100)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def converted(originals: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    """Each original converted to megatron by the CLI on 2 ranks at its layout."""
    out = {}
    for name, (_, layout) in MODELS.items():
        out[name] = tmp_path_factory.mktemp(f"{name}-mcore")
        _ok(
            run(
                TO_MEGATRON,
                "--hf-dir",
                str(originals[name]),
                "--output-dir",
                str(out[name]),
                *layout,
                nproc=2,
            )
        )
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_bit_exact_and_loadable(
    name: str, originals: dict[str, Path], converted: dict[str, Path], tmp_path: Path
) -> None:
    hf_dir, mcore, back = originals[name], converted[name], tmp_path / "hf"
    meta = json.loads((mcore / "megatron_sapo.json").read_text())
    assert (
        meta["world_size"] == 2
        and meta["model_type"] == json.loads((hf_dir / "config.json").read_text())["model_type"]
    )
    _ok(run(TO_HF, "--megatron-dir", str(mcore), "--output-dir", str(back), "--max-shard-size", "40KB"))

    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # several size-bounded shards
    original, converted = load_checkpoint(hf_dir), load_checkpoint(back)
    assert sorted(converted) == sorted(original)
    for key, tensor in original.items():
        assert converted[key].dtype == tensor.dtype and torch.equal(converted[key], tensor), key
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (back / file).read_bytes() == (hf_dir / file).read_bytes(), file

    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(hf_dir).eval()(input_ids=tokens).logits
        logits = AutoModelForCausalLM.from_pretrained(back).eval()(input_ids=tokens).logits
    assert torch.equal(logits, expected)
    tok, tok_back = AutoTokenizer.from_pretrained(hf_dir), AutoTokenizer.from_pretrained(back)
    assert tok_back(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    chat = [{"role": "user", "content": "the dog"}]
    assert tok_back.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("nproc", [2, 3])
def test_to_hf_same_files_at_any_world_size(nproc: int, converted: dict[str, Path], tmp_path: Path) -> None:
    """N ranks split the shards among them; the files are byte-identical to one process's."""
    from megatron_sapo.convert import megatron_to_hf

    mcore, one, many = converted["qwen3moe-ep2"], tmp_path / "one", tmp_path / "many"
    megatron_to_hf(mcore, one, max_shard_bytes=40_000, progress=False)  # in this process, no group
    _ok(
        run(
            TO_HF,
            "--megatron-dir",
            str(mcore),
            "--output-dir",
            str(many),
            "--max-shard-size",
            "40KB",
            nproc=nproc,
        )
    )
    assert len(list(one.glob("*.safetensors"))) > nproc
    assert _files(many) == _files(one)


def test_to_hf_streams_one_tensor_at_a_time(
    converted: dict[str, Path], originals: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """Tensors alive in the converter (storages read from the checkpoint or given to the shard writer)
    never exceed one full megatron tensor and its HF tensors, although the shard holds the whole model."""
    from megatron_sapo.convert import to_hf

    live, peak = LiveStorages(), [0]

    def track(tensor: torch.Tensor) -> torch.Tensor:
        live.track(tensor)
        peak[0] = max(peak[0], live.bytes)
        return tensor

    read, write = to_hf.DistCheckpointReader.read, to_hf.ShardWriter.write
    monkeypatch.setattr(to_hf.DistCheckpointReader, "read", lambda self, *a: track(read(self, *a)))
    monkeypatch.setattr(to_hf.ShardWriter, "write", lambda self, name, t: write(self, name, track(t)))
    out = tmp_path / "hf"
    to_hf.megatron_to_hf(converted["qwen3moe-ep2"], out, max_shard_bytes=1 << 30, progress=False)

    original = load_checkpoint(originals["qwen3moe-ep2"])
    assert list(out.glob("*.safetensors")) == [out / "model.safetensors"]  # one shard: the whole model
    largest, total = max(t.nbytes for t in original.values()), sum(t.nbytes for t in original.values())
    assert 0 < peak[0] <= 2 * largest and 8 * peak[0] < total, (peak[0], largest, total)
    converted_back = load_checkpoint(out)
    assert all(torch.equal(converted_back[k], t) for k, t in original.items())


def _unknown_arch(original: Path, tmp: Path) -> list[str]:
    path = Path(shutil.copytree(original, tmp / "copy"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "model_type": "gpt_unknown"}))
    return ["--hf-dir", str(path)]


ERRORS = {
    # case: (tool, args builder(original dir, tmp) -> args, words the one-line message must contain)
    "missing-dir": (TO_MEGATRON, lambda h, t: ["--hf-dir", str(t / "nope")], ["does not exist"]),
    "no-config": (TO_MEGATRON, lambda h, t: ["--hf-dir", str(t)], ["no config.json"]),
    "unknown-arch": (TO_MEGATRON, _unknown_arch, ["unknown architecture", "gpt_unknown"]),
    "tp-heads": (
        TO_MEGATRON,
        lambda h, t: ["--hf-dir", str(h), "--tp", "3"],
        ["num_attention_heads", "tp=3"],
    ),
    "ep-experts": (TO_MEGATRON, lambda h, t: ["--hf-dir", str(h), "--ep", "3"], ["num_experts", "ep=3"]),
    "world-size": (
        TO_MEGATRON,
        lambda h, t: ["--hf-dir", str(h), "--ep", "2"],
        ["world size 1", "--tp x --ep = 1 x 2 = 2"],
    ),
    "not-converted": (TO_HF, lambda h, t: ["--megatron-dir", str(h)], ["megatron_sapo.json"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_user_errors_are_one_line(case: str, originals: dict[str, Path], tmp_path: Path) -> None:
    tool, make_args, words = ERRORS[case]
    proc = run(tool, *make_args(originals["qwen3moe-ep2"], tmp_path), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert all(word in errors[0] for word in words), errors[0]
    assert not (tmp_path / "out").exists()
