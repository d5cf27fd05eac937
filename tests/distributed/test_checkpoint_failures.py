"""Checkpoints that fail (`megatron_sapo.megatron.checkpoint`) on CPU under gloo: a truncated newest checkpoint
is set aside and the previous one loads; none that loads is one `CheckpointError`; disk full (ENOSPC, from
a monkeypatched write) while saving fails on every rank together, removes the `.tmp` and leaves the
previous checkpoint and tracker as they were. The CLI side (exit 2, real tmpfs) is in tests/e2e/test_trainer.py.

    python -m pytest tests/distributed/test_checkpoint_failures.py -q
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path

from megatron_sapo.utils.spawn import run_on_ranks

TRACKER = "latest_checkpointed_iteration.txt"


def _engine():
    from megatron_sapo.megatron.engine import LossConfig, OptimConfig, PolicyEngine
    from megatron_sapo.megatron.testing import (
        build_tiny_gpt,
        init_megatron_cpu,
        randomize_weights,
        tiny_gpt_config,
    )

    init_megatron_cpu()

    def provide(pre_process: bool, post_process: bool, vp_stage: int | None = None):
        model = build_tiny_gpt(tiny_gpt_config(), vocab_size=64)
        randomize_weights(model, seed=3)
        return model

    return PolicyEngine(provide, OptimConfig(lr=1e-2), LossConfig(mini_batches=1, micro_batch_tokens=40))


def _train_and_save(engine, root: str, step: int) -> dict:
    from megatron_sapo.megatron.checkpoint import save_checkpoint
    from megatron_sapo.megatron.testing import random_samples

    engine.train_step(random_samples(4, vocab=64, seed=step, lengths=(9, 20)))
    save_checkpoint(root, step=step, model_chunks=engine.model, optimizer=engine.optimizer)
    return {n: p.detach().clone() for n, p in engine.model[0].module.named_parameters()}


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _fallback(rank: int, world_size: int, root: str) -> dict:
    from megatron_sapo.megatron import checkpoint

    lines = _Lines()
    logging.getLogger(checkpoint.__name__).addHandler(lines)
    engine = _engine()
    saved = {step: _train_and_save(engine, root, step) for step in (1, 2)}
    with open(Path(root) / "iter_0000002" / "__0_0.distcp", "r+b") as f:
        f.truncate(100_000)
    fresh = _engine()
    step, _, path = checkpoint.load_latest_checkpoint(
        root, model_chunks=fresh.model, optimizer=fresh.optimizer
    )
    params = dict(fresh.model[0].module.named_parameters())
    out = dict(
        step=step,
        path=path.name,
        equal=all(bool((params[n] == v).all()) for n, v in saved[1].items()),
        entries=sorted(p.name for p in Path(root).iterdir()),
        tracker=(Path(root) / TRACKER).read_text().strip(),
        listed=checkpoint.list_checkpoints(root),
        lines=lines.lines,
    )
    # later saves and pruning leave the set-aside copy alone
    checkpoint.save_checkpoint(root, step=2, model_chunks=fresh.model, keep_last=1)
    out["after_prune"] = sorted(p.name for p in Path(root).iterdir())
    # none loads: one error naming the directory, nothing renamed
    with open(Path(root) / "iter_0000002" / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)
    try:
        checkpoint.load_latest_checkpoint(root, model_chunks=fresh.model)
    except checkpoint.CheckpointError as e:
        out["none_loads"] = str(e)
    out["after_none"] = sorted(p.name for p in Path(root).iterdir())
    return out


def test_truncated_newest_checkpoint_is_set_aside_and_the_previous_loads(tmp_path: Path) -> None:
    root = str(tmp_path / "ckpt")
    r = run_on_ranks(_fallback, world_size=1, args=(root,))[0]
    assert (r["step"], r["path"], r["equal"]) == (1, "iter_0000001", True)
    assert r["entries"] == ["iter_0000001", "iter_0000002.corrupt", TRACKER]
    assert r["tracker"] == "1" and r["listed"] == [1]
    [line] = [x for x in r["lines"] if "does not load" in x]
    assert f"{root}/iter_0000002 does not load" in line
    assert "__0_0.distcp (100000 of" in line and "kept aside as iter_0000002.corrupt" in line
    assert r["after_prune"] == ["iter_0000002", "iter_0000002.corrupt", TRACKER]
    assert f"no checkpoint in {root} loads (newest iter_0000002: damaged: __0_0.distcp" in r["none_loads"]
    assert r["after_none"] == r["after_prune"]


def _disk_full(rank: int, world_size: int, root: str, where: str) -> dict:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_sapo.megatron import checkpoint

    engine = _engine()
    _train_and_save(engine, root, 1)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "distcp" and rank == world_size - 1:  # one rank's shard file
        filesystem_async._write_item = no_space
    if where == "publish" and rank == 0:  # rank 0 alone, after every rank wrote its files
        checkpoint._publish = no_space
    try:
        _train_and_save(engine, root, 2)
        error = None
    except checkpoint.CheckpointError as e:
        error = str(e)
    return dict(
        error=error,
        entries=sorted(p.name for p in Path(root).iterdir()),
        tracker=(Path(root) / TRACKER).read_text().strip(),
    )


def test_disk_full_while_saving_fails_every_rank_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    for where in ("distcp", "publish"):
        root = tmp_path / where
        results = run_on_ranks(_disk_full, world_size=2, args=(str(root), where), timeout=240)
        for r in results:  # both ranks raised (neither is left in a barrier), with one line naming the path
            assert r["error"] is not None and "\n" not in r["error"], where
            assert f"no space left on the device writing {root}/iter_0000002 (needs ~" in r["error"], where
            assert "MB free)" in r["error"]
        # the previous checkpoint and tracker as they were, no .tmp left
        assert (results[0]["entries"], results[0]["tracker"]) == (["iter_0000001", TRACKER], "1"), where
