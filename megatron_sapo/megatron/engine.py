"""The SAPO policy train step on megatron-core: DDP model chunks, distributed optimizer, LR schedule.

`PolicyEngine` owns the (virtual-)pipeline model chunks wrapped in megatron's
`DistributedDataParallel`, megatron's distributed Adam (`get_megatron_optimizer`) and its
`OptimizerParamScheduler`; it runs every forward/backward through `get_forward_backward_func`, so the
same code serves TP, PP, virtual PP, DP and EP (gloo on CPU, NCCL on GPU)::

    engine = PolicyEngine(model_provider, OptimConfig(lr=1e-6), LossConfig(mini_batches=4))
    share = engine.scatter(samples if rank == 0 else None)   # every rank: its DP rank's share
    old = engine.compute_logprobs(share.samples)     # π_old pass, no grad; list of [n_response_i]
    everything = engine.gather(share, old)           # rank 0: by global index; other ranks: None
    metrics = engine.train_step(share, old)          # one optimizer step per global mini-batch

Data parallelism splits the work: `scatter` (collective) takes the step's global list on global rank 0
and hands each rank only its data-parallel rank's `Share` (`batching.data_parallel_shares`: global
mini-batch k = `split_mini_batches(samples)[k]` as at DP1, spread over the DP ranks by tokens, longest
first onto the least-loaded rank). Every rank of a model-parallel group (TP × PP; with EP, megatron's
dense DP group holds the EP ranks, which take different shares) gets the same share. `train_step(share)`
steps once per global mini-batch, a rank with no sample in one running a masked filler so that it still
joins the collectives: the optimizer steps equal the DP1 ones (tests/distributed/test_data_parallel.py).
`train_step(samples)` with a plain list (this rank's samples, e.g. `batching.shard_for_data_parallel`)
splits them locally into `mini_batches`. `model_provider(pre_process, post_process, vp_stage=None)`
returns one megatron module for this rank's (virtual) pipeline stage, weights loaded. Parallel state
first: `megatron_sapo.megatron.parallel.init_parallel` (on CPU it enables megatron/cpu.py).

Loss normalisation. The gradient must be exactly ∇(Σ_i seqmean_i / N) with N the number of sequences of
the *global* mini-batch (all DP ranks): `compute_policy_loss` gets `normalizer=N` (DP-summed). Megatron
then divides each micro-batch loss by the number of micro-batches (schedules.forward_step_calc_loss,
2-tuple losses) and DDP pre-scales gradients by 1/DP before summing them (`calculate_per_token_loss`
False): the loss handed to the schedule is multiplied by num_microbatches · DP to undo both.

Temperature (`PolicyEngine(..., temperature=T)`): every log-prob, in `compute_logprobs` and in the updates, is of
softmax(logits / T), as SGLang reports them for rollouts sampled at T, so the ratio compares the same
distributions (T = 1: the raw logits).

MoE routing replay (`LossConfig.routing_replay`, see `engine_routing`): "r2" records each sample's
experts in `compute_logprobs` and replays them in every update forward; "r3" replays `Sample.routing`
(the rollout engine's) in both. "off" installs no hook.

Tests: ``python -m pytest tests/distributed/test_engine_layouts.py tests/unit/test_batching.py -q``,
``python -m pytest tests/distributed/test_engine_routing_replay.py -q``,
``python -m pytest tests/distributed/test_data_parallel.py -q``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_sapo.losses import (
    AGGREGATIONS,
    LOSSES,
    ROLLOUT_CORRECTIONS,
    compute_policy_loss,
    count_for_normalizer,
    loss_parameters,
)
from megatron_sapo.megatron.batching import (
    MicroBatch,
    Sample,
    Share,
    collate,
    data_parallel_shares,
    pack_micro_batches,
    split_mini_batches,
)
from megatron_sapo.megatron.engine_routing import REPLAY_MODES, EngineRouting
from megatron_sapo.megatron.logprobs import vocab_parallel_logprobs
from megatron_sapo.megatron.parallel import device
from megatron_sapo.utils.typed_config import check, check_choice, check_min

__all__ = ["LossConfig", "OptimConfig", "PolicyEngine"]

logger = logging.getLogger(__name__)

ModelProvider = Callable[..., torch.nn.Module]


@dataclass
class OptimConfig:
    """Optimizer (megatron distributed Adam, fp32 main params) and LR schedule."""

    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Learning rate at the end of the decay."""
    warmup_steps: int = 0
    """Optimizer steps of linear warmup from 0 to `lr`."""
    decay_steps: int = 0
    """Optimizer steps from start to `min_lr` (0 = constant `lr` after warmup)."""
    decay_style: str = "cosine"
    """Decay shape when `decay_steps` > 0: "linear", "cosine", "inverse-square-root"."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    adam_beta1: float = 0.9
    """Adam β1."""
    adam_beta2: float = 0.999
    """Adam β2."""
    adam_eps: float = 1e-8
    """Adam ε."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state over data-parallel ranks (ZeRO-1)."""


@dataclass
class LossConfig:
    """The policy loss and how a rollout batch becomes optimizer steps (the `loss:` section of a run)."""

    name: str = "sapo"
    """Registered policy loss (megatron_sapo.losses): "sapo", "gspo", "gspo_token" or "grpo"."""
    params: dict[str, float] = field(default_factory=dict)
    """The loss's own parameters; a missing one takes the loss function's default (SAPO: tau_pos=1.0,
    tau_neg=1.05; GRPO: eps_low=0.2, eps_high=0.27; GSPO: eps_low=3e-4, eps_high=4e-4)."""
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
    rollout_correction: str = "off"
    """Weight each token's policy-gradient loss by π_old against the engine's log-probs μ: "off", "tis"
    (min(π_old/μ, cap) per token) or "mis" (drop a sequence whose mean |log π_old − log μ| > log cap);
    docs/async.md."""
    rollout_correction_cap: float = 2.0
    """C of the rollout correction (> 1): the TIS truncation, and the MIS bound log C."""

    def __post_init__(self) -> None:
        check_choice(self.name, LOSSES, "name")
        check_choice(self.aggregation, AGGREGATIONS, "aggregation")
        check_choice(self.routing_replay, REPLAY_MODES, "routing_replay")
        check_min(self, "mini_batches", "micro_batch_tokens")
        check(self.log_ratio_clamp > 0, "log_ratio_clamp", f"must be > 0, got {self.log_ratio_clamp}")
        check_choice(self.rollout_correction, ROLLOUT_CORRECTIONS, "rollout_correction")
        cap = self.rollout_correction_cap
        check(cap > 1 and math.isfinite(cap), "rollout_correction_cap", f"must be finite and > 1, got {cap}")
        accepted = loss_parameters(self.name)
        unknown = sorted(set(self.params) - set(accepted))
        takes = f"(loss {self.name!r} takes {', '.join(accepted) or 'none'})"
        check(not unknown, "params", f"unknown parameter {', '.join(unknown)} {takes}")
        needed = sorted(k for k, v in accepted.items() if v is None and k not in self.params)
        check(not needed, "params", f"missing parameter {', '.join(needed)} {takes}")


def _filler() -> Sample:
    """A fully masked sample for empty micro-batches (contributes exactly zero loss and gradient)."""
    return Sample(torch.zeros(2, dtype=torch.long), 1, 0.0, loss_mask=torch.zeros(1, dtype=torch.bool))


class PolicyEngine:
    """Owns the DDP model chunks, megatron's optimizer and LR scheduler; runs π_old passes and updates."""

    def __init__(
        self,
        model_provider: ModelProvider,
        optim: OptimConfig,
        loss: LossConfig,
        *,
        pad_token_id: int = 0,
        temperature: float = 1.0,
        ddp_config: DistributedDataParallelConfig | None = None,
    ) -> None:
        """`pad_token_id`: right padding (never predicted: masked out). `temperature`: every log-prob
        (π_old and π_θ) is of softmax(logits / temperature), the rollouts' sampling temperature."""
        if parallel_state.get_context_parallel_world_size() != 1:
            raise NotImplementedError("context parallelism is not supported by PolicyEngine yet")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"PolicyEngine temperature must be > 0 and finite, got {temperature}")
        self.loss_config, self.pad_token_id, self.temperature = loss, pad_token_id, temperature
        self.device = device()
        self.model = self._build_model(model_provider, optim, ddp_config)
        self._sequence_parallel = self.model[0].config.sequence_parallel
        # a vision-language policy (megatron/vlm.py) places tokens with M-RoPE and takes images
        self._mrope = getattr(self.model[0].module, "mrope_tokens", None)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=optim.lr,
                min_lr=optim.min_lr,
                weight_decay=optim.weight_decay,
                adam_beta1=optim.adam_beta1,
                adam_beta2=optim.adam_beta2,
                adam_eps=optim.adam_eps,
                clip_grad=optim.clip_grad,
                use_distributed_optimizer=optim.use_distributed_optimizer,
                bf16=self.model[0].config.bf16,
                fp16=False,
            ),
            self.model,
        )
        if self.device.type == "cpu":
            _fuse_cpu_adam(self.optimizer)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if optim.warmup_steps > 0 else optim.lr,
            max_lr=optim.lr,
            min_lr=optim.min_lr,
            lr_warmup_steps=optim.warmup_steps,
            # megatron asserts warmup < decay steps, also for a constant schedule
            lr_decay_steps=max(optim.decay_steps, optim.warmup_steps + 1),
            lr_decay_style=optim.decay_style if optim.decay_steps > 0 else "constant",
            start_wd=optim.weight_decay,
            end_wd=optim.weight_decay,
            wd_incr_steps=1,
            wd_incr_style="constant",
        )
        for config in {id(m.config): m.config for m in self.model}.values():
            config.finalize_model_grads_func = finalize_model_grads
            config.grad_scale_func = self.optimizer.scale_loss
            config.no_sync_func = (
                [m.no_sync for m in self.model] if len(self.model) > 1 else self.model[0].no_sync
            )
            # Micro-batches differ in [B, T]: pipeline stages exchange shapes (not interleaved: see
            # _micro_batches).
            config.variable_seq_lengths = len(self.model) == 1
        # "off" installs nothing: the routers run megatron's own top-k untouched.
        self.routing = (
            None if loss.routing_replay == "off" else EngineRouting(self.model, loss.routing_replay)
        )
        self._dp_rank_of: list[int] | None = None  # DP rank of every global rank, learnt by `scatter`

    def _build_model(
        self, provider: ModelProvider, optim: OptimConfig, ddp_config: DistributedDataParallelConfig | None
    ) -> list[DistributedDataParallel]:
        vpp = parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1
        ddp_config = ddp_config or DistributedDataParallelConfig(
            use_distributed_optimizer=optim.use_distributed_optimizer, grad_reduce_in_fp32=True
        )
        chunks = []
        for stage in range(vpp):
            vp_stage = stage if vpp > 1 else None
            module = provider(
                parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
            if module.config.calculate_per_token_loss:
                raise ValueError("PolicyEngine normalises per sequence: set calculate_per_token_loss=False")
            # Only the first chunk buckets its grads (as megatron's training loop): later chunks' grads
            # are reduced in one go at the end.
            chunks.append(
                DistributedDataParallel(module.config, ddp_config, module, disable_bucketing=stage > 0)
            )
        return chunks

    # ---------------------------------------------------------------- batching and schedule plumbing

    def _micro_batches(
        self,
        samples: list[Sample],
        old_logprobs: list[torch.Tensor] | None,
        routing: list[torch.Tensor] | None = None,
    ) -> tuple[list[MicroBatch], list[list[int]]]:
        """Token-budgeted micro-batches, the same count on every DP rank (expert all-to-alls need it).

        `routing[i]`: sample i's `[L_local, S_i, k]` experts to replay (`EngineRouting.rows_for`), or None.
        """
        pp = parallel_state.get_pipeline_model_parallel_world_size()
        interleaved = len(self.model) > 1
        groups = pack_micro_batches(
            [s.seq_len for s in samples],
            self.loss_config.micro_batch_tokens,
            min_count=pp if interleaved else 1,
        )
        count = torch.tensor([len(groups)], dtype=torch.long, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        # Interleaved 1F1B runs micro-batches in groups of PP per virtual stage: a multiple of PP.
        groups = pack_micro_batches(
            [s.seq_len for s in samples],
            self.loss_config.micro_batch_tokens,
            min_count=int(count),
            multiple_of=pp if interleaved else 1,
        )
        pad = self.pad_token_id
        # Interleaved schedules exchange activations and gradients both ways in one p2p call; megatron's
        # shape exchange (variable_seq_lengths) then mis-pairs the two messages at PP=2 under gloo (same
        # peer both ways, see cpu.py): use one [B, T] for all micro-batches instead.
        shape = None
        if interleaved:
            # a DP rank may hold no sample of a mini-batch: one filler row of one position
            shape = (max(max(len(g) for g in groups), 1), max((s.seq_len for s in samples), default=1))
        # Sequence parallelism splits T over the TP ranks: T must divide by TP.
        multiple = parallel_state.get_tensor_model_parallel_world_size() if self._sequence_parallel else 1
        batches = []
        for g in groups:
            old = [old_logprobs[i] for i in g] if old_logprobs is not None and g else None
            rows = [samples[i] for i in g] if g else [_filler()]
            batches.append(
                collate(rows, old, pad_token_id=pad, shape=shape, seq_multiple_of=multiple, mrope=self._mrope)
            )
            if routing is not None:
                self.routing.attach_to(batches[-1], [routing[i] for i in g])
        return [b.to(self.device) for b in batches], groups

    def _attention_mask(self, batch: MicroBatch) -> torch.Tensor | None:
        if self.device.type == "cuda":
            return None  # megatron's causal mask type; padding sits after every real token
        from megatron_sapo.megatron.cpu import causal_attention_mask  # CPU only: never imported on GPU

        b, t = batch.input_ids.shape
        return causal_attention_mask(t, b)

    def _run(self, batches: list[MicroBatch], loss_func: Callable, *, forward_only: bool) -> list[Any]:
        """megatron's forward-backward over `batches`; `loss_func(batch, num_mb, logits) -> (loss, info)`."""

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            # Set / collect routing around this very (micro-batch, chunk) forward: pipeline schedules run
            # other micro-batches' forwards in between.
            if self.routing is not None:
                self.routing.before_forward(batch)
            output = model(
                batch.input_ids, batch.position_ids, self._attention_mask(batch), **batch.model_inputs()
            )
            if self.routing is not None:
                self.routing.after_forward(batch)
            return output, partial(loss_func, batch, len(batches))

        iterators = [iter(batches) for _ in self.model]  # one per virtual stage: each reads every batch
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterators if len(self.model) > 1 else iterators[0],
            model=self.model,
            num_microbatches=len(batches),
            seq_length=max(b.input_ids.shape[1] for b in batches),
            micro_batch_size=max(b.input_ids.shape[0] for b in batches),
            forward_only=forward_only,
        )

    def _logprobs(self, batch: MicroBatch, logits: torch.Tensor, *, inplace: bool) -> torch.Tensor:
        """`[B, T]` fp32 log-probs of `batch.labels` under softmax(logits / temperature), from
        vocab-parallel logits `[B, T, V/tp]` (the division happens per fp32 chunk, no [B, T, V/tp] copy)."""
        return vocab_parallel_logprobs(
            logits,
            batch.labels,
            group=parallel_state.get_tensor_model_parallel_group(),
            # Logit columns >= the HF vocab are megatron's TP padding (`build_gpt_model` sets this;
            # models without the attribute are unpadded): transformers / SGLang have V columns only.
            vocab_size=getattr(self.model[-1].module, "unpadded_vocab_size", None),
            temperature=self.temperature,
            inplace_backward=inplace,
        )

    def _from_last_stage(self, obj: Any) -> Any:
        """`obj` of the last pipeline stage, on every stage of this pipeline."""
        if parallel_state.get_pipeline_model_parallel_world_size() == 1:
            return obj
        holder = [obj]
        dist.broadcast_object_list(
            holder,
            src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group(),
        )
        return holder[0]

    # ---------------------------------------------------------------- public API

    def scatter(self, samples: list[Sample] | None) -> Share:
        """Collective over every rank: global rank 0 passes the step's global list, every other rank None;
        each rank returns its data-parallel rank's `Share` (the same on all ranks of a model-parallel
        group), and receives nothing of the other shares.

        Rank 0 splits by lengths only (`batching.data_parallel_shares`, `loss_config.mini_batches` global
        mini-batches) and sends each rank its share (`scatter_object_list`). An invalid list on rank 0
        (e.g. fewer samples than mini-batches) raises the same ValueError on every rank.
        """
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank != 0 and samples is not None:
            raise ValueError("PolicyEngine.scatter: only global rank 0 passes samples (others pass None)")
        dp_size = parallel_state.get_data_parallel_world_size()
        if self._dp_rank_of is None:
            self._dp_rank_of = [0] * world
            dist.all_gather_object(self._dp_rank_of, parallel_state.get_data_parallel_rank())
        payload: list[Any] | None = None
        if rank == 0:
            try:
                if samples is None:
                    raise ValueError("PolicyEngine.scatter: global rank 0 must pass the step's samples")
                shares = data_parallel_shares(
                    samples, mini_batches=self.loss_config.mini_batches, dp_size=dp_size
                )
                payload = [shares[self._dp_rank_of[r]] for r in range(world)]
            except ValueError as exc:  # every rank raises it instead of waiting for a share
                payload = [exc] * world
        received: list[Any] = [None]
        if world == 1:
            received = payload
        else:
            dist.scatter_object_list(received, payload, src=0)
        if isinstance(received[0], ValueError):
            raise received[0]
        return received[0]

    def gather(self, share: Share, values: list[Any]) -> list[Any] | None:
        """Per-sample results (`values[j]` of `share.samples[j]`, e.g. `compute_logprobs`'s) to global
        rank 0, as one list in the step's global order; None on every other rank.

        Collective over rank 0's data-parallel group only (its shares cover the step once; the ranks of
        other DP groups hold copies and return None at once).
        """
        group = parallel_state.get_data_parallel_group()
        ranks = dist.get_process_group_ranks(group)
        if 0 not in ranks:
            return None
        mine = list(zip(share.indices, values))
        parts: list[Any] | None = [mine]
        if len(ranks) > 1:
            parts = [None] * len(ranks) if dist.get_rank() == 0 else None
            dist.gather_object(mine, parts, dst=0, group=group)
        if dist.get_rank() != 0:
            return None
        out: list[Any] = [None] * share.num_samples
        for part in parts:
            for i, value in part:
                out[i] = value
        return out

    @torch.no_grad()
    def compute_logprobs(self, samples: list[Sample]) -> list[torch.Tensor]:
        """Log-probs of each sample's response tokens under the current weights: `[n_response_i]` fp32 CPU.

        With `routing_replay="r2"` the experts chosen here are kept for these `Sample` objects (replacing
        those of the previous call) and replayed by `train_step`; with "r3" `Sample.routing` is replayed.
        """
        for m in self.model:
            m.eval()
        routing = self.routing.rows_for(samples, update=False) if self.routing is not None else None
        batches, groups = self._micro_batches(samples, None, routing)

        def loss_func(batch, num_mb, logits):
            logp = self._logprobs(batch, logits, inplace=False)
            return logits.new_zeros(()), {"logp": [x.cpu() for x in batch.response_values(logp)]}

        if self.routing is None:
            outputs = self._run(batches, loss_func, forward_only=True)
        else:
            self.routing.begin("replay" if routing is not None else "record")
            try:
                outputs = self._run(batches, loss_func, forward_only=True)
                if routing is None:
                    self.routing.store(samples, groups, batches)
            finally:
                self.routing.end()
        result: list[torch.Tensor | None] = [None] * len(samples)
        for g, out in zip(groups, outputs):
            for i, logp in zip(g, out["logp"]):
                result[i] = logp
        return self._from_last_stage(result)

    def train_step(
        self, samples: Share | list[Sample], old_logprobs: list[torch.Tensor] | None = None
    ) -> dict[str, float]:
        """One optimizer step per mini-batch; returns metrics averaged over the mini-batches (DP-global).

        `samples`: a `Share` from `scatter` (one step per global mini-batch, this rank's part of each:
        `share.mini_batch_sizes`), or a list of this DP rank's samples, split locally into
        `loss_config.mini_batches` (`split_mini_batches`; every DP rank must then hold ≥ that many).
        `old_logprobs[i]` is `[n_response_i]` log π_old of the i-th local sample; when None, each sample's
        `old_logprobs` is used, and where that is missing too, the current policy's (one
        `compute_logprobs` pass) — on-policy.
        Routing replay: "r2" replays the experts of the last `compute_logprobs(samples)` call (the same
        `Sample` objects; without one, a `compute_logprobs` pass records them now), "r3" `Sample.routing`;
        every forward of every mini-batch replays them.
        """
        if isinstance(samples, Share):
            sizes = samples.mini_batch_sizes
            if len(sizes) != self.loss_config.mini_batches:
                raise ValueError(
                    f"the share has {len(sizes)} mini-batches, loss.mini_batches is "
                    f"{self.loss_config.mini_batches} (scatter with the same LossConfig)"
                )
            bounds = [sum(sizes[:k]) for k in range(len(sizes) + 1)]
            indices = [list(range(bounds[k], bounds[k + 1])) for k in range(len(sizes))]
            samples = samples.samples
        else:
            indices = split_mini_batches(list(range(len(samples))), self.loss_config.mini_batches)
        if old_logprobs is None:
            old_logprobs = [s.old_logprobs for s in samples]
            if any(x is None for x in old_logprobs):
                old_logprobs = self.compute_logprobs(samples)
        routing = None
        if self.routing is not None:
            if self.routing.missing(samples):
                self.compute_logprobs(samples)
            routing = self.routing.rows_for(samples, update=True)
        start = time.perf_counter()
        dp_group = parallel_state.get_data_parallel_group()
        totals: dict[str, float] = {}
        losses, grad_norms, skipped, lr = [], [], 0, 0.0
        for k, idx in enumerate(indices):
            mb_samples = [samples[i] for i in idx]
            mb_routing = [routing[i] for i in idx] if routing is not None else None
            loss, stats, grad_norm = self._mini_batch_step(
                mb_samples, [old_logprobs[i] for i in idx], mb_routing
            )
            losses.append(loss)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            lr = self.optimizer.param_groups[0]["lr"]
            if math.isfinite(grad_norm):
                self.scheduler.step(increment=1)
                grad_norms.append(grad_norm)
            else:
                skipped += 1
                logger.warning("mini-batch %d: non-finite grad norm %s, optimizer step skipped", k, grad_norm)
        tokens = torch.tensor([float(sum(s.seq_len + 1 for s in samples))], device=self.device)
        dist.all_reduce(tokens, group=dp_group)
        elapsed = time.perf_counter() - start
        weight = totals.pop("_tokens", 0.0)
        metrics = {key: value / max(weight, 1.0) for key, value in totals.items() if not key.endswith("_max")}
        metrics.update({key: value for key, value in totals.items() if key.endswith("_max")})
        metrics.update(
            loss=sum(losses) / len(losses),
            grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else float("nan"),
            lr=lr,
            skipped_steps=float(skipped),
            tokens_per_s=float(tokens[0]) / elapsed,
            **{f"loss/mini_batch_{k}": loss for k, loss in enumerate(losses)},
        )
        return metrics

    def _mini_batch_step(
        self,
        samples: list[Sample],
        old_logprobs: list[torch.Tensor],
        routing: list[torch.Tensor] | None = None,
    ) -> tuple[float, dict[str, float], float]:
        """Forward/backward one mini-batch and step; returns (loss, token-weighted stat sums, grad norm)."""
        cfg = self.loss_config
        if cfg.rollout_correction != "off" and any(s.engine_logprobs is None for s in samples):
            raise ValueError(
                f"loss.rollout_correction={cfg.rollout_correction!r} needs every sample's engine log-probs "
                "(Sample.engine_logprobs); some have none"
            )
        dp_group = parallel_state.get_data_parallel_group()
        dp_size = parallel_state.get_data_parallel_world_size()
        local = sum(count_for_normalizer(s.response_mask()[None], cfg.aggregation) for s in samples)
        counts = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
        dist.all_reduce(counts, group=dp_group)
        normalizer = max(float(counts[0]), 1.0)
        batches, _ = self._micro_batches(samples, old_logprobs, routing)

        def loss_func(batch, num_mb, logits):
            logp = self._logprobs(batch, logits, inplace=True)
            loss, metrics = compute_policy_loss(
                cfg.name,
                logp,
                batch.old_logprobs,
                batch.advantages,
                batch.loss_mask,
                aggregation=cfg.aggregation,
                normalizer=normalizer,
                log_ratio_clamp=cfg.log_ratio_clamp,
                rollout_correction=cfg.rollout_correction,
                rollout_correction_cap=cfg.rollout_correction_cap,
                engine_logp=batch.engine_logprobs,
                **cfg.params,
            )
            # Undo the schedule's 1/num_microbatches and DDP's 1/DP (see the module docstring).
            return loss * (num_mb * dp_size), {
                "loss": float(loss.detach()),
                "metrics": metrics,
                "tokens": float(batch.loss_mask.sum()),
            }

        for m in self.model:
            m.train()
            m.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.routing is None:
            outputs = self._run(batches, loss_func, forward_only=False)
        else:
            self.routing.begin("replay")
            try:
                outputs = self._run(batches, loss_func, forward_only=False)
            finally:
                self.routing.end()

        result = self._reduce_stats(self._from_last_stage(_summarise(outputs)))
        # Megatron's fp32 step does not test for inf/nan (only its fp16 grad scaler does): check first.
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if math.isfinite(grad_norm):
            self.optimizer.step()
        return result.pop("loss"), result, grad_norm

    def _reduce_stats(self, summary: dict[str, dict[str, float]]) -> dict[str, float]:
        """DP-reduce a `_summarise` result: sums are summed, maxima maxed (key order is the same on all)."""
        group = parallel_state.get_data_parallel_group()
        out = {}
        for kind, op in (("sum", dist.ReduceOp.SUM), ("max", dist.ReduceOp.MAX)):
            keys = sorted(summary[kind])
            vec = torch.tensor([summary[kind][k] for k in keys], dtype=torch.float64, device=self.device)
            if keys:
                dist.all_reduce(vec, op=op, group=group)
            out.update(zip(keys, vec.tolist()))
        return out


def _fuse_cpu_adam(optimizer: Any) -> None:
    """Step megatron's torch AdamW with torch's fused CPU kernel: built with torch's defaults it updates one
    tensor at a time on CPU (GPU runs use TE's / Apex's fused Adam instead). The same update, one call per
    parameter group: ~10x faster on the ~40 tensors of the tiny CPU models (benchmarks/RESULTS.md)."""
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)
        if isinstance(inner, torch.optim.Adam | torch.optim.AdamW):
            for group in inner.param_groups:
                group["fused"], group["foreach"] = True, False
            inner.defaults["fused"], inner.defaults["foreach"] = True, False


def _summarise(outputs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-micro-batch loss outputs → {"sum": loss, _tokens, token-weighted metric sums; "max": maxima}."""
    sums: dict[str, float] = {"loss": 0.0, "_tokens": 0.0}
    maxima: dict[str, float] = {}
    for out in outputs:
        sums["loss"] += out["loss"]
        sums["_tokens"] += out["tokens"]
        for key, value in out["metrics"].items():
            if key in ("loss", "pg_loss"):
                continue
            if key.endswith("_max"):
                maxima[key] = max(maxima.get(key, -math.inf), value)
            else:
                sums[key] = sums.get(key, 0.0) + value * out["tokens"]
    return {"sum": sums, "max": maxima}
