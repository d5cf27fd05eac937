"""Rollout engines (SGLang servers, in-process transformers) and weight sync from the megatron policy.

SGLang itself runs in the server subprocesses and is never imported here. The `rollout:` run-config
section is `config.py`. May import megatron_sapo.bridge (weights under HF names) and megatron_sapo.utils
only; the check of a sync against the trainer's log-probs lives above, in megatron_sapo/train/guard.py.
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
