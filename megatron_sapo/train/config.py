"""The root of a `megatron-sapo train` config (`TrainJobConfig`) and the sections only the run layer reads.

    cfg = load_config(TrainJobConfig, "configs/quickstart.yaml", ["rollout.sampling.temperature=0.7"])
    engine = PolicyEngine(provider, cfg.optim, cfg.loss, temperature=cfg.rollout.sampling.temperature)

Every other section is defined beside the component that reads it and is handed only its own section:
`parallel` (megatron/parallel.py), `loss` and `optim` (megatron/engine.py), `rollout`
(rollout/config.py), `data` (data/config.py), `reward` (rewards/config.py), `cluster` (cluster/config.py).
Here: `model` (the starting policy), `sft` (the cold start), `run` (length, seed, evaluation, checkpoints,
logging) and the checks that span sections. Defaults suit the tiny CPU quickstart where a value has no
better general default. `megatron-sapo train --help` lists every key.
Tests: tests/unit/test_config.py, tests/unit/test_config_keys.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_sapo.cluster.config import ClusterConfig
from megatron_sapo.data.config import DataConfig
from megatron_sapo.megatron.engine import LossConfig, OptimConfig
from megatron_sapo.megatron.parallel import ParallelConfig
from megatron_sapo.rewards.config import RewardConfig
from megatron_sapo.rollout.config import RolloutConfig
from megatron_sapo.utils.typed_config import check, check_min

__all__ = ["ModelConfig", "RunSettings", "SFTConfig", "TinyModelConfig", "TrainJobConfig"]


@dataclass
class TinyModelConfig:
    """Sizes of the embedded tiny random model (used when `model.path` is null)."""

    architecture: Literal["qwen3_moe", "qwen3", "qwen3_vl_moe", "qwen3_vl"] = "qwen3_moe"
    """Hugging Face architecture family: "qwen3_moe" (Mixture-of-Experts) or "qwen3" (dense); the
    vision-language "qwen3_vl_moe" / "qwen3_vl" (Qwen3-VL with a tiny vision tower: needs layers >= 3 and
    head_dim 16, for the synthetic visual task, `data.synthetic.task` "visual")."""
    hidden: int = 64
    """Hidden size."""
    layers: int = 2
    """Number of transformer layers."""
    heads: int = 4
    """Attention (query) heads."""
    kv_heads: int = 2
    """Key/value heads (grouped-query attention); must divide `heads`."""
    head_dim: int = 16
    """Size of one attention head."""
    ffn: int = 128
    """Dense MLP intermediate size (qwen3)."""
    experts: int = 4
    """Routed experts per MoE layer (qwen3_moe)."""
    top_k: int = 2
    """Experts each token is routed to (qwen3_moe)."""
    moe_ffn: int = 64
    """Intermediate size of one expert (qwen3_moe)."""
    vocab: int = 512
    """Vocabulary of the locally trained BPE tokenizer, and of the model."""
    vision_hidden: int = 32
    """Vision tower hidden size (qwen3_vl / qwen3_vl_moe)."""
    vision_depth: int = 3
    """Vision tower blocks (qwen3_vl / qwen3_vl_moe; >= 3, its deepstack taps the last three)."""

    @property
    def vision(self) -> bool:
        """A vision-language architecture."""
        return self.architecture.startswith("qwen3_vl")

    def __post_init__(self) -> None:
        check_min(self, "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "experts", "top_k")
        check_min(self, "moe_ffn", "vocab")
        check(
            self.heads % self.kv_heads == 0, "kv_heads", f"{self.kv_heads} does not divide heads={self.heads}"
        )
        check(self.top_k <= self.experts, "top_k", f"{self.top_k} is more than experts={self.experts}")
        check_min(self, "vision_hidden", "vision_depth")
        if self.vision:
            check(self.layers >= 3, "layers", f"a tiny Qwen3-VL needs >= 3 (deepstack), got {self.layers}")
            check(self.vision_depth >= 3, "vision_depth", f"needs >= 3 (deepstack), got {self.vision_depth}")
            check(
                self.head_dim == 16,
                "head_dim",
                f"a tiny Qwen3-VL needs 16 (M-RoPE [4, 2, 2]), got {self.head_dim}",
            )
        if self.architecture == "qwen3_vl_moe":
            # Qwen3-VL-MoE files fuse the experts as [E, H, 2I] / [E, I, H], transformers' memory as
            # [E, 2I, H] / [E, H, I]: a square one would load either way, silently wrong in one of them
            check(
                self.moe_ffn not in (self.hidden, self.hidden // 2),
                "moe_ffn",
                f"{self.moe_ffn} makes a fused expert tensor square (hidden {self.hidden}): pick another size",
            )


@dataclass
class ModelConfig:
    """The policy to start from."""

    path: str | None = None
    """Hugging Face directory (config, tokenizer, safetensors) to start from; null builds the tiny model."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """The embedded tiny random model's sizes."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Training parameter dtype (optimizer main params stay fp32); bfloat16 is for GPUs."""


@dataclass
class SFTConfig:
    """Supervised cold start on the training set's reference answers before RL (0 steps = skip)."""

    steps: int = 0
    """Optimizer steps of SFT; 0 skips the cold start."""
    lr: float = 1e-3
    """SFT learning rate (constant)."""
    batch_size: int = 16
    """Prompt + answer pairs per SFT step."""

    def __post_init__(self) -> None:
        check_min(self, "steps", minimum=0)
        check_min(self, "batch_size")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")


@dataclass
class RunSettings:
    """Run bookkeeping: length, seed, evaluation, checkpoints and logging."""

    output_dir: str = "outputs/run"
    """Directory for config.yaml, metrics, checkpoints and the final Hugging Face model."""
    steps: int = 100
    """RL steps (one rollout batch each); 0 = only the cold start, the step-0 eval and the final `hf/`
    export (a start policy for other runs)."""
    seed: int = 0
    """Seed of the data order, the tiny model's weights and sampling."""
    eval_every: int = 10
    """RL steps between evaluations (0 = only at the end)."""
    eval_samples: int = 1
    """Samples per eval prompt; the eval reports their mean Pass@1."""
    save_every: int = 0
    """RL steps between checkpoints (0 = only at the end)."""
    keep_last: int = 2
    """Checkpoints kept on disk (0 = keep all)."""
    log_every: int = 1
    """RL steps between the per-step log lines (INFO, shown with `progress` false); the last step always logs."""
    tensorboard: bool = True
    """Write TensorBoard event files (every metrics.jsonl scalar) under output_dir/tensorboard."""
    wandb_project: str | None = None
    """Weights & Biases project to log to; null = no W&B."""
    progress: bool = True
    """Show a progress bar on rank 0."""
    cpu_threads: int = 1
    """torch threads of each trainer process on CPU (0 = torch's default, one per core). 1 measured fastest
    here for the tiny and the 7M-parameter MoE (2 threads: 1.9x / 1.1x slower updates, and idle OpenMP
    workers spinning beside the SGLang server; benchmarks/RESULTS.md, bench_rl_step). GPU runs: unused."""

    def __post_init__(self) -> None:
        check(bool(self.output_dir), "output_dir", "must not be empty")
        check_min(self, "eval_samples", "log_every")
        check_min(self, "steps", minimum=0)
        check_min(self, "seed", "eval_every", "save_every", "keep_last", "cpu_threads", minimum=0)


@dataclass
class TrainJobConfig:
    """A whole `megatron-sapo train` run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The policy to start from."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Trainer parallel layout."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Policy loss and mini-batching."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompts and answers."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward function."""
    sft: SFTConfig = field(default_factory=SFTConfig)
    """Optional supervised cold start."""
    run: RunSettings = field(default_factory=RunSettings)
    """Run bookkeeping."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Placement of trainers and engines on the nodes of a multi-node job."""

    @property
    def lends_engine_memory(self) -> bool:
        """The job's own SGLang servers share the train nodes' GPUs with the trainers: rank 0 has them
        release their memory for each update and resume it for the weight sync (so no asynchronous
        rollouts: `rollout.max_staleness` must be 0)."""
        return (
            self.rollout.engine == "sglang"
            and self.cluster.placement == "colocated"
            and self.rollout.server.device == "cuda"
            and not self.rollout.urls  # the job's own servers, launched here or on every train node
        )

    def __post_init__(self) -> None:
        batch = self.rollout.prompts_per_step * self.rollout.samples_per_prompt
        check(
            batch % self.loss.mini_batches == 0,
            "loss.mini_batches",
            f"{self.loss.mini_batches} does not divide the rollout batch "
            f"(prompts_per_step × samples_per_prompt = {batch})",
        )
        # 0 (greedy) suits SamplingParams but not training: the trainer's log-probs divide the logits by it.
        temperature = self.rollout.sampling.temperature
        check(
            0 < temperature < float("inf"),
            "rollout.sampling.temperature",
            f"must be > 0 and finite for training rollouts (the trainer's log-probs are of "
            f"softmax(logits / temperature)), got {temperature}",
        )
        if self.cluster.placement == "colocated" and self.cluster.colocated_engines == "every_node":
            check(
                self.rollout.engine == "sglang",
                "cluster.colocated_engines",
                "'every_node' launches SGLang servers on the train nodes: needs rollout.engine 'sglang'",
            )
            check(
                not self.rollout.urls,
                "rollout.urls",
                "must be empty with cluster.colocated_engines 'every_node' (the URLs come from the train nodes)",
            )
        if self.cluster.placement == "disaggregated":
            r = self.rollout
            check(
                r.engine == "sglang",
                "rollout.engine",
                "must be 'sglang' for cluster.placement 'disaggregated'",
            )
            check(
                not r.urls,
                "rollout.urls",
                "must be empty for cluster.placement 'disaggregated' (the URLs come from the engine nodes)",
            )
            check(
                r.weight_sync.transport != "tensor",
                "rollout.weight_sync.transport",
                "'tensor' needs engines on the trainer's node; cluster.placement 'disaggregated' needs "
                "'distributed' or 'disk'",
            )
        check(
            not (self.lends_engine_memory and self.rollout.max_staleness),
            "rollout.max_staleness",
            "asynchronous rollouts need engines that keep their GPUs while the trainers train: not with "
            "the job's own colocated CUDA servers (they release their memory for each update); use "
            "cluster.placement 'disaggregated' or rollout.urls",
        )
        if self.model.path is None and self.model.tiny.architecture in ("qwen3", "qwen3_vl"):
            check(
                self.parallel.ep == 1,
                "parallel.ep",
                f"needs a MoE model (model.tiny.architecture is {self.model.tiny.architecture!r})",
            )
        if self.model.path is None:
            visual = self.data.synthetic.task == "visual" and self.data.train_path is None
            check(
                not visual or self.model.tiny.vision,
                "model.tiny.architecture",
                "data.synthetic.task 'visual' needs a vision-language policy: qwen3_vl_moe or qwen3_vl",
            )
        check(
            not (
                self.rollout.partial and self.data.synthetic.task == "visual" and self.data.train_path is None
            ),
            "rollout.partial",
            "continues samples from token ids: not with image prompts (data.synthetic.task 'visual')",
        )
