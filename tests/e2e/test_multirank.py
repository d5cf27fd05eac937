"""Multi-process `megatron-sapo train` on one machine: the launcher's paths, end to end (CPU, gloo).

- two trainer ranks (DP2) started by torchrun, with asynchronous rollouts (rollout.max_staleness=1): they
  finish the planned steps within the staleness bound and write the metrics;
- two trainer ranks in an srun-like environment (what srun sets for a 2-node × 1-task step), colocated
  with one real SGLang CPU server on each "node" (cluster.colocated_engines=every_node): rollouts reach
  both servers and the "distributed" weight sync keeps both at the trainer's weights;
- disaggregated: two "nodes" under an srun-like environment, "localhost" trains and "127.0.0.1" serves a
  real SGLang CPU server that the trainer finds by its URL, updates with the "distributed" transport
  and stops through the stop marker; 2 RL steps, the engine serves the trained weights each step;
- a layout that does not fit the processes is one error line naming the setting (exit 2);
- two trainer ranks with a launched SGLang server that is SIGKILLed mid-rollout: rank 0 restarts it, all
  ranks re-sync, the rollout is redone, and no sample comes from the restarted server's initial weights;
  the same with asynchronous rollouts, the kill landing in a batch generated ahead.
Run: `python -m pytest tests/e2e/test_multirank.py -q` (~3 min on 2 cores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_sapo.utils.spawn import free_port, free_ports

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["-m", "megatron_sapo.cli", "train", str(ROOT / "configs/quickstart.yaml")]
TINY = [
    "run.steps=2",
    "sft.steps=2",
    "rollout.prompts_per_step=2",
    "rollout.samples_per_prompt=4",
    "rollout.sampling.max_new_tokens=6",
    "rollout.guard_prompts=1",
    "rollout.guard_every=1",  # probe every sync (the quickstart probes before evals only)
    "loss.mini_batches=2",
    "data.synthetic.n_train=16",
    "data.synthetic.n_eval=4",
    "run.eval_every=2",
]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    """This environment without any launcher's variables (the tests may themselves run under one)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM", "TORCHELASTIC")) and k not in LAUNCH_VARS
    }
    return {**env, "PYTHONPATH": str(ROOT)}


def fake_srun(nodes: list[str], procid: int, job_id: int) -> dict[str, str]:
    """What srun sets for task `procid` of a step with one task on each of `nodes`."""
    return {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": ",".join(nodes),
        "SLURM_NTASKS": str(len(nodes)),
        "SLURM_TASKS_PER_NODE": f"1(x{len(nodes)})",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": str(procid),
        "SLURMD_NODENAME": nodes[procid],
    }


def run_all(cmds: list[list[str]], envs: list[dict[str, str]], timeout: float = 900) -> list[tuple[int, str]]:
    """Start every command at once (they rendezvous), wait for all; (exit code, stderr tail) each."""
    procs = [
        subprocess.Popen(
            c, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        for c, e in zip(cmds, envs, strict=True)
    ]
    try:
        errs = [p.communicate(timeout=timeout)[1] for p in procs]
        return [(p.returncode, err[-3000:]) for p, err in zip(procs, errs, strict=True)]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()


def kill_server(port: int) -> bool:
    """SIGKILL the process group (launcher, scheduler, detokenizer) of the SGLang server on `port`."""
    found = subprocess.run(
        ["pgrep", "-o", "-f", f"sglang.launch_server .*--port {port} "], capture_output=True, text=True
    )
    if not found.stdout.strip():
        return False
    os.killpg(int(found.stdout.split()[0]), signal.SIGKILL)
    return True


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_trainer_ranks_torchrun_asynchronous(tmp_path: Path) -> None:
    """DP2 with asynchronous rollouts: rank 0's pipeline generates ahead, both ranks train their shares."""
    args = [f"run.output_dir={tmp_path}", *TINY, "rollout.engine=transformers", "rollout.max_staleness=1"]
    args += ["run.steps=3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), *TRAIN, *args]
    for code, err in run_all([cmd], [clean_env()]):
        assert code == 0, err
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [0, 1, 2, 3]
    for x in r[1:]:
        for key in ("reward/mean", "loss", "grad_norm", "sync/bytes", "sync/logprob_diff_max"):
            assert key in x, (key, x)
        assert x["sync/logprob_diff_max"] < 1e-4
        assert x["rollout/staleness_max"] <= 1 and x["rollout/dropped_stale"] == 0, x
    assert any(x["rollout/staleness_mean"] == 1 for x in r[2:]), "the pipeline never generated ahead"
    assert "eval/accuracy" in r[0] and "eval/accuracy" in r[2]
    assert (tmp_path / "hf" / "config.json").is_file()


def test_srun_two_nodes_with_colocated_engines_on_every_node(tmp_path: Path) -> None:
    """Two "nodes" of one trainer task each (srun env; rendezvous port from cluster.master_port), each
    serving its own real SGLang server (cluster.colocated_engines=every_node): rank 0 spreads the
    rollouts over both and the "distributed" sync reaches both."""
    nodes = ["localhost", "127.0.0.1"]
    engine_port = free_ports(2)  # node i's server on engine_port + i, out of the bind(0) range
    cmd = [sys.executable, *TRAIN, f"run.output_dir={tmp_path}", *TINY, "parallel.ep=2"]
    # 4 prompts x 8 samples = 32 samples = 2 request chunks of 16 a step: one to each server
    cmd += [
        "rollout.prompts_per_step=4",
        "rollout.samples_per_prompt=8",
        "cluster.colocated_engines=every_node",
    ]
    cmd += [f"cluster.engine_port={engine_port}", f"cluster.master_port={free_port()}"]
    cmd += ["rollout.weight_sync.transport=distributed"]
    envs = [clean_env() | fake_srun(nodes, i, job_id=4242) for i in range(2)]
    for code, err in run_all([cmd, cmd], envs):
        assert code == 0, err
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [0, 1, 2]
    # node k serves on engine_port + k (one engine per node)
    logs = [tmp_path / "logs" / node / f"sglang-{engine_port + k}.log" for k, node in enumerate(nodes)]
    for log in logs:
        assert log.read_text().count("POST /generate") >= 2, log  # both rollouts reached both servers
    # the cold start moved the weights before the first sync: a server the sync missed would serve the
    # initial model, ~0.1-1 nat per token away from the trainer's log-probs
    for x in r[1:]:
        assert x["sync/bytes"] > 0 and x["sync/logprob_diff_max"] < 1e-4
        assert x["rollout/engine_trainer_logprob_diff_mean"] < 1e-4, x
    assert not list((tmp_path / "logs").glob("sglang-*.log"))  # rank 0 launched no server of its own
    for log in logs:
        assert_locked(log)
    assert_key_files_gone(tmp_path)


def assert_locked(log: Path) -> None:
    """The server ran with both keys (SGLang prints its arguments at start-up; the guard masked them)."""
    text = log.read_text()
    assert "'api_key': '***'" in text and "'admin_api_key': '***'" in text, log


def assert_key_files_gone(out: Path) -> None:
    """Each node wrote its servers' key for trainer rank 0 and deleted it when they stopped."""
    keys = out / "engines" / "keys"
    assert keys.is_dir() and (keys.stat().st_mode & 0o077) == 0 and not list(keys.iterdir())


def test_disaggregated_engine_node_with_real_sglang(tmp_path: Path) -> None:
    nodes = ["localhost", "127.0.0.1"]  # distinct names, both resolve here: node 0 trains, node 1 serves
    engine_port, master_port = free_port(), free_port()
    cmd = [
        sys.executable,
        *TRAIN,
        f"run.output_dir={tmp_path}",
        *TINY,
        "cluster.placement=disaggregated",
        "cluster.engine_nodes=1",
        f"cluster.engine_port={engine_port}",
        f"cluster.master_port={master_port}",
        "rollout.weight_sync.transport=distributed",
    ]
    envs = [clean_env() | fake_srun(nodes, i, job_id=4343) for i in range(2)]
    (trainer_code, trainer_err), (engine_code, engine_err) = run_all([cmd, cmd], envs)
    assert trainer_code == 0, trainer_err
    assert engine_code == 0, engine_err  # stopped through the marker, not killed
    assert (
        "launch: slurm, 2 node(s) (localhost,127.0.0.1), engine nodes 127.0.0.1, 1 trainer rank(s)"
        in trainer_err
    )
    assert f"serving http://127.0.0.1:{engine_port}" in engine_err
    assert (tmp_path / "engines" / "stop").is_file()
    assert_locked(tmp_path / "logs" / "127.0.0.1" / f"sglang-{engine_port}.log")
    assert_key_files_gone(tmp_path)
    assert not list((tmp_path / "logs").glob("sglang-*.log"))  # the trainer launched no server itself
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [0, 1, 2]
    # the cold start moved the weights before the first sync, so a sync that did not reach the server
    # would show the initial model's log-probs here
    assert all(x["sync/logprob_diff_max"] < 1e-4 and x["sync/bytes"] > 0 for x in r[1:])
    from safetensors.torch import load_file

    final = {k: v for f in (tmp_path / "hf").glob("*.safetensors") for k, v in load_file(f).items()}
    start = {k: v for f in (tmp_path / "hf_init").glob("*.safetensors") for k, v in load_file(f).items()}
    assert any(not torch.equal(v, start[k]) for k, v in final.items())


def test_layout_that_does_not_fit_is_one_error_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, *TRAIN, f"run.output_dir={tmp_path}", "parallel.tp=2"],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=300,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "megatron-sapo train: error: parallel.tp x parallel.pp = 2 x 1 = 2 does not divide"
    )
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("staleness", [0, 1])
def test_server_killed_mid_rollout_two_ranks_resync_and_redo(tmp_path: Path, staleness: int) -> None:
    """SIGKILL the SGLang server while step 2's rollout is in flight (2 trainer ranks): rank 0 restarts it
    (initial weights), every rank re-syncs, the rollout is redone, so every sample is from the trained
    weights (a stale sample would differ from the trainer's log-probs by ~0.1-1 nat per token).
    Asynchronous (staleness 1, with partial rollouts): the kill lands in the batch rank 0's pipeline
    generates ahead, which the trainer's sync tries to interrupt meanwhile; the pipeline hands the
    restart to the loop, which re-syncs and has the batch generated again."""
    port = free_port()
    args = [f"run.output_dir={tmp_path}", *TINY, "parallel.ep=2", "rollout.engine=sglang"]
    args += [f"rollout.max_staleness={staleness}", f"rollout.partial={str(staleness > 0).lower()}"]
    # a long rollout (64 samples x 64 tokens of a barely trained model: seconds) for the kill to land in
    args += ["run.steps=4", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=16"]
    args += ["rollout.sampling.max_new_tokens=64", "run.eval_every=0", f"rollout.server.port={port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-port", str(free_port()), *TRAIN, *args]
    log = tmp_path / "train.log"  # a file, not a pipe: nobody reads a pipe while the test waits
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd, env=clean_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 600
        # step 1's row is written right before step 2's rollout starts
        while not (metrics.is_file() and '{"step": 1,' in metrics.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "run ended before step 1"
            time.sleep(0.05)
        assert kill_server(port), "no SGLang server on the run's port"
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        kill_server(port)  # its own session: a killed trainer leaves it behind
    err = log.read_text()
    assert proc.returncode == 0, err[-3000:]
    r = rows(tmp_path)
    assert [x["step"] for x in r] == [0, 1, 2, 3, 4]
    for x in r[1:]:
        assert x["sync/logprob_diff_max"] < 1e-4, x
        # the point: no sample of any step (the interrupted one included) came from the initial weights;
        # asynchronous: samples one version old differ by the last update (~1e-3), far below that
        assert x["rollout/engine_trainer_logprob_diff_mean"] < (1e-4 if staleness == 0 else 0.02), x
        assert x.get("rollout/staleness_max", 0) <= staleness and not x.get("rollout/dropped_stale"), x
    restarts = [x.get("rollout/restarts") for x in r]
    if staleness == 0:
        assert r[2]["rollout/restarts"] >= 1, restarts
    else:  # the kill lands in the batch generated beside step 2 (step 3's) or in step 2's own
        assert any(x["rollout/restarts"] >= 1 for x in r[2:4]), restarts
    assert "rollout interrupted by a server restart" in err
