"""Rollout engines (SGLang servers, in-process transformers) and weight sync from the megatron policy.

SGLang itself runs in the server subprocesses and is never imported here.
"""

from megatron_sapo.rollout.client import SGLangEngine
from megatron_sapo.rollout.server import ServerConfig, SGLangServer
from megatron_sapo.rollout.types import Generation, RolloutEngine, RolloutError, SamplingParams
from megatron_sapo.rollout.weight_sync import WeightSync, WeightSyncConfig

__all__ = [
    "Generation",
    "RolloutEngine",
    "RolloutError",
    "SGLangEngine",
    "SGLangServer",
    "SamplingParams",
    "ServerConfig",
    "WeightSync",
    "WeightSyncConfig",
]
