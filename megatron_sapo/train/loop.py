"""The RL loop: rollout -> rewards -> group advantages -> pi_old -> mini-batch updates -> weight sync.

    megatron-sapo train configs/quickstart.yaml run.steps=3      # calls run(cfg) on every rank

Every trainer rank builds the megatron policy (`PolicyEngine`, any TP/PP/EP layout); global rank 0 also
owns the rollout engine (SGLang servers or the in-process transformers engine) and the rewards, and
sends each data-parallel rank only its token-balanced share of each step's samples
(`PolicyEngine.scatter`; the ranks of one model-parallel group get the same share): every rank runs the
pi_old pass and the updates on its share only, gradients are all-reduced, and rank 0 gathers the pi_old
log-probs back for the engine-trainer mismatch metric (`_update_policy`; docs/multinode.md, "How
samples flow at scale"). Per step: n samples per prompt, rewards (a crash or
timeout is a 0 reward and a counted warning), group-normalised advantages, optional dynamic sampling
(drop groups whose rewards are all equal, sample more prompts), trainer-side pi_old log-probs, the
loss's mini-batch updates, weight sync to the engines + the log-prob mismatch guard, periodic greedy
eval, one metrics.jsonl row, checkpoints. Resuming: rerun the same command; it continues from the newest
checkpoint in <output_dir>/checkpoints. Where each process runs (srun / torchrun / alone; colocated or
disaggregated engines) is `launch.py`; engine-node processes of a disaggregated run serve SGLang
(`engine_nodes.py`) instead of training. A launched server that dies is restarted by rank 0 with the
initial weights; no sample, probe or eval answer comes from them: a single-process trainer re-pushes the
weights from a restart hook and retries; with several ranks the export is collective, so the interrupted
rollout / guard / eval raises `EngineRestarted` on every rank, all ranks re-sync, and it is redone from
scratch (`_with_resync`, at most MAX_ENGINE_RESTARTS times per call; counted as rollout/restarts). The run's
parts live beside it in `megatron_sapo/train/`: setup.py (processes, model), data.py, engines.py (rollout
engine, rewards, eval), outputs.py (metrics, plots, final export), config.py (the config sections).
NaN / inf probabilities (engine or trainer side) stop the run with `PolicyDiverged` naming the step,
before its metrics row and checkpoint (`_stop_if_diverged`).
Tests: tests/e2e/test_trainer.py, tests/e2e/test_multirank.py.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_sapo.cluster.engine_nodes import node_engines, serve_engine_node, stop_engines_at_exit
from megatron_sapo.cluster.launch import Launch
from megatron_sapo.data import DataError
from megatron_sapo.losses import group_advantages
from megatron_sapo.megatron.batching import Sample
from megatron_sapo.megatron.checkpoint import load_latest_checkpoint, save_checkpoint
from megatron_sapo.megatron.engine import PolicyEngine
from megatron_sapo.megatron.models import build_gpt_model
from megatron_sapo.rewards import RewardRunner
from megatron_sapo.rollout import RolloutEngine, RolloutError, SamplingParams, WeightSync
from megatron_sapo.rollout.client import EngineRestarted
from megatron_sapo.rollout.types import PolicyDiverged
from megatron_sapo.train import engines, outputs, run_lock, setup
from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.train.data import RunData, load_data
from megatron_sapo.train.guard import WeightSyncMismatch, check_rollout, check_weight_sync
from megatron_sapo.train.pipeline import RolloutPipeline, generate_partial, sample_row

log = logging.getLogger(__name__)

MAX_ENGINE_RESTARTS = 3
"""Server restarts one rollout / guard / eval call survives (each: re-sync, redo) before the run fails."""


def run(cfg: TrainJobConfig) -> int:
    launch = setup.init_distributed(cfg)
    out = Path(cfg.run.output_dir)
    if launch.role == "engine":  # disaggregated: this node serves SGLang until the trainers stop it
        run_lock.release(out)  # the CLI's rank 0 may sit here: the lock belongs to trainer rank 0
        run_lock.wait_for_own_run(out, timeout=cfg.rollout.server.startup_timeout)
        model_dir = setup.model_dir(cfg)
        return serve_engine_node(launch, cfg.cluster, cfg.rollout, output_dir=out, model_dir=model_dir)
    with run_lock.hold(out, launch.rank), stop_engines_at_exit(out, launch):  # a refused run stops no engine
        return _train(cfg, launch)


def _train(cfg: TrainJobConfig, launch: Launch) -> int:
    out = Path(cfg.run.output_dir)
    hf_dir = setup.prepare_model(cfg, out)
    with node_engines(
        launch, cfg.cluster, cfg.rollout, model=hf_dir, output_dir=out
    ) as node_servers:  # colocated "every_node"; else none
        return _train_with(cfg, out, hf_dir, launch, node_servers)


def _train_with(cfg: TrainJobConfig, out: Path, hf_dir: Path, launch: Launch, node_servers: list) -> int:
    driver = dist.get_rank() == 0
    tokenizer, hf_config = setup.load_tokenizer_and_config(hf_dir)
    data = load_data(cfg, tokenizer, setup.load_processor(hf_dir, hf_config))
    policy = PolicyEngine(
        partial(build_gpt_model, hf_config, config=setup.model_config(cfg, hf_config)),
        cfg.optim,
        cfg.loss,
        pad_token_id=tokenizer.pad_token_id or 0,
        temperature=cfg.rollout.sampling.temperature,
    )
    ckpt_root = out / "checkpoints"
    start = 0
    resumed = load_latest_checkpoint(
        ckpt_root, model_chunks=policy.model, optimizer=policy.optimizer, scheduler=policy.scheduler
    )
    if resumed is not None:
        start, _, path = resumed
        if driver:  # WARNING: shown even when the progress bar hides INFO lines
            log.warning("resuming from checkpoint %s at step %d of %d", path, start, cfg.run.steps)
    else:
        from megatron_sapo.bridge.load import load_hf_weights

        load_hf_weights(policy.model, hf_config, hf_dir)
    for server in node_servers:  # this node's engines loaded while the policy was built
        server.wait_ready(server.config.startup_timeout)
    writer = outputs.MetricsWriter(out, cfg, resume_step=start) if driver else None
    engine = engines.build_engine(cfg, hf_dir, out, launch) if driver else None
    rewards = engines.build_reward_runner(cfg) if driver else None
    pipeline: RolloutPipeline | None = None
    try:
        sync = WeightSync(engine, policy.model, hf_config, engines.weight_sync_config(cfg, launch))
        if start == 0 and cfg.sft.steps:
            _cold_start(cfg, policy, data, writer)
        sync.sync(version=str(start))
        asynchronous = cfg.rollout.max_staleness > 0
        if driver:
            sync.resync_on_restart(retry=not asynchronous)
        evaluate = partial(engines.evaluate, cfg, engine, data, rewards)
        if start == 0:
            acc, _ = _with_resync(partial(_from_driver, evaluate), sync, str(start), "eval")
            if writer:
                writer.write({"step": 0, **acc})
        if driver and asynchronous and start < cfg.run.steps:

            def produce(s: int, hold: Callable[[], AbstractContextManager] | None = None) -> tuple:
                generate = engine.generate if hold is None else partial(generate_partial, engine, hold=hold)
                return _rollout(cfg, s, engine, rewards, data, generate)

            pipeline = RolloutPipeline(
                produce,
                first_step=start,
                last_step=cfg.run.steps,
                max_staleness=cfg.rollout.max_staleness,
                interrupt=engine.interrupt if cfg.rollout.partial else None,
            )
        access = _engine_access(pipeline)
        for step in range(start, cfg.run.steps):
            t0 = time.perf_counter()
            with _stop_if_diverged(step + 1):  # before this step's row and checkpoint are written
                row = _rl_step(cfg, step, policy, engine, rewards, data, sync, pipeline)
                if _evaluates(cfg, step):
                    t = time.perf_counter()
                    locked = partial(_holding, access, evaluate)
                    acc, restarts = _with_resync(
                        partial(_from_driver, locked), sync, str(step + 1), "eval", access
                    )
                    row.update(acc)
                    row["rollout/restarts"] += restarts
                    row["time/eval_s"] = time.perf_counter() - t
            if (cfg.run.save_every and (step + 1) % cfg.run.save_every == 0) or step + 1 == cfg.run.steps:
                t = time.perf_counter()
                # saved before the row is written: a row on disk always has its step's work behind it
                save_checkpoint(
                    ckpt_root,
                    step=step + 1,
                    model_chunks=policy.model,
                    optimizer=policy.optimizer,
                    scheduler=policy.scheduler,
                    keep_last=cfg.run.keep_last or None,
                )
                row["time/checkpoint_s"] = time.perf_counter() - t
            _close_step_times(row, t0)
            if writer:
                writer.write(row)
        outputs.export_final_hf(cfg, policy, hf_config, hf_dir, out)
        if writer:
            writer.finish()
            writer.summary()
    finally:
        if pipeline is not None:
            pipeline.close()
        if rewards is not None:
            rewards.close()
        if engine is not None:
            engine.shutdown()
    return 0


def _cold_start(
    cfg: TrainJobConfig, policy: PolicyEngine, data: RunData, writer: outputs.MetricsWriter | None
) -> None:
    """Supervised cold start: a policy-gradient step with advantage 1 at ratio 1 is exactly the gradient of
    the mean token log-likelihood of the demonstrations (one on-policy mini-batch per step)."""
    loss_config, temperature, routing = policy.loss_config, policy.temperature, policy.routing
    # demonstrations have no engine log-probs: nothing to correct
    policy.loss_config = replace(loss_config, mini_batches=1, rollout_correction="off")
    # temperature 1: the likelihood of the model itself, not of the rollouts' tempered distribution
    policy.temperature = 1.0
    # No routing replay: on-policy it replays the experts the router picks anyway, and its rounding-level
    # differences would make loss.routing_replay change the cold-start model (runs compared by loss
    # must start from the same one).
    policy.routing = None
    started = time.perf_counter()
    driver = dist.get_rank() == 0
    # rank 0 draws (and renders) the batches; a prompt that fails to render stops every rank (_from_driver)
    batches = data.sft_batches(cfg.sft.batch_size, cfg.sft.steps, seed=cfg.run.seed) if driver else None
    for step in range(cfg.sft.steps):
        for group in policy.optimizer.param_groups:
            group["lr"] = cfg.sft.lr

        def draw() -> list[Sample]:
            return [_sample(t, r, 1.0, key) for t, r, key in next(batches)]

        samples = _from_driver(draw, driver_only=True)
        # rank 0's batch is split so that each DP rank trains on its share
        share = policy.scatter(samples)
        share.samples = data.attach_images(share.samples)  # each rank renders its own share's images
        # the demonstrations' log-probs before the step: the surrogate's value is a constant here (ratio
        # 1, advantage 1), their mean negative log-likelihood is what a cold start is judged by
        logps = policy.compute_logprobs(share.samples)
        share.samples = [replace(s, old_logprobs=lp) for s, lp in zip(share.samples, logps)]
        policy.train_step(share)
        if step % 10 == 0 or step + 1 == cfg.sft.steps:
            nll = [-sum(float(lp.sum()) for lp in logps), float(sum(lp.numel() for lp in logps))]
            sums = torch.tensor(nll, dtype=torch.float64, device=policy.device)
            dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
            if writer:
                writer.log_sft(step, float(sums[0] / sums[1]), time.perf_counter() - started)
    policy.loss_config, policy.temperature, policy.routing = loss_config, temperature, routing
    # the RL schedule (warm-up included) starts after the cold start
    policy.scheduler.num_steps = 0
    policy.scheduler.step(increment=0)


PHASES = (
    "time/generate_s",  # the engine's generate calls (rank 0; asynchronous: rollout/generate_s, beside)
    "time/reward_s",  # scoring (rank 0; asynchronous: rollout/reward_s, beside the trainer)
    "time/rollout_wait_s",  # asynchronous rollouts: waiting for the step's batch from the pipeline
    "time/sync_wait_s",  # asynchronous rollouts: waiting for the generation in flight before the sync
    "time/logprobs_s",  # pi_old: scatter, forward, gather, the finite and rollout checks
    "time/train_s",  # the mini-batch updates
    "time/export_s",  # the bridge's export inside the sync (rank 0's stage)
    "time/load_s",  # the rest of the sync: transport, the engines' loading, agreements
    "time/guard_s",  # the probes after a sync
    "time/eval_s",
    "time/checkpoint_s",
)
"""Where an RL step's wall time (time/step_s) goes; time/other_s is the rest (advantages, sample building,
broadcasts between ranks, rank 0's HTTP bookkeeping): the gaps between the phases."""


def _close_step_times(row: dict[str, float], t0: float) -> None:
    """Every phase in the row (0 when it did not run this step), the step's wall time and the gaps."""
    row["time/step_s"] = time.perf_counter() - t0
    for key in PHASES:
        row.setdefault(key, 0.0)
    row["time/other_s"] = row["time/step_s"] - sum(row[key] for key in PHASES)


def _evaluates(cfg: TrainJobConfig, step: int) -> bool:
    return bool(cfg.run.eval_every and (step + 1) % cfg.run.eval_every == 0) or step + 1 == cfg.run.steps


def _probes(cfg: TrainJobConfig, step: int) -> bool:
    """Whether the sync after `step` is probed: every `guard_every`-th, and always before an eval and after
    the last step (no later rollout checks those); the others are checked by the next step's rollout."""
    r = cfg.rollout
    return bool(r.guard_prompts) and ((step + 1) % r.guard_every == 0 or _evaluates(cfg, step))


def _rl_step(
    cfg: TrainJobConfig,
    step: int,
    policy: PolicyEngine,
    engine: RolloutEngine | None,
    rewards: RewardRunner | None,
    data: RunData,
    sync: WeightSync,
    pipeline: RolloutPipeline | None = None,
) -> dict[str, float]:
    """One RL step; `pipeline` (rank 0, rollout.max_staleness > 0) hands over the rollout it generated
    beside the previous steps, and holds the engines while this step syncs and probes."""
    t0 = time.perf_counter()
    driver = dist.get_rank() == 0
    lend = driver and cfg.lends_engine_memory
    access = _engine_access(pipeline)
    if pipeline is not None:
        rollout = partial(pipeline.take, step)
    else:
        rollout = partial(_rollout, cfg, step, engine, rewards, data)
    # The rollout stays on rank 0: the other ranks get only their share of it, from policy.scatter.
    result, restarts = _with_resync(
        partial(_from_driver, rollout, driver_only=True), sync, str(step), "rollout", access
    )
    rows, stats = result if driver else ([], {})
    if lend:  # colocated GPUs: the engines' weights and KV cache make room for training
        engine.release_memory()
    t_rollout = time.perf_counter() - t0
    # mu for the rollout correction (loss.rollout_correction); scattered with the samples only when used
    corrected = cfg.loss.rollout_correction != "off"
    samples = [_sample(t, r, a, key, e if corrected else None) for t, r, a, e, _, key, _ in rows]
    guarded = bool(cfg.rollout.guard_prompts)  # 0: the metrics, never a verdict
    check = partial(
        check_rollout,
        engine=[row[3] for row in rows],
        versions=[row[4] for row in rows],
        version=str(step) if guarded else None,
        threshold=cfg.rollout.guard_threshold if guarded else math.inf,
        asynchronous=cfg.rollout.max_staleness > 0,
    )
    _, metrics = _update_policy(policy, samples if driver else None, check, data.attach_images)
    if not math.isfinite(metrics["loss"]):
        # step + 1: the metrics.jsonl row this step writes
        log.warning(
            "step %d: non-finite loss %s (its optimizer steps were skipped)", step + 1, metrics["loss"]
        )
    t2 = time.perf_counter()
    if lend:
        engine.resume_memory()  # the sync below refills the weights
    # asynchronous rollouts: waits for the generation in flight (one version per batch), or interrupts it
    # (partial rollouts: its samples continue under the new weights)
    with access():
        t_wait = time.perf_counter() - t2
        metrics.update(sync.sync(version=str(step + 1)))
    t3 = time.perf_counter()
    probed = _probes(cfg, step)
    if probed:
        # Not scattered: every rank scores all probes (rollout.guard_prompts, a handful of short ones).
        probes = data.train_prompt_ids(step * 7919, cfg.rollout.guard_prompts)
        guard = partial(
            check_weight_sync,
            engine,
            policy,
            probes,
            version=str(step + 1),
            threshold=cfg.rollout.guard_threshold,
            seed=cfg.run.seed + step,
            stop_token_ids=data.stop_token_ids,
        )
        checked, guard_restarts = _with_resync(
            partial(_holding, access, guard), sync, str(step + 1), "weight-sync check", access
        )
        metrics.update(checked)
        restarts += guard_restarts
    t4 = time.perf_counter()
    export = metrics.get("sync/export_s", 0.0)
    return {
        "step": step + 1,
        **stats,
        **metrics,
        "rollout/restarts": float(restarts),
        "time/rollout_s": t_rollout,
        "time/sync_s": t3 - t2 - t_wait,
        "time/sync_wait_s": t_wait,
        "time/export_s": export,
        "time/load_s": t3 - t2 - t_wait - export,
        "time/guard_s": t4 - t3 if probed else 0.0,
    }


def _update_policy(
    policy: PolicyEngine,
    samples: list[Sample] | None,
    check: Callable[..., dict] | None = None,
    attach: Callable[[list[Sample]], list[Sample]] | None = None,
) -> tuple[list[torch.Tensor] | None, dict[str, float]]:
    """Every rank: one step's pi_old pass and mini-batch updates, each DP rank on its share only.

    Global rank 0 passes the step's samples, the others None. Returns (on rank 0 the pi_old log-probs
    `[n_response_i]` of every sample in the step's order, elsewhere None; the train metrics, DP-global,
    with time/logprobs_s and time/train_s, and on rank 0 what `check(pi_old log-probs)` returned: the
    rollout check). Non-finite log-probs raise `PolicyDiverged`, a rollout the engine generated with other weights
    than the trainer's `WeightSyncMismatch`, on every rank, before any update.
    """
    t = time.perf_counter()
    share = policy.scatter(samples)
    if attach is not None:  # e.g. each rank renders its share's images (`RunData.attach_images`)
        share.samples = attach(share.samples)
    old = policy.compute_logprobs(share.samples)
    old_all = policy.gather(share, old)

    def verdict() -> dict[str, float]:
        _check_finite(old_all)
        return check(old_all) if check is not None else {}

    # Rank 0 holds every share's log-probs now: its verdict reaches every rank, so all stop together.
    checked = _from_driver(verdict, driver_only=True) or {}
    t_logprobs = time.perf_counter() - t
    t = time.perf_counter()
    metrics = policy.train_step(share, old)
    return old_all, {
        **metrics,
        **checked,
        "time/logprobs_s": t_logprobs,
        "time/train_s": time.perf_counter() - t,
    }


def _from_driver(fn: Callable[[], Any], *, driver_only: bool = False) -> Any:
    """Rank 0 runs `fn` (an engine call) and every rank gets its result (`driver_only`: rank 0 keeps it,
    the others get None; only the outcome is broadcast); an `EngineRestarted` on rank 0 is raised on every
    rank, so that all of them can re-sync together, and a `PolicyDiverged` or `WeightSyncMismatch`, so
    that all of them stop."""
    payload: list[Any] = [None]
    result = None
    if dist.get_rank() == 0:
        try:
            result = fn()
            payload = [None if driver_only else result]
        except _SHARED_ERRORS as exc:
            payload = [exc]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(payload, src=0)
    if isinstance(payload[0], _SHARED_ERRORS):
        raise payload[0]
    return result if dist.get_rank() == 0 else payload[0]


@contextmanager
def _stop_if_diverged(step: int) -> Iterator[None]:
    """A `PolicyDiverged` (engine or trainer side) raised inside names `step` (metrics.jsonl numbering)."""
    try:
        yield
    except PolicyDiverged as exc:
        raise PolicyDiverged(
            f"{exc.detail}; stopped before this step's metrics row and checkpoint (lower optim.lr?)",
            step,
        ) from exc


_SHARED_ERRORS = (EngineRestarted, PolicyDiverged, WeightSyncMismatch, DataError)
"""What rank 0's engine-side calls raise on every rank (`_from_driver`); a `DataError`: a prompt of the batch
rank 0 drew could not be rendered (an image that does not decode), and no rank trains on the batch."""


def _check_finite(logprobs: list[torch.Tensor]) -> None:
    """PolicyDiverged when the trainer's log-probs of a rollout sample [n_response_i] are not finite (rank 0,
    on the whole step's, gathered; `_update_policy` raises its verdict on every rank)."""
    bad = [i for i, lp in enumerate(logprobs) if not torch.isfinite(lp).all()]
    if bad:
        raise PolicyDiverged(
            f"the trainer's log-probs of {len(bad)} of {len(logprobs)} rollout samples are not finite "
            f"(first: sample {bad[0]})"
        )


def _engine_access(pipeline: RolloutPipeline | None) -> Callable[[], AbstractContextManager]:
    """What holds the engines for a trainer-side call: the pipeline's access (asynchronous rollouts), else
    nothing (nobody else uses them)."""
    return pipeline.engine_access if pipeline is not None else nullcontext


def _holding(access: Callable[[], AbstractContextManager], fn: Callable[[], Any]) -> Any:
    with access():
        return fn()


def _with_resync(
    call: Callable[[], Any],
    sync: WeightSync,
    version: str,
    what: str,
    access: Callable[[], AbstractContextManager] = nullcontext,
) -> tuple[Any, int]:
    """(`call()`, server restarts survived), `call` run on every rank; it raises `EngineRestarted` on every
    rank when a server had to be restarted (with several trainer ranks, see `WeightSync.resync_on_restart`).

    The restarted server holds the initial weights and only a collective export can push the current
    ones: every rank syncs `version` again, then `call` starts over (what it generated so far is dropped,
    so every sample comes from the synced weights). `access`: holds the engines for the re-sync (the
    rollout pipeline's, asynchronous rollouts).
    """
    for restarts in range(MAX_ENGINE_RESTARTS + 1):
        try:
            return call(), restarts
        except EngineRestarted as exc:
            if restarts == MAX_ENGINE_RESTARTS:
                raise RolloutError(
                    f"{what}: an SGLang server was restarted {restarts + 1} times during one call; giving up "
                    f"(see the server logs). Last: {exc}"
                ) from exc
            log.warning(
                "%s interrupted by a server restart (%s): re-syncing v%s, redoing it", what, exc, version
            )
            with access():
                sync.sync(version=version)
    raise AssertionError("unreachable")


def _rollout(
    cfg: TrainJobConfig,
    step: int,
    engine: RolloutEngine,
    rewards: RewardRunner,
    data: RunData,
    generate: Callable[..., list] | None = None,
) -> tuple[list, dict]:
    """Rank 0: samples + rewards + advantages for one step (dynamic sampling refills zero-signal groups).

    `generate`: `engine.generate` or a partial rollout's (`pipeline.generate_partial`); one
    `pipeline.sample_row` per kept sample."""
    generate = generate or engine.generate
    r = cfg.rollout
    # a per-step seed: a resumed run draws the same samples (where the engine honours seeds)
    base = r.sampling.seed if r.sampling.seed is not None else cfg.run.seed * 1_000_003
    stops = r.sampling.stop_token_ids + [t for t in data.stop_token_ids if t not in r.sampling.stop_token_ids]
    sampling = replace(r.sampling, seed=base + step, stop_token_ids=stops)
    kept: list[tuple[list[int], int, float, list[float], str | None, int | None, list[str] | None]] = []
    t_generate = t_reward = 0.0
    all_rewards: list[float] = []
    reward_stats: dict[str, float] = {}
    lengths, stops, dropped = [], [], 0
    offset = step * r.prompts_per_step
    rounds = 1 + (r.max_refill_rounds if r.dynamic_sampling else 0)
    for round_ in range(rounds):
        need = r.prompts_per_step - len(kept) // r.samples_per_prompt
        if need <= 0:
            break
        records, prompt_ids = data.train_batch(offset, need)
        keys = data.train_keys(offset, need) if data.has_images else [None] * need
        offset += need
        t = time.perf_counter()
        gens = generate(prompt_ids, _sampling(sampling, round_), n=r.samples_per_prompt)
        t_generate += time.perf_counter() - t
        t = time.perf_counter()
        texts = [
            g.text if g.text is not None else _decode(data.decode, g.token_ids, sampling.stop) for g in gens
        ]
        scores, stats = rewards.score(texts, [records[g.prompt_index] for g in gens])
        t_reward += time.perf_counter() - t
        for key, value in stats.items():
            reward_stats[key] = reward_stats.get(key, 0.0) + value
        all_rewards += scores
        adv = group_advantages(torch.tensor(scores), r.samples_per_prompt).tolist()
        for p in range(len(records)):
            group = range(p * r.samples_per_prompt, (p + 1) * r.samples_per_prompt)
            if r.dynamic_sampling and len({scores[i] for i in group}) == 1:
                dropped += 1
                continue
            for i in group:
                g = gens[i]
                if not g.token_ids:
                    continue
                kept.append(sample_row(g, adv[i], keys[g.prompt_index]))
                lengths.append(len(g.token_ids))
                stops.append(g.finish_reason == "stop")
    if not kept:  # every group had equal rewards: train on nothing would stall; keep the last round
        raise RuntimeError("dynamic sampling dropped every group; raise rollout.max_refill_rounds")
    rewards_t = torch.tensor(all_rewards)
    return kept, {
        "reward/mean": rewards_t.mean().item(),
        "reward/std": rewards_t.std().item() if rewards_t.numel() > 1 else 0.0,
        **reward_stats,
        "rollout/response_len": sum(lengths) / len(lengths),
        "rollout/stop_fraction": sum(stops) / len(stops),
        "rollout/groups_dropped": float(dropped),
        "rollout/samples": float(len(kept)),
        "rollout/generated_tokens": float(sum(lengths)),
        "time/generate_s": t_generate,
        "time/reward_s": t_reward,
    }


def _decode(decode: Callable[[list[int]], str], token_ids: list[int], stop: list[str]) -> str:
    """A response's text when the engine sent none (a partial rollout's continued sample): its tokens
    decoded (`RunData.decode`) and, like SGLang's text, cut before the first stop string."""
    text = decode(token_ids)
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def _sample(
    tokens: list[int],
    response_start: int,
    advantage: float,
    key: int | None,
    engine_logprobs: list[float] | None = None,
) -> Sample:
    """A training sample; `key`: its train record when the prompt has images, which each rank renders for
    its own share after the scatter (`RunData.attach_images`: the pixels the engine saw);
    `engine_logprobs`: the engine's log-probs of the response tokens, for the rollout correction."""
    return Sample(
        tokens=torch.tensor(tokens),
        response_start=response_start,
        advantage=advantage,
        prompt_key=key,
        engine_logprobs=None
        if engine_logprobs is None
        else torch.tensor(engine_logprobs, dtype=torch.float32),
    )


def _sampling(params: SamplingParams, round_: int) -> SamplingParams:
    return params if params.seed is None else replace(params, seed=params.seed + 100_003 * round_)
