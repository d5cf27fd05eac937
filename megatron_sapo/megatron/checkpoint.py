"""Training checkpoints for exact resume: model chunks, distributed optimizer, LR schedule, RNG, step, extra.

One megatron distributed checkpoint (torch_dist format) per saved step, written atomically::

    save_checkpoint(root, step=7, model_chunks=engine.model, optimizer=engine.optimizer,
                    scheduler=engine.scheduler, extra={"data_position": 112}, keep_last=3)
    step, extra = load_checkpoint(root, model_chunks=..., optimizer=..., scheduler=...)  # newest

Layout of `root` (megatron's naming, so Megatron-LM / slime users recognise it)::

    latest_checkpointed_iteration.txt   "7": the newest *complete* checkpoint (written last, atomically)
    iter_0000007/                       torch_dist: metadata.json, common.pt, .metadata, __<rank>_0.distcp
    iter_0000008.tmp/                   a save in progress or killed mid-way: never loaded, removed later
    iter_0000009.corrupt/               did not load (truncated, damaged): kept aside, never listed or pruned

Atomicity: every rank writes into `iter_XXXXXXX.tmp`; after a barrier rank 0 renames it to its final name
and then replaces the tracker file (temp file + fsync + os.replace). A crash at any point leaves the
tracker on the previous complete checkpoint. Disk full (ENOSPC) while saving: the `.tmp` is removed, the
previous checkpoint and tracker stay, and every rank raises `CheckpointError` naming the path and the bytes
needed (a save is refused up front when the free space is below the size of the newest checkpoint).

Resume (`load_latest_checkpoint`): the newest checkpoint that loads wins. One that does not (a file
shorter than its `.metadata` says, an unreadable archive) is logged with the failing file, renamed to
`iter_XXXXXXX.corrupt` (`.corrupt1`, ... if taken) and the previous one is tried. Nothing is renamed when
none loads (then the cause is rather the config or the code): `CheckpointError` names the directory.

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

import errno
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
from torch.distributed.checkpoint.api import CheckpointException

from megatron_sapo.megatron.dist_ckpt_writer import InProcessTorchDistSave
from megatron_sapo.megatron.optimizer_ckpt import (
    OPTIMIZER_SHARDING,
    chain,
    init_empty_optimizer_state,
    load_optimizer_state,
    refit_chain,
    without_empty_param_state,
)
from megatron_sapo.megatron.parallel import LayoutError, on_gpu
from megatron_sapo.utils.disk import disk_full_message, is_disk_full

__all__ = [
    "TRACKER_FILE",
    "CheckpointError",
    "checkpoint_path",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest_checkpoint",
    "save_checkpoint",
]

logger = logging.getLogger(__name__)

TRACKER_FILE = "latest_checkpointed_iteration.txt"
FORMAT_VERSION = 1
_ITER = re.compile(r"^iter_(\d{7,})$")
_NEARLY_FULL = 1 << 20  # bytes free under which a failed write is taken for a full disk


class CheckpointError(LayoutError):
    """A checkpoint that cannot be written (disk full) or none that loads: one line naming the path.

    A `LayoutError`, so `megatron-sapo train` prints it as one error line and exits 2."""


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
    newest = list_checkpoints(root)
    # a checkpoint is about as big as the previous one (same model, same layout)
    needed = _dir_bytes(checkpoint_path(root, newest[-1])) if newest else None

    def prepare() -> None:
        root.mkdir(parents=True, exist_ok=True)
        for leftover in root.glob("iter_*.tmp"):  # interrupted saves: never loadable, safe to drop
            logger.warning("removing incomplete checkpoint %s", leftover)
            shutil.rmtree(leftover)
        if needed and shutil.disk_usage(root).free < needed:
            raise OSError(errno.ENOSPC, "not enough free space for a checkpoint")
        tmp.mkdir()

    _on_rank0_for_all(prepare, final, tmp, needed)

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
    try:
        # The .distcp writes fail together (megatron gathers and broadcasts write failures); a failure in
        # a rank-0-only write (common.pt, metadata) raises on rank 0 alone, and its exit (gloo: a closed
        # connection; torchrun / srun --kill-on-bad-exit: the launcher) ends the ranks waiting for it.
        dist_checkpointing.save(
            state,
            str(tmp),
            sharded_strategy=sharded_strategy or InProcessTorchDistSave(),
            preprocess_common_before_consistancy_check=without_empty_param_state,
        )
    except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
        # torch.save's zip writer reports ENOSPC without its errno ("unexpected pos N vs M"): a failed
        # write with (next to) no space left on the device counts as disk full too
        disk_full = is_disk_full(e) or shutil.disk_usage(root).free < _NEARLY_FULL
        if isinstance(e, CheckpointException) and dist.get_world_size() > 1:
            # raised on every rank together; only the coordinator (rank 0) holds the other ranks' errors
            seen = [False] * dist.get_world_size()
            dist.all_gather_object(seen, disk_full)
            disk_full = any(seen)
        if not disk_full:
            raise
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_disk_full(final, needed)) from None

    def publish() -> None:
        _publish(root, tmp, final)
        _write_tracker(root, step)
        if keep_last is not None:
            _prune(root, keep_last, step)

    # replaces a barrier: every rank's files are on disk before the checkpoint becomes visible
    _on_rank0_for_all(publish, final, tmp, needed)
    logger.info("saved checkpoint %s", final)
    return final


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def _disk_full(final: Path, needed: int | None) -> str:
    return (
        f"checkpoint not saved: {disk_full_message(final, needed=needed)}; the previous checkpoint and "
        f"{TRACKER_FILE} are unchanged. Free space (or move run.output_dir) and rerun to resume"
    )


def _on_rank0_for_all(fn: Any, final: Path, tmp: Path, needed: int | None) -> None:
    """Run `fn` on rank 0; if it fails, every rank raises (a collective: no rank left in a barrier).

    ENOSPC becomes one `CheckpointError` line, after removing the partial `.tmp`."""
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            fn()
        except (Exception, CheckpointException) as e:
            error = e
            if is_disk_full(e):
                shutil.rmtree(tmp, ignore_errors=True)
                error = CheckpointError(_disk_full(final, needed))
    failure = [None if error is None else (isinstance(error, CheckpointError), str(error))]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(failure, src=0)
    if error is not None:
        raise error
    if failure[0] is not None:
        disk_full, message = failure[0]
        raise (
            CheckpointError(message)
            if disk_full
            else RuntimeError(f"saving {final} failed on rank 0: {message}")
        )


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


def _damaged_files(path: Path) -> list[str]:
    """Files of checkpoint `path` that are missing or shorter than its `.metadata` records."""
    from torch.distributed.checkpoint import FileSystemReader

    missing = [n for n in ("metadata.json", "common.pt", ".metadata") if not (path / n).is_file()]
    if missing:
        return missing
    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data
    except Exception:
        return [".metadata"]
    ends: dict[str, int] = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    return sorted(
        f"{name} ({(path / name).stat().st_size if (path / name).is_file() else 0} of {end} bytes)"
        for name, end in ends.items()
        if not (path / name).is_file() or (path / name).stat().st_size < end
    )


def _set_aside(path: Path) -> Path:
    """Rename a checkpoint that does not load to `<name>.corrupt` (`.corrupt1`, ... when taken)."""
    for i in range(1000):
        aside = path.with_name(f"{path.name}.corrupt{i or ''}")
        if not aside.exists():
            os.rename(path, aside)
            return aside
    raise FileExistsError(f"{path}: too many .corrupt copies beside it")


def load_latest_checkpoint(
    root: str | os.PathLike,
    *,
    model_chunks: Sequence[torch.nn.Module],
    optimizer: Any = None,
    scheduler: Any = None,
) -> tuple[int, dict[str, Any], Path] | None:
    """Load the newest checkpoint under `root` that loads; `(step, extra, path)`, or None when there is none.

    Call on every rank (see `load_checkpoint`). A checkpoint that fails to load on any rank is logged
    with its failing file (rank 0) and tried no further; once an older one has loaded, each failed one
    is renamed aside (`iter_XXXXXXX.corrupt`) and the tracker points at the loaded step. When none
    loads, nothing is renamed and `CheckpointError` names `root` and the newest one's error.
    """
    root = Path(root)
    failed: list[tuple[Path, str]] = []
    for step in reversed(list_checkpoints(root)):
        path = checkpoint_path(root, step)
        damaged = _damaged_files(path)
        error = f"damaged: {', '.join(damaged)}" if damaged else None
        if error is None:
            try:
                loaded_step, extra = load_checkpoint(
                    root, model_chunks=model_chunks, optimizer=optimizer, scheduler=scheduler, step=step
                )
            except (Exception, CheckpointException) as e:  # DCP: a BaseException
                error = f"{type(e).__name__}: {_first_line(e)}"
        # every rank must agree: a checkpoint counts as loaded only where it loaded on all of them
        errors = [error]
        if dist.get_world_size() > 1:
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        error = next((e for e in errors if e is not None), None)
        if error is None:
            if dist.get_rank() == 0 and failed:
                for bad, why in failed:
                    aside = _set_aside(bad).name
                    logger.warning("checkpoint %s does not load (%s): kept aside as %s", bad, why, aside)
                _write_tracker(root, loaded_step)
            if dist.get_world_size() > 1:
                dist.barrier()
            return loaded_step, extra, path
        failed.append((path, error))
    if failed:
        raise CheckpointError(
            f"no checkpoint in {root} loads (newest {failed[0][0].name}: {failed[0][1]}); move the "
            f"directory away to start the run afresh"
        )
    return None


def _first_line(e: BaseException) -> str:
    """The first line of the innermost error (DCP wraps each rank's error in its own)."""
    while e.__cause__ is not None:
        e = e.__cause__
    failures = getattr(e, "failures", None)
    if failures:
        inner = next(iter(failures.values()))
        e = inner[0] if isinstance(inner, tuple) else inner
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
