"""The asynchronous rollout pipeline (`rollout.max_staleness`): its staleness bound, atomic syncs, restarts.

The produce function stands for `loop._rollout`: it reads the "engine's" weight version when its batch
starts (as SGLang stamps each request) and returns rows shaped like the loop's (version at index 4). The
trainer side plays the loop: take(t), train, then sync version t + 1 while holding the engines.
- `drop_stale` keeps exactly the rows with step − v ≤ k (closed form) and counts the others;
- with k = 1 and k = 2 the worker really generates ahead (the trainer waits, with a timeout, until the
  next batch has started before it syncs), every batch's staleness is ≤ k, and k is reached;
- no sync lands inside a generation (the version read at a batch's start equals the one at its end);
- an error in the worker is raised by `take`; nothing is generated until the next `take` of that step
  (the loop re-syncs in between), which regenerates it from the re-synced weights, and the later batches;
- a batch with no sample inside the bound is an error naming the versions;
- `close` returns while the worker waits.
The loop runs it end to end in tests/e2e/test_async.py.
Run: `python -m pytest tests/unit/test_pipeline.py -q` (seconds).
"""

from __future__ import annotations

import threading
import time

import pytest

from megatron_sapo.train.pipeline import RolloutPipeline, drop_stale


def _row(version: str | None) -> tuple:
    return ([1, 2, 3], 1, 0.5, [-0.1, -0.2], version, None, None)


def test_drop_stale_keeps_rows_within_the_bound() -> None:
    rows = [_row(None), _row("7"), _row("6"), _row("5"), _row("4")]
    kept, stats = drop_stale(rows, step=7, max_staleness=2)
    assert [r[4] for r in kept] == [None, "7", "6", "5"]
    assert stats == {
        "rollout/staleness_mean": (0 + 0 + 1 + 2) / 4,
        "rollout/staleness_max": 2.0,
        "rollout/dropped_stale": 1.0,
    }
    kept, stats = drop_stale(rows, step=7, max_staleness=0)
    assert [r[4] for r in kept] == [None, "7"] and stats["rollout/dropped_stale"] == 3.0


class _Engine:
    """A weight version and a log of (step, version at start, version at end) per generated batch."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.batches: list[tuple[int, int, int]] = []
        self.started: dict[int, threading.Event] = {}
        self.fail_once: set[int] = set()

    def event(self, step: int) -> threading.Event:
        return self.started.setdefault(step, threading.Event())

    def produce(self, step: int) -> tuple[list, dict]:
        v = self.version
        self.event(step).set()
        time.sleep(0.02)  # a sync landing now would show as a different version at the end
        if step in self.fail_once:
            self.fail_once.discard(step)
            raise ConnectionError(f"server restarted during step {step}")
        self.batches.append((step, v, self.version))
        return [_row(str(v)) for _ in range(3)], {"time/generate_s": 0.02, "time/reward_s": 0.0}


@pytest.mark.parametrize("k", [1, 2])
def test_generates_ahead_within_the_bound_and_syncs_between_batches(k: int) -> None:
    engine, first, last = _Engine(version=3), 3, 10
    pipeline = RolloutPipeline(engine.produce, first_step=first, last_step=last, max_staleness=k)
    try:
        for t in range(first, last):
            rows, stats = pipeline.take(t)
            assert len(rows) == 3 and stats["rollout/dropped_stale"] == 0
            assert stats["rollout/staleness_max"] <= k
            assert "time/generate_s" not in stats and stats["rollout/generate_s"] == 0.02
            if t + 1 < last:  # "training": the next batch starts meanwhile, with the current weights
                assert engine.event(t + 1).wait(5), f"the pipeline did not start step {t + 1} ahead"
            with pipeline.engine_access():
                engine.version = t + 1
    finally:
        pipeline.close()
    assert [b[0] for b in engine.batches] == list(range(first, last))
    for step, v_start, v_end in engine.batches:
        assert v_start == v_end, "a sync landed inside a generation"
        assert 0 <= step - v_start <= k
    assert max(step - v for step, v, _ in engine.batches) == k


def test_worker_error_is_raised_then_the_step_regenerates() -> None:
    engine = _Engine(version=0)
    engine.fail_once = {2}
    pipeline = RolloutPipeline(engine.produce, first_step=0, last_step=5, max_staleness=1)
    try:
        for t in range(5):
            try:
                rows, _ = pipeline.take(t)
            except ConnectionError:
                assert t == 2
                time.sleep(0.1)  # nothing is generated before the caller has re-synced
                assert [b[0] for b in engine.batches] == [0, 1]
                with pipeline.engine_access():  # the loop re-syncs the current version, then retries
                    engine.version = t
                rows, _ = pipeline.take(t)
            assert rows[0][4] in (str(t), str(t - 1))
            with pipeline.engine_access():
                engine.version = t + 1
    finally:
        pipeline.close()
    assert [b[0] for b in engine.batches] == [0, 1, 2, 3, 4]  # 2 once, from the re-synced weights
    assert engine.batches[2][1] == 2


def test_take_out_of_order_and_close_while_waiting() -> None:
    engine = _Engine(version=0)
    pipeline = RolloutPipeline(engine.produce, first_step=0, last_step=2, max_staleness=1)
    with pytest.raises(ValueError, match="expected step 0"):
        pipeline.take(1)
    pipeline.take(0)
    pipeline.take(1)
    started = time.perf_counter()
    pipeline.close()  # the worker has nothing left to generate and waits: close returns at once
    assert time.perf_counter() - started < 2
    with pytest.raises(ValueError, match="max_staleness >= 1"):
        RolloutPipeline(engine.produce, first_step=0, last_step=2, max_staleness=0)


def test_a_batch_of_only_stale_samples_is_an_error() -> None:
    pipeline = RolloutPipeline(lambda s: ([_row("0")] * 2, {}), first_step=5, last_step=6, max_staleness=1)
    try:
        with pytest.raises(
            RuntimeError, match=r"more than rollout.max_staleness=1 versions old \(versions \['0'\]\)"
        ):
            pipeline.take(5)
    finally:
        pipeline.close()
