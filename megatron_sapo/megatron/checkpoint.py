"""Training checkpoints for exact resume: model chunks, distributed optimizer, LR schedule, RNG, step, extra.

One megatron distributed checkpoint (torch_dist format) per saved step, written atomically::

    save_checkpoint(root, step=7, model_chunks=engine.model, optimizer=engine.optimizer,
                    scheduler=engine.scheduler, extra={"data_position": 112}, keep_last=3)
    step, extra = load_checkpoint(root, model_chunks=..., optimizer=..., scheduler=...)  # newest

Layout of `root` (megatron's naming, so Megatron-LM / slime users recognise it)::

    latest_checkpointed_iteration.txt   "7": the newest *complete* checkpoint (written last, atomically)
    iter_0000007/                       torch_dist: metadata.json, common.pt, .metadata, __<rank>_0.distcp
    iter_0000008.tmp/                   a save in progress or killed mid-way: never loaded, removed later

Atomicity: every rank writes into `iter_XXXXXXX.tmp`; after a barrier rank 0 renames it to its final name
and then replaces the tracker file (temp file + fsync + os.replace). A crash at any point leaves the
tracker on the previous complete checkpoint.

Resharding: model weights are ShardedTensors keyed by global parameter names, so a checkpoint saved at one
TP / PP / virtual-PP / EP / DP layout loads at any other. The optimizer uses the "fully_reshardable"
sharding (each Adam moment and fp32 main param in model space), which reshards the same way, including
MoE's change from dense + expert optimizers (EP>1) to one (EP=1); see `optimizer_ckpt`. The scheduler,
step and `extra` are layout-free. RNG states are per rank and restored only when the layout (TP, PP, VPP,
EP, CP, DP) is unchanged; otherwise the freshly seeded RNG is kept and a warning logged.

Saving writes in the calling process (`dist_ckpt_writer.InProcessTorchDistSave`): megatron's default
torch_dist writer spawns a multiprocessing manager and forks writer processes from the (multithreaded,
under gloo) training process, which is slow on small machines and can hang.

Tests: ``python -m pytest tests/distributed/test_checkpoint.py -q``.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.utils import unwrap_model

from megatron_sapo.megatron.dist_ckpt_writer import InProcessTorchDistSave
from megatron_sapo.megatron.optimizer_ckpt import (
    OPTIMIZER_SHARDING,
    chain,
    init_empty_optimizer_state,
    load_optimizer_state,
    refit_chain,
    without_empty_param_state,
)
from megatron_sapo.megatron.parallel import on_gpu

__all__ = [
    "TRACKER_FILE",
    "checkpoint_path",
    "list_checkpoints",
    "load_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
_ITER = re.compile(r"^iter_(\d{7,})$")


def checkpoint_path(root: str | os.PathLike, step: int) -> Path:
    """Final directory of the checkpoint of `step` under `root`."""
    return Path(root) / f"iter_{step:07d}"


def list_checkpoints(root: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoints under `root` (renamed from `.tmp`), ascending."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if p.is_dir() and (m := _ITER.match(p.name)))


def _layout() -> dict[str, int]:
    return dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        vpp=parallel_state.get_virtual_pipeline_model_parallel_world_size() or 1,
        ep=parallel_state.get_expert_model_parallel_world_size(),
        cp=parallel_state.get_context_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
    )


def _sharded_metadata() -> dict[str, Any]:
    """What megatron's training loop passes to `sharded_state_dict` (TE layers need `dp_cp_group`)."""
    return dict(
        distrib_optim_sharding_type=OPTIMIZER_SHARDING,
        chained_optim_avoid_prefix=True,  # MoE: dense + expert optimizers, keys independent of the chain
        # Gather optimizer shards over the gloo DP group onto DP rank 0 (the default all-gathers CUDA
        # tensors); on GPU keep megatron's default, which spreads the writes over DP ranks.
        distrib_optim_fully_reshardable_mem_efficient=not on_gpu(),
        singleton_local_shards=False,
        dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
    )


def _rng_state() -> dict[str, Any]:
    state = dict(
        random=random.getstate(),
        numpy=np.random.get_state(),
        torch=torch.get_rng_state(),
        tracker=tensor_parallel.get_cuda_rng_tracker().get_states(),
    )
    if on_gpu():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and on_gpu():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: dict[str, Any] | None) -> ShardedObject:
    """This rank's RNG state, one object per (PP, TP, DP×CP) coordinate: every rank keeps its own."""
    shape = (
        parallel_state.get_pipeline_model_parallel_world_size(),
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_data_parallel_world_size(with_context_parallel=True),
    )
    offset = (
        parallel_state.get_pipeline_model_parallel_rank(),
        parallel_state.get_tensor_model_parallel_rank(),
        parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )
    return ShardedObject("rng_state", state, shape, offset, replica_id=0)


def _model_key(index: int, count: int) -> str:
    return "model" if count == 1 else f"model{index}"  # megatron training.py's virtual-PP chunk keys


def _state_dict(
    model_chunks: Sequence[torch.nn.Module], optimizer: Any, *, is_loading: bool, rng: ShardedObject | None
) -> dict[str, Any]:
    metadata = _sharded_metadata()
    state: dict[str, Any] = {
        _model_key(i, len(model_chunks)): chunk.sharded_state_dict(metadata=metadata)
        for i, chunk in enumerate(unwrap_model(list(model_chunks)))
    }
    if optimizer is not None:
        if is_loading:
            init_empty_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    if rng is not None:
        state["rng_state"] = rng
    return state


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_tracker(root: Path, step: int) -> None:
    tmp = root / f".{TRACKER_FILE}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / TRACKER_FILE)
    _fsync_dir(root)


def _publish(root: Path, tmp: Path, final: Path) -> None:
    """Rank 0: move a finished `.tmp` into place, replacing an older save of the same step."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    _fsync_dir(root)


def _prune(root: Path, keep_last: int, current: int) -> None:
    for step in list_checkpoints(root)[:-keep_last]:
        if step != current:
            shutil.rmtree(checkpoint_path(root, step))


def save_checkpoint(
    root: str | os.PathLike,
    *,
    step: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    sharded_strategy: Any = None,
) -> Path:
    """Save everything needed to resume after `step` into `root/iter_<step>`; call on every rank.

    `model_chunks` are this rank's (virtual-)pipeline chunks (megatron DDP or bare modules); `optimizer`
    a megatron optimizer from `get_megatron_optimizer`; `scheduler` an `OptimizerParamScheduler`;
    `extra` a picklable dict (data position, metrics), taken from rank 0 — it must be the same on
    every rank. `keep_last` deletes all but the newest `keep_last` complete checkpoints afterwards.
    `sharded_strategy`: the torch_dist save strategy, default `InProcessTorchDistSave()` (the converter
    passes a lazy one for meta models). Returns the checkpoint directory.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    root = Path(root)
    final = checkpoint_path(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("iter_*.tmp"):  # interrupted saves: never loadable, safe to drop
            logger.warning("removing incomplete checkpoint %s", leftover)
            shutil.rmtree(leftover)
        tmp.mkdir()
    dist.barrier()

    state = _state_dict(model_chunks, optimizer, is_loading=False, rng=_rng_sharded_object(_rng_state()))
    state.update(
        step=step,
        extra=dict(extra or {}),
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        layout=_layout(),
        has_optimizer=optimizer is not None,
        optimizer_chain=len(chain(optimizer)) if optimizer is not None else 0,
        format_version=FORMAT_VERSION,
    )
    dist_checkpointing.save(
        state,
        str(tmp),
        sharded_strategy=sharded_strategy or InProcessTorchDistSave(),
        preprocess_common_before_consistancy_check=without_empty_param_state,
    )
    dist.barrier()  # every rank's files are on disk before the checkpoint becomes visible
    if rank == 0:
        _publish(root, tmp, final)
        _write_tracker(root, step)
        if keep_last is not None:
            _prune(root, keep_last, step)
    dist.barrier()
    logger.info("saved checkpoint %s", final)
    return final


def _resolve(root: Path, step: int | None) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint directory {root} does not exist")
    available = list_checkpoints(root)
    incomplete = sorted(p.name for p in root.glob("iter_*.tmp"))
    hint = f"complete checkpoints: {available or 'none'}" + (
        f"; incomplete (ignored): {incomplete}" if incomplete else ""
    )
    if step is None:
        tracker = root / TRACKER_FILE
        if not tracker.is_file():
            raise FileNotFoundError(f"no {TRACKER_FILE} in {root} ({hint})")
        step = int(tracker.read_text().strip())
    path = checkpoint_path(root, step)
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"no complete checkpoint for step {step} in {root} ({hint})")
    return path


def load_checkpoint(
    root: str | os.PathLike,
    *,
    model_chunks: Sequence[torch.nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
    step: int | None = None,
) -> tuple[int, dict[str, Any]]:
    """Load the checkpoint of `step` (None: the tracker's newest) into the given objects, in place.

    Call on every rank, with objects built for the current layout (which may differ from the saved one:
    see the module docstring). The optimizer and scheduler are loaded when given (the checkpoint must
    hold them); RNG states when the layout is unchanged. Returns `(step, extra)`.
    """
    path = _resolve(Path(root), step)
    common = dist_checkpointing.load_common_state_dict(str(path))
    if common.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a megatron_sapo checkpoint (format {common.get('format_version')})")
    if optimizer is not None and not common["has_optimizer"]:
        raise ValueError(f"{path} holds no optimizer state")
    if scheduler is not None and common["scheduler"] is None:
        raise ValueError(f"{path} holds no scheduler state")
    same_layout = common["layout"] == _layout()
    if not same_layout:
        logger.warning(
            "checkpoint layout %s differs from %s: weights and optimizer reshard, RNG states not restored",
            common["layout"],
            _layout(),
        )
    state = _state_dict(
        model_chunks, optimizer, is_loading=True, rng=_rng_sharded_object(None) if same_layout else None
    )
    loaded = dist_checkpointing.load(state, str(path))
    for i, chunk in enumerate(unwrap_model(list(model_chunks))):
        chunk.load_state_dict(loaded[_model_key(i, len(model_chunks))])
    if optimizer is not None:
        state = loaded["optimizer"]
        if common["optimizer_chain"] != len(chain(optimizer)):
            state = refit_chain(optimizer, state, common["optimizer"])
        load_optimizer_state(optimizer, state)
    if scheduler is not None:
        scheduler.load_state_dict(common["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    logger.info("loaded checkpoint %s", path)
    return common["step"], common["extra"]
