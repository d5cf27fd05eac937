"""The pieces of an RL run around the loop in `trainer.py`: processes, model, data, engine, eval, outputs.

Kept apart so the loop reads as the algorithm. Every function says which ranks call it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megatron_sapo.data import PromptRecord, load_records, render_prompt
from megatron_sapo.data.synthetic import ArithmeticTask
from megatron_sapo.launch import (
    Launch,
    LayoutError,
    check_parallel_layout,
    engine_urls,
    every_node_engines,
    resolve,
)
from megatron_sapo.rollout import SamplingParams
from megatron_sapo.run_config import JobConfig
from megatron_sapo.utils.spawn import free_port

log = logging.getLogger(__name__)


# ---- processes ---------------------------------------------------------------------------------
def init_distributed(cfg: JobConfig) -> Launch:
    """All processes: where this one runs (`launch.resolve`); trainers also join torch.distributed
    (env://, from srun / torchrun / nothing) and build megatron's parallel state. Engine-node processes
    of a disaggregated run return at once (they never join the trainers' group)."""
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    launch = resolve(os.environ, cfg.cluster, cfg.parallel, cuda_devices=cuda)
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
        if cuda:  # srun --gpus-per-task shows each task one device
            torch.cuda.set_device(launch.local_rank % cuda)
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://")
    check_parallel_layout(cfg.parallel, dist.get_world_size())
    p = cfg.parallel
    if dist.get_rank() == 0:
        log.warning("%s; layout tp=%d pp=%d ep=%d etp=%s", launch.describe(), p.tp, p.pp, p.ep, p.etp or p.tp)
    if torch.cuda.is_available():
        from megatron.core import parallel_state, tensor_parallel

        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=p.tp,
            pipeline_model_parallel_size=p.pp,
            virtual_pipeline_model_parallel_size=p.vpp,
            expert_model_parallel_size=p.ep,
            expert_tensor_parallel_size=p.etp,
        )
        tensor_parallel.model_parallel_cuda_manual_seed(cfg.run.seed)
    else:
        from megatron_sapo.megatron.testing import init_megatron_cpu

        init_megatron_cpu(tp=p.tp, pp=p.pp, ep=p.ep, vpp=p.vpp, seed=cfg.run.seed)
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)
    return launch


# ---- model -------------------------------------------------------------------------------------
def prepare_model(cfg: JobConfig, out: Path) -> Path:
    """All ranks (rank 0 writes): the HF directory the run starts from (the tiny model is built once)."""
    if cfg.model.path is not None:
        return Path(cfg.model.path)
    target = out / "hf_init"
    if dist.get_rank() == 0 and not (target / "config.json").exists():
        from megatron_sapo.tiny import save_tiny_model, train_tokenizer

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


def _tiny_config(cfg: JobConfig, vocab: int) -> Any:
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


# ---- data --------------------------------------------------------------------------------------
@dataclass
class RunData:
    """Train/eval records with their prompt token ids; batches are deterministic in (seed, offset)."""

    train: list[PromptRecord]
    train_ids: list[list[int]]
    eval: list[PromptRecord]
    eval_ids: list[list[int]]
    tokenizer: Any
    sft_targets: list[str]
    seed: int

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.train)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def train_batch(self, offset: int, n: int) -> tuple[list[PromptRecord], list[list[int]]]:
        idx = [self._order(i // len(self.train))[i % len(self.train)] for i in range(offset, offset + n)]
        return [self.train[i] for i in idx], [self.train_ids[i] for i in idx]

    def train_prompt_ids(self, offset: int, n: int) -> list[list[int]]:
        return self.train_batch(offset, n)[1]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def sft_batches(self, batch_size: int, steps: int, *, seed: int) -> Iterator[list[tuple[list[int], int]]]:
        """(prompt + target + EOS tokens, response start) batches for the supervised cold start."""
        eos = self.tokenizer.eos_token_id
        for step in range(steps):
            rng = random.Random(seed * 7 + step)
            batch = []
            for i in rng.sample(range(len(self.train)), min(batch_size, len(self.train))):
                target = self.tokenizer(self.sft_targets[i], add_special_tokens=False)["input_ids"] + [eos]
                batch.append((self.train_ids[i] + target, len(self.train_ids[i])))
            yield batch


def load_data(cfg: JobConfig, tokenizer: Any) -> RunData:
    """All ranks: records from files or the synthetic task, prompts rendered with the chat template."""
    d = cfg.data
    synthetic = d.format == "synthetic" or (d.format == "auto" and d.train_path is None)
    if synthetic:
        task = ArithmeticTask(
            **{
                k: getattr(d.synthetic, k) for k in ArithmeticTask.__dataclass_fields__
            }  # the task's own fields
        )
        train, evals = task.splits(d.synthetic.n_train, d.synthetic.n_eval, seed=d.synthetic.seed)
        targets = [task.sft_text(r) for r in train]
    else:
        kw = dict(
            format="auto" if d.format == "auto" else d.format,
            prompt_field=d.prompt_field,
            answer_field=d.answer_field,
            answer_extract=d.answer_extract,
        )
        train = load_records(d.train_path, **kw)
        evals = load_records(d.eval_path, **kw) if d.eval_path else []
        targets = [r.answer for r in train]

    def render(records: list[PromptRecord]) -> list[list[int]]:
        return [
            render_prompt(
                r,
                tokenizer,
                apply_chat_template=d.apply_chat_template,
                system_prompt=d.system_prompt,
                max_prompt_tokens=d.max_prompt_tokens,
            )
            for r in records
        ]

    return RunData(train, render(train), evals, render(evals), tokenizer, targets, cfg.run.seed)


# ---- engine, rewards, eval --------------------------------------------------------------------
def build_engine(cfg: JobConfig, hf_dir: Path, out: Path, launch: Launch) -> Any:
    """Rank 0: the rollout engine: servers on other nodes by URL (disaggregated engine nodes, or every
    train node's colocated ones), given URLs, servers launched on this node (colocated), or the
    in-process engine."""
    r = cfg.rollout
    if r.engine == "transformers":
        from megatron_sapo.rollout.hf_engine import TransformersEngine

        return TransformersEngine(str(hf_dir), seed=cfg.run.seed)
    from megatron_sapo.engine_nodes import server_configs, wait_for_engines
    from megatron_sapo.rollout import SGLangEngine, SGLangServer

    urls = engine_urls(launch, cfg.cluster, r.num_engines)
    if urls:
        wait_for_engines(urls, r.server.startup_timeout)
        return SGLangEngine(urls, model_path=str(hf_dir))
    if r.urls:
        return SGLangEngine(r.urls, model_path=str(hf_dir))
    server_config = r.server_config(str(hf_dir))
    server_config.log_dir = server_config.log_dir or str(out / "logs")
    servers = [SGLangServer(c) for c in server_configs(server_config, r.num_engines)]
    for s in servers:  # all load in parallel, then wait for each
        s.launch()
    for s in servers:
        s.wait_ready(s.config.startup_timeout)
    return SGLangEngine(servers)


def weight_sync_config(cfg: JobConfig, launch: Launch) -> Any:
    """The weight sync settings; "distributed" to other nodes' engines meets at trainer rank 0's node.

    The node's name, not its address here: the engines resolve it on their side (a name that maps to
    127.0.1.1 in this node's /etc/hosts still reaches this node from the others)."""
    ws = cfg.rollout.weight_sync
    remote = launch.engine_nodes or every_node_engines(launch, cfg.cluster)
    if remote and ws.transport == "distributed" and ws.master_address == "127.0.0.1":
        return dataclasses.replace(ws, master_address=launch.master_addr)
    return ws


def colocated_gpu_engine(cfg: JobConfig, engine: Any) -> bool:
    """Rank 0: the engine's servers share the train nodes' GPUs with the trainers (their memory is lent)."""
    from megatron_sapo.rollout import SGLangEngine

    return (
        isinstance(engine, SGLangEngine)
        and cfg.cluster.placement == "colocated"
        and cfg.rollout.server.device == "cuda"
        and not cfg.rollout.urls  # the job's own servers, launched here or on every train node
    )


def build_reward_runner(cfg: JobConfig) -> Any:
    from megatron_sapo.rewards import RewardRunner, get_reward

    return RewardRunner(get_reward(cfg.reward.name), timeout_s=cfg.reward.timeout_s)


def evaluate(cfg: JobConfig, engine: Any, data: RunData, rewards: Any) -> dict[str, float]:
    """Rank 0 (others return {}): greedy accuracy on the eval set (reward > 0.5 counts as correct)."""
    if dist.get_rank() != 0 or not data.eval:
        return {}
    params = SamplingParams(max_new_tokens=cfg.rollout.sampling.max_new_tokens, temperature=0.0)
    gens = engine.generate(data.eval_ids, params, n=cfg.run.eval_samples)
    texts = [g.text if g.text is not None else data.decode(g.token_ids) for g in gens]
    scores, _ = rewards.score(texts, [data.eval[g.prompt_index] for g in gens])
    return {"eval/accuracy": sum(s > 0.5 for s in scores) / len(scores)}


# ---- outputs -----------------------------------------------------------------------------------
class MetricsWriter:
    """Rank 0: metrics.jsonl (one object per step), TensorBoard events, plots at the end."""

    def __init__(self, out: Path, cfg: JobConfig, *, resume_step: int) -> None:
        self.out, self.cfg = out, cfg
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "metrics.jsonl"
        rows = [json.loads(x) for x in self.path.read_text().splitlines()] if self.path.exists() else []
        # a resumed run rewrites the steps after its checkpoint (they were lost with the crash)
        self.rows = [r for r in rows if r["step"] <= resume_step]
        self.path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.tb = None
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "run.tensorboard needs the tensorboard package (pip install tensorboard)"
                ) from e

            # purge_step: a resumed run hides the events of the steps it redoes (lost with the crash)
            self.tb = SummaryWriter(
                str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None
            )
        self.wandb = None
        if cfg.run.wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise RuntimeError(
                    "run.wandb_project is set but wandb is not installed (pip install wandb)"
                ) from e
            self.wandb = wandb.init(project=cfg.run.wandb_project, dir=str(out), resume="allow")
        self.bar = None
        if cfg.run.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.run.steps, initial=resume_step, desc="RL steps", unit="step")

    def write(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, row["step"])
            self.tb.flush()  # on disk every step: a crash loses nothing that metrics.jsonl has
        if self.wandb is not None:
            self.wandb.log(row, step=row["step"])
        if self.bar is not None and row["step"] > self.bar.n:
            self.bar.update(row["step"] - self.bar.n)
            self.bar.set_postfix({k: round(row[k], 3) for k in ("reward/mean", "eval/accuracy") if k in row})
        shown = {k: row[k] for k in ("reward/mean", "loss", "eval/accuracy", "time/step_s") if k in row}
        log.info("step %d %s", row["step"], " ".join(f"{k}={v:.4g}" for k, v in shown.items()))

    def log_sft(self, step: int, metrics: dict[str, float], seconds: float) -> None:
        log.info("cold start step %d: loss %.4f (%.0f s)", step, metrics["loss"], seconds)

    def summary(self) -> None:
        """The end-of-run lines a user looks for: accuracy after the cold start vs at the end, and paths."""
        evals = [(r["step"], r["eval/accuracy"]) for r in self.rows if "eval/accuracy" in r]
        lines = []
        if len(evals) >= 2:
            (s0, a0), (s1, a1) = evals[0], evals[-1]
            lines.append(
                f"eval accuracy: {a0:.2f} at step {s0} (after the cold start) -> {a1:.2f} at step {s1} "
                f"({100 * (a1 - a0):+.0f} points)"
            )
        lines += [f"plots: {self.out / 'plots'}", f"Hugging Face checkpoint: {self.out / 'hf'}"]
        log.warning("\n".join(lines))  # WARNING: shown even when INFO progress logs are off

    def finish(self) -> None:
        from megatron_sapo.plots import plot_run

        plot_run(self.rows, self.out / "plots")
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.bar is not None:
            self.bar.close()


def export_final_hf(cfg: JobConfig, policy: Any, hf_config: Any, hf_dir: Path, out: Path) -> None:
    """All ranks (collective export; rank 0 writes): the final policy as a HF checkpoint in <out>/hf."""
    from megatron_sapo.bridge import export_hf_weights
    from megatron_sapo.convert.assets import write_hf_snapshot

    buckets = export_hf_weights(policy.model, hf_config)
    if dist.get_rank() != 0:
        for _ in buckets:
            pass
        return
    target = write_hf_snapshot(chain.from_iterable(buckets), out / "hf", assets_from=hf_dir)
    log.info("final Hugging Face checkpoint: %s", target)
