"""A torch_dist save strategy for megatron `dist_checkpointing` that writes in the calling process.

megatron-core's default torch_dist writer (0.16.1) asks a *spawned* multiprocessing manager for a results
queue and *forks* one writer process per bucket from the training process, which under gloo is
multithreaded: seconds of overhead per save on small machines, and a fork from a multithreaded process
can deadlock. This strategy writes the same files (readable by megatron's default loader) sequentially
in the calling process, with fsync; no plan caching and no async save::

    dist_checkpointing.save(sharded_state_dict, path, sharded_strategy=InProcessTorchDistSave())

Relies on megatron-core internals of `dist_checkpointing.strategies` (checked with 0.16.1). Tests:
``python -m pytest tests/distributed/test_checkpoint.py -q``.
"""

from __future__ import annotations

import queue
from functools import partial
from pathlib import Path
from typing import Any

import torch.distributed as dist
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
from megatron.core.dist_checkpointing.strategies.state_dict_saver import save_state_dict_async_plan
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)

__all__ = ["InProcessTorchDistSave"]


class _InProcessWriter(FileSystemWriterAsync):
    """megatron's torch_dist file writer, writing this rank's buckets in the calling process."""

    def prepare_write_data(self, plan: Any, planner: Any) -> None:
        # The parent asks for a results queue from a spawned multiprocessing manager; a plain queue is
        # enough when nothing leaves this process.
        original = filesystem_async._get_write_results_queue
        filesystem_async._get_write_results_queue = queue.SimpleQueue
        try:
            super().prepare_write_data(plan, planner)
        finally:
            filesystem_async._get_write_results_queue = original

    def get_save_function_and_args(self) -> tuple[Any, Any, list]:
        if not self.write_buckets:
            return None, None, []
        transforms = [self.transforms] if hasattr(self, "transforms") else []
        return (
            partial(_write_buckets, transforms),
            partial(self.preload_tensors, self.write_buckets, False),
            [dist.get_rank(), self.write_buckets, self.results_queue],
        )


def _write_buckets(transforms: list, rank: int, buckets: list, results: queue.SimpleQueue) -> None:
    """Write every bucket sequentially here (megatron forks one process per bucket instead)."""
    written: dict[int, Any] = {}
    for index, bucket in enumerate(buckets):
        local, count = queue.SimpleQueue(), queue.Queue()
        count.put(index)  # the worker function signals completion through this queue
        FileSystemWriterAsync.write_preloaded_data(transforms, index, bucket, local, count, use_fsync=True)
        _, outcome = local.get()
        if isinstance(outcome, Exception):
            written = outcome  # retrieve_write_results turns it into the save's error
            break
        written[index] = outcome
    results.put(written)


class InProcessTorchDistSave(TorchDistSaveShardedStrategy):
    """torch_dist save strategy without worker processes: the same files as megatron's default, written by
    the calling process (no plan caching, no async save). Usable with any `dist_checkpointing.save`::

        dist_checkpointing.save(sharded_state_dict, path, sharded_strategy=InProcessTorchDistSave())
    """

    def __init__(self) -> None:
        super().__init__("torch_dist", 1, thread_count=1)

    def async_save(self, sharded_state_dict: dict, checkpoint_dir: Path) -> Any:
        sharded_state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica
        )
        writer = _InProcessWriter(checkpoint_dir, thread_count=self.thread_count)
        planner = MCoreSavePlanner(
            dedup_replicated_tensors=not self.keep_only_main_replica, flatten_state_dict=False
        )
        plan = save_state_dict_async_plan(
            mcore_to_pyt_state_dict(sharded_state_dict, False), writer, None, 0, planner=planner
        )
        return self._get_save_and_finalize_callbacks(writer, plan[0])
