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
    if dist.get_rank() == 0 and not (target / "config.json").exists():
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
