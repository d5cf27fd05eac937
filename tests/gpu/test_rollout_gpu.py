"""SGLang on GPU: colocated memory release/resume and CUDA-IPC weight sync (skipped without CUDA).

Needs a full SGLang install (its CUDA kernels; the lean CPU set is not enough). A tiny dense Qwen3 is
served with GPU flags; the test releases the server's weights and KV cache, resumes them, pushes the
original weights again from CUDA tensors through `update_weights_from_tensor` (CUDA IPC handles) and
checks the served log-probs against transformers' fp32 forward within bf16 tolerance.

    python -m pytest tests/gpu/test_rollout_gpu.py -q -rs
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, Qwen3Config

from megatron_sapo.rollout.client import SGLangEngine
from megatron_sapo.rollout.server import ServerConfig, SGLangServer
from megatron_sapo.rollout.sglang_updates import SGLangWeightUpdater
from megatron_sapo.rollout.types import SamplingParams
from megatron_sapo.utils.tiny import save_tiny_model, train_tokenizer


def test_release_resume_and_cuda_ipc_sync(tmp_path) -> None:
    pytest.importorskip("sgl_kernel", reason="needs the full (GPU) SGLang install")
    config = Qwen3Config(
        vocab_size=320,
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    model_dir = save_tiny_model(tmp_path / "hf", config, train_tokenizer(vocab_size=300), seed=1)
    server = SGLangServer(
        ServerConfig(model_path=str(model_dir), device="cuda", mem_fraction_static=0.3, log_dir=str(tmp_path))
    )
    with server:
        engine = SGLangEngine([server])
        engine.release_memory()
        engine.resume_memory()
        state = load_file(model_dir / "model.safetensors")
        updater = SGLangWeightUpdater(engine)
        updater.begin()
        bucket = [(k, v.to("cuda", torch.bfloat16)) for k, v in state.items()]
        updater.load_tensors(bucket)
        updater.end()
        updater.finish("ipc")
        gens = engine.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=8), n=2)
    assert {g.weight_version for g in gens} == {"ipc"}
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for g in gens:
        ids = torch.tensor([g.prompt_ids + g.token_ids])
        with torch.no_grad():
            logp = torch.log_softmax(ref(ids).logits[0, len(g.prompt_ids) - 1 : -1], -1)
        expected = logp.gather(-1, torch.tensor(g.token_ids)[:, None])[:, 0]
        assert (torch.tensor(g.logprobs) - expected).abs().max() < 0.05  # bf16 engine vs fp32 reference
