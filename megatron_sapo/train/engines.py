"""Rank 0's rollout side of a run: the engine (SGLang servers launched, on other nodes, or given by URL;
or the in-process transformers engine), the weight-sync settings, the reward runner and greedy eval.
Tests: tests/e2e/test_trainer.py, tests/e2e/test_multirank.py.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch.distributed as dist

from megatron_sapo.cluster.launch import Launch, engine_urls, every_node_engines
from megatron_sapo.rewards import RewardRunner, get_reward
from megatron_sapo.rollout import RolloutEngine, SamplingParams, WeightSyncConfig
from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.train.data import RunData

log = logging.getLogger(__name__)


def build_engine(cfg: TrainJobConfig, hf_dir: Path, out: Path, launch: Launch) -> RolloutEngine:
    """Rank 0: the rollout engine: servers on other nodes by URL (disaggregated engine nodes, or every
    train node's colocated ones), given URLs, servers launched on this node (colocated), or the
    in-process engine."""
    r = cfg.rollout
    if r.engine == "transformers":
        from megatron_sapo.rollout.hf_engine import TransformersEngine

        return TransformersEngine(str(hf_dir), seed=cfg.run.seed)
    from megatron_sapo.cluster.engine_nodes import remote_endpoints, server_configs
    from megatron_sapo.rollout import SGLangEngine, SGLangServer
    from megatron_sapo.rollout.client import Endpoint
    from megatron_sapo.rollout.engine_key import API_KEY_ENV, EngineKey

    urls = engine_urls(launch, cfg.cluster, r.num_engines)
    if urls:
        return SGLangEngine(remote_endpoints(urls, out, r.server.startup_timeout), model_path=str(hf_dir))
    if r.urls:
        key = EngineKey.from_env()  # servers the user started with their own key
        if key.api is None:
            log.warning(
                "rollout.urls: %s is not set; requests carry no key (a server started without --api-key "
                "lets anyone who reaches its port generate and replace its weights)",
                API_KEY_ENV,
            )
        return SGLangEngine([Endpoint(u, key) for u in r.urls], model_path=str(hf_dir))
    server_config = r.server_config(str(hf_dir))
    server_config.log_dir = server_config.log_dir or str(out / "logs")
    servers = [SGLangServer(c) for c in server_configs(server_config, r.num_engines)]
    for s in servers:  # all load in parallel, then wait for each
        s.launch()
    for s in servers:
        s.wait_ready(s.config.startup_timeout)
    return SGLangEngine(servers)


def weight_sync_config(cfg: TrainJobConfig, launch: Launch) -> WeightSyncConfig:
    """The weight sync settings; "distributed" to other nodes' engines meets at trainer rank 0's node.

    The node's name, not its address here: the engines resolve it on their side (a name that maps to
    127.0.1.1 in this node's /etc/hosts still reaches this node from the others)."""
    ws = cfg.rollout.weight_sync
    remote = launch.engine_nodes or every_node_engines(launch, cfg.cluster)
    if remote and ws.transport == "distributed" and ws.master_address == "127.0.0.1":
        return dataclasses.replace(ws, master_address=launch.master_addr)
    return ws


def build_reward_runner(cfg: TrainJobConfig) -> RewardRunner:
    return RewardRunner(get_reward(cfg.reward.name), timeout_s=cfg.reward.timeout_s)


def evaluate(
    cfg: TrainJobConfig, engine: RolloutEngine, data: RunData, rewards: RewardRunner
) -> dict[str, float]:
    """Rank 0 (others return {}): greedy accuracy on the eval set (reward > 0.5 counts as correct)."""
    if dist.get_rank() != 0 or not data.eval:
        return {}
    params = SamplingParams(
        max_new_tokens=cfg.rollout.sampling.max_new_tokens,
        temperature=0.0,
        stop_token_ids=cfg.rollout.sampling.stop_token_ids + data.stop_token_ids,
    )
    gens = engine.generate(data.eval_prompts(), params, n=cfg.run.eval_samples)
    texts = [g.text if g.text is not None else data.decode(g.token_ids) for g in gens]
    scores, _ = rewards.score(texts, [data.eval[g.prompt_index] for g in gens])
    return {"eval/accuracy": sum(s > 0.5 for s in scores) / len(scores)}
