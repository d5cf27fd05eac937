"""Real SGLang servers for the e2e tier: one tiny dense Qwen3 and one tiny Qwen3-MoE, started once.

Tests that change a server's weights must not rely on them afterwards; `reset_weights` puts the
original checkpoint back (SGLang's own update_weights_from_disk) and returns an engine for it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import Qwen3Config, Qwen3MoeConfig

from megatron_sapo.rollout.client import SGLangEngine
from megatron_sapo.rollout.server import ServerConfig, SGLangServer
from megatron_sapo.utils.tiny import save_tiny_model, train_tokenizer
from tests.e2e.helpers import running

_COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def tiny_configs() -> dict[str, object]:
    return {
        "dense": Qwen3Config(**_COMMON),
        "moe": Qwen3MoeConfig(
            **_COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
        ),
    }


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    tok = train_tokenizer(vocab_size=300)
    # std 0.2 instead of HF's 0.02: peaked distributions, so weight changes move log-probs visibly
    out = {}
    for name, config in tiny_configs().items():
        config.initializer_range = 0.2
        out[name] = save_tiny_model(root / name, config, tok, seed=1)
    return out


@pytest.fixture(scope="session")
def sglang_servers(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    logs = tmp_path_factory.mktemp("sglang_logs")
    servers = {
        name: SGLangServer(ServerConfig(model_path=str(p), log_dir=str(logs)))
        for name, p in tiny_models.items()
    }
    with running(servers):
        yield servers


@pytest.fixture
def reset_weights(sglang_servers: dict[str, SGLangServer], tiny_models: dict[str, Path]):
    """reset_weights("dense") -> an SGLangEngine serving the original checkpoint (version "orig")."""

    def reset(name: str) -> SGLangEngine:
        server = sglang_servers[name]
        if not server.healthy():
            server.restart()
        engine = SGLangEngine([server], model_path=str(tiny_models[name]))
        engine.request(
            engine.endpoints[0],
            "POST",
            "/update_weights_from_disk",
            {"model_path": str(tiny_models[name]), "weight_version": "orig"},
        )
        server.model_path, server.weight_version = str(tiny_models[name]), "orig"
        return engine

    return reset
