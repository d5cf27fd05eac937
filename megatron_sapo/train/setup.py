"""Set-up of a `megatron-sapo train` process: where it runs, torch.distributed + megatron's parallel
state (megatron/parallel.py), the HF directory the run starts from (the embedded tiny model is built
here) and the policy's TransformerConfig (`model.dtype`, `parallel.*`). Every function says which ranks
call it. Used by `train/loop.py`; tests: tests/e2e/test_trainer.py, tests/e2e/test_multirank.py,
tests/unit/test_parallel.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from megatron_sapo.cluster.launch import Launch, every_node_engines, resolve
from megatron_sapo.megatron.parallel import (
    LayoutError,
    check_layout,
    device,
    gpu_count,
    init_parallel,
    init_process_group,
)
from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.utils.spawn import free_port

if TYPE_CHECKING:
    from megatron.core.transformer import TransformerConfig

log = logging.getLogger(__name__)


def init_distributed(cfg: TrainJobConfig) -> Launch:
    """All processes: where this one runs (`launch.resolve`); trainers also join torch.distributed
    (env://, from srun / torchrun / nothing) and build megatron's parallel state. Engine-node processes
    of a disaggregated run return at once (they never join the trainers' group). A layout, `model.dtype`
    or device this machine cannot honour is a LayoutError before any process group is joined."""
    check_layout(cfg.parallel, dtype=cfg.model.dtype)
    launch = resolve(os.environ, cfg.cluster, cfg.parallel, cuda_devices=gpu_count())
    if every_node_engines(launch, cfg.cluster) and cfg.rollout.weight_sync.transport == "tensor":
        raise LayoutError(
            f"rollout.weight_sync.transport 'tensor' reaches only the engines on trainer rank 0's node; "
            f"cluster.colocated_engines 'every_node' on {len(launch.train_nodes)} nodes needs 'distributed' or "
            "'disk' (or cluster.colocated_engines 'first_node')"
        )
    if launch.role == "engine":
        return launch
    if not dist.is_initialized():
        port = launch.master_port or free_port()
        if (os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")) != (launch.master_addr, str(port)):
            # our own rendezvous, not torchrun's agent store (disaggregated renumbering)
            os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        os.environ.update(
            RANK=str(launch.rank),
            WORLD_SIZE=str(launch.world_size),
            LOCAL_RANK=str(launch.local_rank),
            LOCAL_WORLD_SIZE=str(launch.local_world_size),
            MASTER_ADDR=launch.master_addr,
            MASTER_PORT=str(port),
        )
        init_process_group(local_rank=launch.local_rank)  # srun --gpus-per-task: one device each
    p = cfg.parallel
    if dist.get_rank() == 0:
        log.warning("%s; layout tp=%d pp=%d ep=%d etp=%s", launch.describe(), p.tp, p.pp, p.ep, p.etp or p.tp)
    init_parallel(p, seed=cfg.run.seed)  # checks the layout against the world size first
    if device().type == "cpu" and cfg.run.cpu_threads:
        torch.set_num_threads(cfg.run.cpu_threads)  # the tiny CPU models run fastest on one (run.cpu_threads)
    return launch


def model_config(cfg: TrainJobConfig, hf_config: Any) -> TransformerConfig:
    """All trainer ranks: the policy's TransformerConfig at `parallel.*` in `model.dtype`; a LayoutError
    first when the layout does not split this model or this machine cannot honour the settings (the world
    size was checked by `init_distributed`)."""
    from megatron_sapo.megatron.models import transformer_config_from_hf

    p = cfg.parallel
    check_layout(p, hf_config=hf_config, dtype=cfg.model.dtype)
    return transformer_config_from_hf(hf_config, **p.as_dict(), dtype=getattr(torch, cfg.model.dtype))


def model_dir(cfg: TrainJobConfig) -> Path:
    """The HF directory the run starts from: `model.path`, or where the tiny model is built."""
    return Path(cfg.model.path) if cfg.model.path is not None else Path(cfg.run.output_dir) / "hf_init"


def prepare_model(cfg: TrainJobConfig, out: Path) -> Path:
    """All ranks (rank 0 writes): the HF directory the run starts from (the tiny model is built once)."""
    target = model_dir(cfg)
    if cfg.model.path is not None:
        return target
    if dist.get_rank() == 0 and not (target / "config.json").exists() and cfg.model.tiny.vision:
        _save_tiny_vlm(cfg, target.with_name("hf_init.tmp"))
        target.with_name("hf_init.tmp").rename(target)
    elif dist.get_rank() == 0 and not (target / "config.json").exists():
        from megatron_sapo.utils.tiny import save_tiny_model, train_tokenizer

        t = cfg.model.tiny
        task = cfg.data.synthetic
        # prompts as the chat template renders them, without answers: answer digits stay single
        # tokens (byte fallback), which a tiny model learns much faster than merged numbers
        corpus = [
            f"<|im_start|>user\n{r.prompt}<|im_end|>\n<|im_start|>assistant\n"
            for r in task.records(1000, seed=12345)
        ]
        tokenizer = train_tokenizer(corpus, vocab_size=t.vocab)
        save_tiny_model(
            target.with_name("hf_init.tmp"), _tiny_config(cfg, len(tokenizer)), tokenizer, seed=cfg.run.seed
        )
        target.with_name("hf_init.tmp").rename(target)
    dist.barrier()
    return target


def _save_tiny_vlm(cfg: TrainJobConfig, out: Path) -> None:
    """The tiny Qwen3-VL(-MoE) with a BPE trained on the visual task's prompts and answers (each answer
    word becomes one token), the vision tokens and the processor (`utils/tiny_vlm.py`)."""
    from megatron_sapo.data.visual_task import VisualTask
    from megatron_sapo.utils.tiny_vlm import save_tiny_vlm, tiny_vlm_config, train_vlm_tokenizer

    t = cfg.model.tiny
    task = VisualTask(**{k: getattr(cfg.data.visual, k) for k in VisualTask.__dataclass_fields__})
    records = task.records(200, seed=12345)
    corpus = [
        f"<|im_start|>user\n{r.prompt.replace('<image>', '')}<|im_end|>\n<|im_start|>assistant\n"
        for r in records
    ]
    # each answer repeated 5x as often as the prompts: its byte pairs are merged first, so every answer
    # word is one token (a 5-token "yellow" would not fit in a few new tokens, nor be learned quickly)
    corpus += [a for a in task.answers() for _ in range(5 * len(records))]
    tokenizer = train_vlm_tokenizer(corpus, vocab_size=t.vocab)
    config = tiny_vlm_config(
        moe=t.architecture == "qwen3_vl_moe",
        vocab_size=max(len(tokenizer), t.vocab),
        hidden_size=t.hidden,
        num_layers=t.layers,
        vision_depth=t.vision_depth,
        vision_hidden=t.vision_hidden,
        num_experts=t.experts,
        num_heads=t.heads,
        num_kv_heads=t.kv_heads,
        intermediate_size=t.ffn,
        top_k=t.top_k,
        moe_intermediate_size=t.moe_ffn,
    )
    side = task.image_size
    save_tiny_vlm(
        out, config, tokenizer, seed=cfg.run.seed, min_pixels=32 * 32, max_pixels=max(side * side, 128 * 128)
    )


def _tiny_config(cfg: TrainJobConfig, vocab: int) -> Any:
    from transformers import Qwen3Config, Qwen3MoeConfig

    t = cfg.model.tiny
    common = dict(
        vocab_size=max(vocab, t.vocab),
        hidden_size=t.hidden,
        num_hidden_layers=t.layers,
        num_attention_heads=t.heads,
        num_key_value_heads=t.kv_heads,
        head_dim=t.head_dim,
        intermediate_size=t.ffn,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    if t.architecture == "qwen3":
        return Qwen3Config(**common)
    return Qwen3MoeConfig(
        **common,
        num_experts=t.experts,
        num_experts_per_tok=t.top_k,
        moe_intermediate_size=t.moe_ffn,
        norm_topk_prob=True,
    )


def load_tokenizer_and_config(hf_dir: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    return AutoTokenizer.from_pretrained(hf_dir), AutoConfig.from_pretrained(hf_dir)


def load_processor(hf_dir: Path, hf_config: Any) -> Any:
    """A vision-language policy's processor (`AutoProcessor`, the model's own), or None for a text model."""
    if getattr(hf_config, "vision_config", None) is None:
        return None
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(hf_dir)
