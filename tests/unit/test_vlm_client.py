"""The SGLang client's view of a vision-language checkpoint: sizes read from its `text_config`.

The client checks prompt ids against the vocab size and shapes returned routing as [tokens, layers,
top_k]; a Qwen3-VL(-MoE) config.json keeps both under `text_config` (read without SGLang).
Run: `python -m pytest tests/unit/test_vlm_client.py -q` (seconds).
"""

from __future__ import annotations

import json

import pytest

from megatron_sapo.rollout.client import _model_sizes
from megatron_sapo.utils.tiny_vlm import save_tiny_vlm, tiny_vlm_config


@pytest.mark.parametrize("moe,top_k", [(False, 0), (True, 2)])
def test_vocab_and_experts_per_token_come_from_text_config(moe, top_k, tmp_path) -> None:
    path = save_tiny_vlm(tmp_path, tiny_vlm_config(moe=moe, vocab_size=704), seed=0)
    config = json.loads((path / "config.json").read_text())
    assert "vocab_size" not in config and "num_experts_per_tok" not in config  # nested only
    assert _model_sizes(str(path)) == (704, top_k)
