"""Tiny offline models: a tokenizer trained locally in seconds and random-weight HF checkpoints.

Nothing can be downloaded here, so the quickstart, the examples and the tests build their models from
a transformers config with seeded random weights and a byte-level BPE tokenizer trained on a small
corpus (any string still encodes: byte fallback).

    tok = train_tokenizer(corpus_lines, vocab_size=512)
    path = save_tiny_model("out/hf", Qwen3MoeConfig(...), tok, seed=0)   # config + safetensors + tokenizer
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def default_corpus(lines: int = 2000, seed: int = 0) -> list[str]:
    """Arithmetic-flavoured text with digits and a few words, enough for a small BPE."""
    rng = random.Random(seed)
    words = [
        "the",
        "answer",
        "is",
        "what",
        "plus",
        "minus",
        "times",
        "equals",
        "sum",
        "of",
        "and",
        "compute",
        "user",
        "assistant",
        "step",
    ]
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        out.append(f"{' '.join(rng.choices(words, k=rng.randint(2, 8)))} {a} + {b} = {a + b}.")
    return out


def train_tokenizer(
    corpus: Iterable[str] | None = None, *, vocab_size: int = 512, extra_special_tokens: tuple[str, ...] = ()
) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen-style chat special tokens (plus `extra_special_tokens`, e.g. the vision
    tokens of `tiny_vlm.py`); eos = <|im_end|>, pad = <|pad|>."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special_tokens],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else default_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>", *extra_special_tokens],
    )


@torch.no_grad()
def save_tiny_model(
    out_dir: str | Path, config: PretrainedConfig, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0
) -> Path:
    """A random fp32 causal LM from `config`, saved with its tokenizer (checkpoint names, safetensors).

    The config's vocab_size must cover the tokenizer; eos/pad ids are taken from the tokenizer.
    """
    if config.vocab_size < len(tokenizer):
        raise ValueError(f"config.vocab_size {config.vocab_size} < tokenizer size {len(tokenizer)}")
    config.eos_token_id = tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    config.bos_token_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
