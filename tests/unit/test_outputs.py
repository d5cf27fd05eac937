"""MetricsWriter (megatron_sapo/train/outputs.py): metrics.jsonl rows and the per-step log lines."""

from __future__ import annotations

import json
import logging

from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.train.outputs import MetricsWriter
from megatron_sapo.utils.typed_config import from_dict


def _write_steps(tmp_path, caplog, log_every: int, steps: int = 7) -> list[int]:
    cfg = from_dict(
        TrainJobConfig,
        {
            "run": {
                "output_dir": str(tmp_path),
                "steps": steps,
                "log_every": log_every,
                "tensorboard": False,
                "progress": False,
            }
        },
    )
    writer = MetricsWriter(tmp_path, cfg, resume_step=0)
    with caplog.at_level(logging.INFO, logger="megatron_sapo.train.outputs"):
        caplog.clear()
        for step in range(1, steps + 1):
            writer.write({"step": step, "reward/mean": 0.1 * step, "loss": 1.0})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # every step is recorded whatever log_every
    return [int(r.getMessage().split()[1]) for r in caplog.records if r.getMessage().startswith("step ")]


def test_log_every_sets_which_steps_log_a_line(tmp_path, caplog):
    assert _write_steps(tmp_path / "a", caplog, log_every=1) == [1, 2, 3, 4, 5, 6, 7]
    assert _write_steps(tmp_path / "b", caplog, log_every=3) == [3, 6, 7]  # the last step always logs
