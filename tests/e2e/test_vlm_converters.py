"""The converter CLIs on vision-language checkpoints: Qwen3-VL and Qwen3-VL-MoE HF -> Megatron -> HF, bit-exact.

Tiny official-layout checkpoints (`utils/tiny_vlm.py`: random fp32 weights, 6 text layers, vision tower
with 3 deepstack mergers, Qwen3-VL-MoE experts fused as `gate_up_proj [E, H, 2I]` / `down_proj [E, I, H]`,
tokenizer + processor + chat template) go through `torchrun --nproc-per-node 4
tools/convert_hf_to_megatron.py` at TP2 x PP2 (dense) and PP2 x EP2 (MoE, 4 experts), then back with
`tools/convert_megatron_to_hf.py` (2 / 1 processes, small shards). Checked against the original files: same
tensor names and shapes (the MoE experts fused again), every tensor torch.equal, config / tokenizer /
processor / chat template files byte-identical, `AutoProcessor` gives the same input_ids, pixel_values
and grids for an image prompt, and transformers' logits for three images in two prompts equal the
original model's exactly. A converted checkpoint also loads into megatron at another layout (TP1, one
rank, `load_megatron_model`) with logits within 1e-4 of transformers. The fused experts are written one
expert at a time (never a whole layer's experts in memory). Bad input (processor files missing, an image
token id the processor disagrees with, deepstack layers off the first pipeline stage, an unknown VLM
model_type) exits 2 with one `error:` line, no traceback, no output dir.

    python -m pytest tests/e2e/test_vlm_converters.py -q      # ~3 min on 2 cores (two 4-rank conversions)
    python -m pytest tests/e2e/test_vlm_converters.py -q -k error      # the bad-input cases, ~40 s
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks
from megatron_sapo.utils.tiny_vlm import save_tiny_vlm, tiny_vlm_config
from tests.e2e.helpers import LiveStorages, launcher
from tests.hf_reference import load_checkpoint

ROOT = Path(__file__).resolve().parents[2]
TO_MEGATRON = str(ROOT / "tools" / "convert_hf_to_megatron.py")
TO_HF = str(ROOT / "tools" / "convert_megatron_to_hf.py")
LOGIT_TOL = 1e-4  # megatron vs transformers, fp32 both sides
ASSETS = ("config.json", "generation_config.json", "processor_config.json", "chat_template.jinja")
ASSETS += ("tokenizer.json", "tokenizer_config.json")

# name -> (moe, layout flags for the 4 ranks of HF -> Megatron, processes of Megatron -> HF)
MODELS = {
    "dense-tp2pp2": (False, ["--tp", "2", "--pp", "2"], 2),
    "moe-pp2ep2": (True, ["--pp", "2", "--ep", "2"], 1),
}


def run(tool: str, *args: str, log: Path, nproc: int = 1) -> tuple[int, str]:
    """(exit code, stderr) of a converter CLI; its output goes to files under `log` (not pipes: torchrun's
    workers would hold them)."""
    log.mkdir(parents=True, exist_ok=True)
    with open(log / "stdout", "w") as out, open(log / "stderr", "w") as err:
        code = subprocess.run(
            [*launcher(nproc), tool, *args], stdout=out, stderr=err, timeout=600, cwd=ROOT
        ).returncode
    return code, (log / "stderr").read_text()


def _ok(result: tuple[int, str]) -> None:
    assert result[0] == 0, f"exit {result[0]}\n{result[1][-5000:]}"


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    # 6 text layers: at PP2 stage 0 holds layers 0-2, where deepstack adds its features
    return {
        name: save_tiny_vlm(tmp_path_factory.mktemp(name), tiny_vlm_config(moe=moe, num_layers=6), seed=5)
        for name, (moe, _, _) in MODELS.items()
    }


@pytest.fixture(scope="module")
def converted(originals: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    """Each original converted to megatron by the CLI on 4 ranks at its layout."""
    out = {}
    for name, (_, layout, _) in MODELS.items():
        out[name] = tmp_path_factory.mktemp(f"{name}-mcore")
        args = ["--hf-dir", str(originals[name]), "--output-dir", str(out[name]), *layout]
        _ok(run(TO_MEGATRON, *args, log=tmp_path_factory.mktemp(f"{name}-log"), nproc=4))
    return out


def _image_inputs(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoProcessor

    from tests.vlm_reference import image_batch

    return dict(image_batch(AutoProcessor.from_pretrained(path)))


def _logits(path: Path, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    from transformers import AutoModelForImageTextToText

    with torch.no_grad():
        return AutoModelForImageTextToText.from_pretrained(path).eval()(**inputs).logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_bit_exact_and_loadable(
    name: str, originals: dict[str, Path], converted: dict[str, Path], tmp_path: Path
) -> None:
    hf_dir, mcore, back = originals[name], converted[name], tmp_path / "hf"
    meta = json.loads((mcore / "megatron_sapo.json").read_text())
    assert meta["world_size"] == 4 and meta["model_type"] == ("qwen3_vl_moe" if "moe" in name else "qwen3_vl")
    args = ["--megatron-dir", str(mcore), "--output-dir", str(back), "--max-shard-size", "300KB"]
    _ok(run(TO_HF, *args, log=tmp_path / "log", nproc=MODELS[name][2]))

    assert len(list(back.glob("*.safetensors"))) > 1  # several size-bounded shards
    original, converted_back = load_checkpoint(hf_dir), load_checkpoint(back)
    assert sorted(converted_back) == sorted(original)
    for key, tensor in original.items():
        got = converted_back[key]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), key
    if "moe" in name:  # experts fused per layer in the official orientation [E, H, 2I], not per expert
        assert converted_back["model.language_model.layers.5.mlp.experts.gate_up_proj"].shape == (4, 64, 96)
    for file in ASSETS:
        assert (back / file).read_bytes() == (hf_dir / file).read_bytes(), file

    inputs, inputs_back = _image_inputs(hf_dir), _image_inputs(back)
    assert sorted(inputs_back) == sorted(inputs) and "pixel_values" in inputs
    assert all(torch.equal(inputs_back[k], inputs[k]) for k in inputs), sorted(inputs)
    assert torch.equal(_logits(back, inputs), _logits(hf_dir, inputs))


def _load_at_tp1(rank: int, world_size: int, mcore: str, inputs: dict) -> torch.Tensor:
    from megatron_sapo.convert import ParallelConfig, load_megatron_model, parallel_session
    from megatron_sapo.megatron.cpu import causal_attention_mask
    from tests.vlm_reference import mrope_positions

    with parallel_session(ParallelConfig()), torch.no_grad():
        chunks, hf_config, _ = load_megatron_model(mcore)
        ids = inputs["input_ids"]
        b, t = ids.shape
        positions = mrope_positions(inputs, hf_config)
        grids = dict(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        return chunks[0].eval()(ids, positions, causal_attention_mask(t, b), **grids)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_megatron_checkpoint_loads_at_another_layout(
    name: str, originals: dict[str, Path], converted: dict[str, Path]
) -> None:
    """Saved at TP2 x PP2 / PP2 x EP2 on 4 ranks, loaded by one rank (torch_dist reshards): logits match."""
    inputs = _image_inputs(originals[name])
    (logits,) = run_on_ranks(_load_at_tp1, world_size=1, args=(str(converted[name]), inputs))
    expected = _logits(originals[name], inputs)
    real = inputs["attention_mask"].bool()
    err = (logits[..., : expected.shape[-1]][real] - expected[real]).abs().max().item()
    print(f"{name} loaded at TP1: max |megatron - transformers| logit = {err:.2e}")
    assert err <= LOGIT_TOL, f"{name}: max |megatron TP1 - transformers| logit = {err:.2e}"


def test_fused_experts_written_one_expert_at_a_time(
    converted: dict[str, Path], originals: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    """Megatron -> HF of the MoE into one shard: each fused expert tensor reaches the writer as single
    experts, and the tensors alive while one is written (read from the checkpoint or given to the writer)
    never add up to a layer's experts."""
    from megatron_sapo.convert import to_hf

    live = LiveStorages()
    fused_writes: dict[str, list[int]] = {}
    peak = [0]
    track = live.track

    def write(self, name: str, tensor: torch.Tensor, *, start: int | None = None) -> None:
        if start is not None:
            assert tensor.shape[0] == 1, (name, tuple(tensor.shape))
            fused_writes.setdefault(name, []).append(start)
            peak[0] = max(peak[0], live.bytes + tensor.nbytes)
        original_write(self, name, track(tensor), start=start)

    read, original_write = to_hf.DistCheckpointReader.read, to_hf.ShardWriter.write
    monkeypatch.setattr(to_hf.DistCheckpointReader, "read", lambda self, *a: track(read(self, *a)))
    monkeypatch.setattr(to_hf.ShardWriter, "write", write)
    out = tmp_path / "hf"
    to_hf.megatron_to_hf(converted["moe-pp2ep2"], out, max_shard_bytes=1 << 30, progress=False)

    original = load_checkpoint(originals["moe-pp2ep2"])
    fused = sorted(k for k in original if k.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert sorted(fused_writes) == fused and all(w == [0, 1, 2, 3] for w in fused_writes.values())
    layer = original["model.language_model.layers.0.mlp.experts.gate_up_proj"].nbytes  # 4 experts
    print(f"alive while writing fused experts: {peak[0]} B at most; one layer's gate_up_proj: {layer} B")
    assert 0 < peak[0] <= layer // 2, (peak[0], layer)  # an expert read and its block written: 2 of 4
    assert all(torch.equal(load_checkpoint(out)[k], t) for k, t in original.items())


def _without_processor(h: Path, t: Path) -> list[str]:
    path = Path(shutil.copytree(h, t / "copy"))
    (path / "processor_config.json").unlink()
    return ["--hf-dir", str(path)]


def _config_changed(**changes):
    def make(h: Path, t: Path) -> list[str]:
        path = Path(shutil.copytree(h, t / "copy"))
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, **changes}))
        return ["--hf-dir", str(path)]

    return make


ERRORS = {
    # case: (args builder(original dir, tmp) -> args, words the one-line message must contain)
    "no-processor": (_without_processor, ["no processor files", "processor_config.json", "qwen3_vl_moe"]),
    "image-token-id": (_config_changed(image_token_id=9), ["<|image_pad|>", "has id 6", "image_token_id=9"]),
    "deepstack-stage": (
        lambda h, t: ["--hf-dir", str(h), "--pp", "3"],  # 2 of 6 layers on stage 0, deepstack needs 3
        ["--pp=3", "first pipeline stage", "3 deepstack layers"],
    ),
    "unknown-vlm": (_config_changed(model_type="qwen2_5_vl"), ["unknown architecture", "qwen2_5_vl"]),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_user_errors_are_one_line(case: str, originals: dict[str, Path], tmp_path: Path) -> None:
    make_args, words = ERRORS[case]
    args = [*make_args(originals["moe-pp2ep2"], tmp_path), "--output-dir", str(tmp_path / "out")]
    code, stderr = run(TO_MEGATRON, *args, log=tmp_path / "log")
    assert code == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert all(word in errors[0] for word in words), errors[0]
    assert not (tmp_path / "out").exists()
