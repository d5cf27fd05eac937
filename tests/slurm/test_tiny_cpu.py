"""Submit examples/slurm/tiny_cpu.sbatch to a real two-node Slurm and check the run it made.

- a plain 2-node `srun` step runs one task on each emulated node (the cluster itself works);
- tiny_cpu.sbatch (2 nodes x 1 task: 2 trainer ranks with EP=2, a colocated SGLang CPU server) with
  CONFIG=configs/vlm_quickstart.yaml (the tiny Qwen3-VL-MoE on image prompts, each node's rank rendering
  its own images) COMPLETES with exit code 0:0, its metrics.jsonl has the planned RL steps with the guard
  passing on image prompts, and the launcher's log line shows one world of 2 ranks across node1 and node2;
- the same script with cluster.placement=disaggregated: node1 trains (1 rank), node2 only serves the
  SGLang engine, which the trainer finds by itself and syncs over the "distributed" transport;
- the same script with cluster.colocated_engines=every_node: each node's trainer task serves an SGLang
  server of its own, and rank 0 sends rollouts to both.
Run: `python -m pytest tests/slurm/test_tiny_cpu.py -q -rs` as root (~2-4 min on 2 cores).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_sapo.utils.spawn import free_ports
from tests.slurm.cluster import LocalSlurm

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "slurm" / "tiny_cpu.sbatch"
STEPS = 2


def _tail(path: Path, lines: int = 60) -> str:
    text = path.read_text(errors="replace") if path.is_file() else f"({path} missing)"
    return "\n".join(text.splitlines()[-lines:])


def test_two_node_step_runs_one_task_per_node(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    script = tmp_path / "where.sbatch"
    script.write_text(
        "#!/bin/bash\n#SBATCH --nodes=2 --ntasks-per-node=1 --time=2\nset -euo pipefail\n"
        "srun --label bash -c 'echo \"$SLURM_PROCID/$SLURM_NTASKS $SLURMD_NODENAME $GREETING\"'\n"
    )
    log = tmp_path / "where.out"
    job = slurm_cluster.submit([str(script)], cwd=tmp_path, export={"GREETING": "hi"}, output=log)
    info = slurm_cluster.wait(job, timeout=60)
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), (info, _tail(log))
    lines = sorted(x for x in log.read_text().splitlines() if x.strip())
    assert lines == ["0: 0/2 node1 hi", "1: 1/2 node2 hi"], lines


def _export(out: Path, **extra: str) -> dict[str, str]:
    return {
        **extra,
        "MEGATRON_SAPO_HOME": str(ROOT),
        "VENV": sys.prefix,  # the interpreter running the tests has megatron-sapo installed
        "OUTPUT_DIR": str(out),
        "STEPS": str(STEPS),
        "GLOO_SOCKET_IFNAME": "lo",  # both "nodes" are this machine, whatever its hostname resolves to
    }


def _check_metrics(out: Path) -> None:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["step"] > 0] == list(range(1, STEPS + 1)), rows
    for r in rows[1:]:
        assert "loss" in r and "reward/mean" in r, r
        assert r["sync/logprob_diff_max"] < 1e-4, r  # the SGLang server serves the updated weights


def test_tiny_cpu_sbatch_trains_across_two_nodes(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    """The colocated layout with CONFIG=configs/vlm_quickstart.yaml: the tiny Qwen3-VL-MoE on image prompts,
    EP 2 over the nodes (so DP 2: each node's rank renders its own share's images), the guard passing on
    them (the text model takes this layout in the two tests below and in tests/e2e/test_multirank.py)."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    export = _export(out, CONFIG="configs/vlm_quickstart.yaml")
    job = slurm_cluster.submit([str(TINY)], cwd=ROOT, export=export, output=log)
    info = slurm_cluster.wait(job, timeout=900)
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), (info, _tail(log))
    assert info.get("NodeList") == "node[1-2]" and info.get("NumNodes") == "2", info
    _check_metrics(out)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rollout/engine_trainer_logprob_diff_max"] < 1e-4 for r in rows[1:]), rows
    assert "qwen3_vl_moe" in (out / "hf" / "config.json").read_text()

    text = log.read_text()
    # trainer rank 0 logs where it runs (megatron_sapo/cluster/launch.py, Launch.describe): one world of 2 ranks
    # over both nodes, one per node; srun --label prefixes every line with the task id
    launch = [x for x in text.splitlines() if "launch: slurm" in x]
    assert launch, _tail(log)
    assert "2 node(s) (node1,node2)" in launch[0] and "2 trainer rank(s) (1 per node)" in launch[0], launch
    assert "ep=2" in launch[0], launch
    assert any(x.startswith("1: ") for x in text.splitlines()), "task 1 (node2) wrote nothing"


def test_tiny_cpu_sbatch_disaggregated(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "job.out"
    placement = [
        "cluster.placement=disaggregated",
        "cluster.engine_nodes=1",
        "parallel.ep=1",  # one trainer rank on node1
        "rollout.weight_sync.transport=distributed",
    ]
    job = slurm_cluster.submit([str(TINY), *placement], cwd=ROOT, export=_export(out), output=log)
    info = slurm_cluster.wait(job, timeout=900)
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), (info, _tail(log))
    _check_metrics(out)
    launch = [x for x in log.read_text().splitlines() if "launch: slurm" in x]
    assert launch and "engine nodes node2" in launch[0] and "1 trainer rank(s)" in launch[0], launch
    # the engine ran on node2 (its log dir), the trainer launched no server of its own
    assert list((out / "logs" / "node2").glob("sglang-*.log")), _tail(log)
    assert not list((out / "logs").glob("sglang-*.log")), "the trainer node launched a server too"
    assert (out / "engines" / "stop").is_file()  # the trainer stopped the engine node at the end


def test_tiny_cpu_sbatch_engines_on_every_node(slurm_cluster: LocalSlurm, tmp_path: Path) -> None:
    out, log = tmp_path / "run", tmp_path / "job.out"
    port = free_ports(2)  # node i's server on port + i: out of the range bind(0) draws from
    placement = [
        "cluster.colocated_engines=every_node",
        f"cluster.engine_port={port}",
        "rollout.weight_sync.transport=distributed",
    ]
    job = slurm_cluster.submit([str(TINY), *placement], cwd=ROOT, export=_export(out), output=log)
    info = slurm_cluster.wait(job, timeout=900)
    assert (info.get("JobState"), info.get("ExitCode")) == ("COMPLETED", "0:0"), (info, _tail(log))
    _check_metrics(out)
    # node k's trainer task served its own engine on engine_port + k; rank 0 sent requests to both
    for k, node in enumerate(["node1", "node2"]):
        engine_log = out / "logs" / node / f"sglang-{port + k}.log"
        assert engine_log.is_file() and "POST /generate" in engine_log.read_text(), (engine_log, _tail(log))
    assert not list((out / "logs").glob("sglang-*.log")), "rank 0 launched a server of its own as well"
