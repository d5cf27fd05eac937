"""The sections of a `megatron-sapo train` run: one typed dataclass per component, gathered in `JobConfig`.

    cfg = load_config(JobConfig, "configs/quickstart.yaml", ["rollout.sampling.temperature=0.7"])
    temperature = cfg.rollout.sampling.temperature  # the trainer's log-probs are at the rollouts' one
    train = cfg.loss.to_train_config(pad_token_id=tok.pad_token_id, temperature=temperature)
    engine = PolicyEngine(provider, cfg.optim, train)

Each component gets only its own section. Sections that already exist next to their component are
reused as they are: `OptimConfig` (megatron/engine.py), `SamplingParams` (rollout/types.py),
`WeightSyncConfig` (rollout/weight_sync.py), `ArithmeticTask` (data/synthetic.py, extended by the
number of problems), and `ServerConfig` (rollout/server.py) minus its run-time
`model_path` (`ServerOptions`, see `RolloutConfig.server_config`). Defaults suit the tiny CPU quickstart
where a value has no better general default. `megatron-sapo train --help` lists every key.
Tests: tests/unit/test_config.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass, field
from typing import Literal

from megatron_sapo.config import check, check_choice, without_fields
from megatron_sapo.data import ArithmeticTask
from megatron_sapo.losses import AGGREGATIONS, LOSSES
from megatron_sapo.megatron.engine import OptimConfig, TrainConfig
from megatron_sapo.megatron.engine_routing import REPLAY_MODES
from megatron_sapo.rewards.registry import PYTHON_PREFIX, REWARDS
from megatron_sapo.rollout.server import DEVICES, ServerConfig
from megatron_sapo.rollout.types import SamplingParams
from megatron_sapo.rollout.weight_sync import WeightSyncConfig

__all__ = [
    "ClusterConfig",
    "DataConfig",
    "JobConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "RewardConfig",
    "RolloutConfig",
    "RunConfig",
    "SFTConfig",
    "ServerOptions",
    "SyntheticDataConfig",
    "TinyModelConfig",
]


def _check_positive(section: object, *names: str, minimum: int = 1) -> None:
    for name in names:
        value = getattr(section, name)
        check(value is None or value >= minimum, name, f"must be >= {minimum}, got {value}")


@dataclass
class TinyModelConfig:
    """Sizes of the embedded tiny random model (used when `model.path` is null)."""

    architecture: Literal["qwen3_moe", "qwen3"] = "qwen3_moe"
    """Hugging Face architecture family: "qwen3_moe" (Mixture-of-Experts) or "qwen3" (dense)."""
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

    def __post_init__(self) -> None:
        _check_positive(self, "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "experts", "top_k")
        _check_positive(self, "moe_ffn", "vocab")
        check(
            self.heads % self.kv_heads == 0, "kv_heads", f"{self.kv_heads} does not divide heads={self.heads}"
        )
        check(self.top_k <= self.experts, "top_k", f"{self.top_k} is more than experts={self.experts}")


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
class ParallelConfig:
    """Megatron-Core parallel layout of the trainer; data parallelism takes the remaining ranks."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule); null = not interleaved."""
    ep: int = 1
    """Expert-parallel size (MoE)."""
    etp: int | None = None
    """Expert tensor-parallel size; null = same as `tp`."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs tp > 1; GPU only: not possible on CPU)."""

    def __post_init__(self) -> None:
        _check_positive(self, "tp", "pp", "vpp", "ep", "etp")
        check(self.vpp is None or self.pp > 1, "vpp", "needs parallel.pp > 1")
        check(not self.sequence_parallel or self.tp > 1, "sequence_parallel", "needs parallel.tp > 1")


PLACEMENTS = ("colocated", "disaggregated")
COLOCATED_ENGINES = ("first_node", "every_node")


@dataclass
class ClusterConfig:
    """Where trainers and SGLang engines run across the allocation (see megatron_sapo/launch.py)."""

    placement: Literal["colocated", "disaggregated"] = "colocated"
    """"colocated": every node trains and runs `rollout.num_engines` SGLang engines on its own node
    (trainer rank 0's node only, or every train node: `colocated_engines`); "disaggregated": the last
    `engine_nodes` nodes only serve SGLang engines (`engines_per_node` each, `rollout.num_engines` is not
    used) and the first ones train."""
    colocated_engines: Literal["first_node", "every_node"] = "first_node"
    """Colocated on several nodes: "first_node" = trainer rank 0 launches the engines on its node;
    "every_node" = local rank 0 of every train node launches `rollout.num_engines` on its node (on
    `engine_port` + node index x num_engines + i) and trainer rank 0 spreads the rollouts over all of them;
    weights then reach them by "distributed" or "disk" ("tensor" reaches only rank 0's node)."""
    engine_nodes: int = 0
    """Disaggregated: how many nodes (the last ones of the allocation) run SGLang engines."""
    engines_per_node: int = 1
    """Disaggregated: SGLang servers per engine node (each `rollout.server.tp_size` GPUs)."""
    engine_port: int = 30000
    """Disaggregated: engine i of a node listens on engine_port + i (colocated "every_node": see there)."""
    gpus_per_node: int | None = None
    """GPUs per node; null = from SLURM (SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE), else the visible ones."""
    master_port: int | None = None
    """Port of the trainers' rendezvous under plain srun; null = MASTER_PORT, else derived from the job id."""

    def __post_init__(self) -> None:
        check_choice(self.placement, PLACEMENTS, "placement")
        check_choice(self.colocated_engines, COLOCATED_ENGINES, "colocated_engines")
        _check_positive(self, "engine_nodes", minimum=0)
        _check_positive(self, "engines_per_node", "gpus_per_node")
        for name in ("engine_port", "master_port"):
            port = getattr(self, name)
            check(port is None or 0 < port < 65536, name, f"must be a TCP port in 1..65535, got {port}")
        check(
            self.placement == "colocated" or self.engine_nodes > 0,
            "engine_nodes",
            "must be >= 1 for cluster.placement 'disaggregated' (the last N nodes run the engines)",
        )


ServerOptions = without_fields(
    ServerConfig,
    "model_path",
    name="ServerOptions",
    module=__name__,
    doc="How to launch each SGLang server (ServerConfig without `model_path`, which is set at run time).",
)


@dataclass
class RolloutConfig:
    """Generation: which engine, how many samples, sampling settings, servers and weight sync."""

    engine: Literal["sglang", "transformers"] = "sglang"
    """"sglang" (HTTP servers) or "transformers" (in-process, for small CPU runs and tests)."""
    prompts_per_step: int = 8
    """Prompts per rollout batch (per RL step)."""
    samples_per_prompt: int = 8
    """Responses sampled per prompt (the group size G / n for group-normalised advantages)."""
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=32))
    """Sampling settings of the training rollouts."""
    server: ServerOptions = field(default_factory=ServerOptions)
    """How each launched SGLang server runs (ignored when `urls` are given)."""
    urls: list[str] = field(default_factory=list)
    """Running SGLang servers (http://host:port) to use instead of launching `num_engines` ones."""
    num_engines: int = 1
    """SGLang servers to launch (each `server.tp_size` devices)."""
    weight_sync: WeightSyncConfig = field(default_factory=WeightSyncConfig)
    """How the trainer's weights reach the engines after every update."""
    guard_threshold: float = 0.05
    """Largest mean |engine − trainer| log-prob difference accepted after a weight sync."""
    guard_prompts: int = 2
    """Prompts sampled to check each weight sync (0 = no check)."""
    dynamic_sampling: bool = False
    """Drop prompt groups whose rewards are all equal (zero advantage) and sample more prompts."""
    max_refill_rounds: int = 3
    """With `dynamic_sampling`, extra generation rounds per step before training on what there is."""

    def __post_init__(self) -> None:
        _check_positive(self, "prompts_per_step", "samples_per_prompt", "num_engines")
        _check_positive(self, "guard_prompts", "max_refill_rounds", minimum=0)
        check(self.guard_threshold > 0, "guard_threshold", f"must be > 0, got {self.guard_threshold}")
        check_choice(self.server.device, DEVICES, "server.device")
        for i, url in enumerate(self.urls):
            check(
                re.match(r"https?://[^/\s]+", url) is not None, f"urls[{i}]", f"not an http(s) URL: {url!r}"
            )
        check(not self.urls or self.engine == "sglang", "urls", "only for rollout.engine 'sglang'")

    def server_config(self, model_path: str) -> ServerConfig:
        """The `ServerConfig` of one launched server that loads `model_path`."""
        return ServerConfig(model_path=model_path, **dataclasses.asdict(self.server))


def _loss_defaults(name: str) -> dict[str, float | None]:
    """The registered loss's own keyword parameters and their defaults (None: it has none)."""
    params = inspect.signature(LOSSES[name]).parameters.values()
    return {
        p.name: None if p.default is p.empty else float(p.default) for p in params if p.kind is p.KEYWORD_ONLY
    }


@dataclass
class LossConfig:
    """The policy loss and how a rollout batch becomes optimizer steps (→ the engine's `TrainConfig`)."""

    name: str = "sapo"
    """Registered policy loss (megatron_sapo.losses): "sapo", "gspo", "gspo_token" or "grpo"."""
    params: dict[str, float] = field(default_factory=dict)
    """The loss's own parameters (SAPO: tau_pos=1.0, tau_neg=1.05; GRPO: eps_low=0.2, eps_high=0.27; GSPO: eps_low=3e-4, eps_high=4e-4); a missing one takes the loss's default."""
    aggregation: str = "seq-mean-token-mean"
    """"seq-mean-token-mean" (SAPO paper: mean over sequences of each one's token mean) or "token-mean"."""
    mini_batches: int = 4
    """Optimizer steps per rollout batch (the SAPO paper uses 4)."""
    micro_batch_tokens: int = 8192
    """Padded tokens (samples × longest) per forward/backward micro-batch."""
    log_ratio_clamp: float = 20.0
    """|logp − old_logp| is clamped to this before exp (fp32 safety)."""
    routing_replay: str = "off"
    """MoE routing replay: "off", "r2" (π_old pass's experts) or "r3" (the rollout engine's experts)."""

    def __post_init__(self) -> None:
        check_choice(self.name, LOSSES, "name")
        check_choice(self.aggregation, AGGREGATIONS, "aggregation")
        check_choice(self.routing_replay, REPLAY_MODES, "routing_replay")
        _check_positive(self, "mini_batches", "micro_batch_tokens")
        check(self.log_ratio_clamp > 0, "log_ratio_clamp", f"must be > 0, got {self.log_ratio_clamp}")
        accepted = _loss_defaults(self.name)
        unknown = sorted(set(self.params) - set(accepted))
        takes = f"(loss {self.name!r} takes {', '.join(accepted) or 'none'})"
        check(not unknown, "params", f"unknown parameter {', '.join(unknown)} {takes}")
        needed = sorted(k for k, v in accepted.items() if v is None and k not in self.params)
        check(not needed, "params", f"missing parameter {', '.join(needed)} {takes}")

    def to_train_config(self, *, pad_token_id: int, temperature: float) -> TrainConfig:
        """The engine's `TrainConfig`; `pad_token_id` comes from the tokenizer, `temperature` is the
        rollouts' sampling temperature (`rollout.sampling.temperature`: the trainer's log-probs use it)."""
        return TrainConfig(
            mini_batches=self.mini_batches,
            micro_batch_tokens=self.micro_batch_tokens,
            loss=self.name,
            loss_params={k: v for k, v in _loss_defaults(self.name).items() if v is not None} | self.params,
            aggregation=self.aggregation,
            log_ratio_clamp=self.log_ratio_clamp,
            pad_token_id=pad_token_id,
            routing_replay=self.routing_replay,
            temperature=temperature,
        )


@dataclass(frozen=True)
class SyntheticDataConfig(ArithmeticTask):
    """The built-in arithmetic task (`data.ArithmeticTask`, usable as is) and how many problems to draw."""

    seed: int = 0
    """Seed of the drawn problems (train and eval use disjoint seeds derived from it)."""
    n_train: int = 512
    """Training problems drawn."""
    n_eval: int = 64
    """Evaluation problems drawn (0 = no evaluation set)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, "n_train")
        _check_positive(self, "seed", "n_eval", minimum=0)


@dataclass
class DataConfig:
    """Training / evaluation prompts and reference answers."""

    train_path: str | None = None
    """Training set (.jsonl or .parquet); null = the synthetic task."""
    eval_path: str | None = None
    """Evaluation set; null = the synthetic task's eval split, or none when `train_path` is set."""
    format: Literal["auto", "jsonl", "parquet", "synthetic"] = "auto"
    """File format; "auto" picks by extension (and "synthetic" when no path is set)."""
    prompt_field: str = "prompt"
    """Record field holding the prompt (a string or a list of chat messages)."""
    answer_field: str = "answer"
    """Record field holding the reference answer the reward compares against."""
    answer_extract: Literal["none", "gsm8k"] = "none"
    """How to read the answer field: as is, or "gsm8k" (the text after the last '####')."""
    apply_chat_template: bool = True
    """Render prompts with the tokenizer's chat template (with the generation prompt)."""
    system_prompt: str | None = None
    """System message prepended to every chat prompt; null = none."""
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    """The synthetic task's settings."""
    max_prompt_tokens: int = 256
    """Longest rendered prompt in tokens; a longer one is an error naming its file and row."""

    def __post_init__(self) -> None:
        _check_positive(self, "max_prompt_tokens")
        if self.format == "synthetic":
            check(self.train_path is None, "train_path", "must be null for data.format 'synthetic'")
        elif self.format != "auto":
            check(self.train_path is not None, "train_path", f"required for data.format {self.format!r}")


@dataclass
class RewardConfig:
    """How a response is scored against the reference answer."""

    name: str = "math_verify"
    """"math_verify", "exact_match", or "python:package.module:function" (a custom scorer)."""
    timeout_s: float = 5.0
    """Seconds one scoring call may take before it counts as reward 0."""

    def __post_init__(self) -> None:
        if self.name.startswith(PYTHON_PREFIX):
            check(
                re.fullmatch(rf"{PYTHON_PREFIX}[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.name) is not None,
                "name",
                f"{self.name!r} is not of the form {PYTHON_PREFIX}package.module:function",
            )
        else:
            check_choice(self.name, [*REWARDS, f"{PYTHON_PREFIX}package.module:function"], "name")
        check(self.timeout_s > 0, "timeout_s", f"must be > 0, got {self.timeout_s}")


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
        _check_positive(self, "steps", minimum=0)
        _check_positive(self, "batch_size")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")


@dataclass
class RunConfig:
    """Run bookkeeping: length, seed, evaluation, checkpoints and logging."""

    output_dir: str = "outputs/run"
    """Directory for config.yaml, metrics, checkpoints and the final Hugging Face model."""
    steps: int = 100
    """RL steps (one rollout batch each)."""
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
    """RL steps between log lines."""
    tensorboard: bool = True
    """Write TensorBoard event files (every metrics.jsonl scalar) under output_dir/tensorboard."""
    wandb_project: str | None = None
    """Weights & Biases project to log to; null = no W&B."""
    progress: bool = True
    """Show a progress bar on rank 0."""

    def __post_init__(self) -> None:
        check(bool(self.output_dir), "output_dir", "must not be empty")
        _check_positive(self, "steps", "eval_samples", "log_every")
        _check_positive(self, "seed", "eval_every", "save_every", "keep_last", minimum=0)


@dataclass
class JobConfig:
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
    run: RunConfig = field(default_factory=RunConfig)
    """Run bookkeeping."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Placement of trainers and engines on the nodes of a multi-node job."""

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
        if self.model.path is None and self.model.tiny.architecture == "qwen3":
            check(
                self.parallel.ep == 1, "parallel.ep", "needs a MoE model (model.tiny.architecture is 'qwen3')"
            )
