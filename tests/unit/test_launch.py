"""The launcher's mapping from srun / torchrun / no environment to ranks, nodes, roles and URLs.

Every environment is written by hand the way srun (block distribution) and torchrun set it; the
expected numbers are worked out here in closed form (rank = node × tasks per node + local rank, ...),
not read back from the code. Run: `python -m pytest tests/unit/test_launch.py -q`.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from megatron_sapo.cluster.config import ClusterConfig
from megatron_sapo.cluster.engine_nodes import serve_engine_node, stop_engines_at_exit, stop_marker
from megatron_sapo.cluster.launch import (
    Launch,
    LayoutError,
    engine_urls,
    every_node_engines,
    expand_nodelist,
    node_engine_ports,
    resolve,
)
from megatron_sapo.megatron.parallel import ParallelConfig
from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.utils.typed_config import ConfigError, from_dict

NODES = ["gpu01", "gpu02", "gpu03", "gpu04"]
JOB_ID = 12345
PORT = 20000 + JOB_ID % 10000  # the documented derivation: 22345
GPUS = 8


def srun_env(procid: int, *, ntasks: int = 32, per_node: int = 8, **extra: str) -> dict[str, str]:
    """What srun sets for task `procid` of a block-distributed step over all four nodes."""
    node = procid // per_node
    return {
        "SLURM_JOB_ID": str(JOB_ID),
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "gpu[01-04]",
        "SLURM_STEP_NODELIST": "gpu[01-04]",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_TASKS_PER_NODE": f"{per_node}(x4)",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % per_node),
        "SLURM_NODEID": str(node),
        "SLURMD_NODENAME": NODES[node],
        "SLURM_GPUS_ON_NODE": str(GPUS),
        **extra,
    }


def torchrun_env(node: int, local: int, *, group_rank: int, master: str = "gpu02") -> dict[str, str]:
    """`srun --ntasks-per-node=1 torchrun --nnodes 4 --nproc-per-node 8`: one srun task per node, torchrun's
    ranks follow its rendezvous order (`group_rank`), not the SLURM node order."""
    return {
        **srun_env(node, ntasks=4, per_node=1),
        "RANK": str(group_rank * GPUS + local),
        "WORLD_SIZE": str(4 * GPUS),
        "LOCAL_RANK": str(local),
        "LOCAL_WORLD_SIZE": str(GPUS),
        "GROUP_RANK": str(group_rank),
        "MASTER_ADDR": master,
        "MASTER_PORT": "29500",
        "TORCHELASTIC_RUN_ID": "job",
    }


COLOCATED = ClusterConfig()
DISAGG = ClusterConfig(placement="disaggregated", engine_nodes=1, engines_per_node=2, engine_port=31000)
TP2_EP4 = ParallelConfig(tp=2, ep=4)


# ---- hostlists ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "node[1-3,05],gpu-a[01-02],login",
            ["node1", "node2", "node3", "node05", "gpu-a01", "gpu-a02", "login"],
        ),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]n[3,5]", ["r1n3", "r1n5", "r2n3", "r2n5"]),
        ("a,b,c", ["a", "b", "c"]),
        ("single", ["single"]),
        ("x[7]", ["x7"]),
        ("", []),
    ],
)
def test_expand_nodelist(text: str, expected: list[str]) -> None:
    assert expand_nodelist(text) == expected


@pytest.mark.parametrize("text", ["node[1-3", "node1-3]", "node[3-1]", "node[a-b]"])
def test_expand_nodelist_rejects_malformed(text: str) -> None:
    with pytest.raises(ValueError):
        expand_nodelist(text)


# ---- srun -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("procid", [0, 7, 8, 13, 31])
def test_srun_four_nodes_of_eight_gpus(procid: int) -> None:
    launch = resolve(srun_env(procid), COLOCATED, TP2_EP4, cuda_devices=1)  # --gpus-per-task=1
    assert launch.source == "slurm" and launch.role == "trainer"
    assert launch.rank == procid and launch.world_size == 32
    assert launch.local_rank == procid % 8 and launch.local_world_size == 8
    assert launch.node_rank == procid // 8
    assert launch.nodes == tuple(NODES) and launch.train_nodes == tuple(NODES) and launch.engine_nodes == ()
    assert (launch.master_addr, launch.master_port) == ("gpu01", PORT)
    assert launch.gpus_per_node == 8


def test_srun_master_port_overrides() -> None:
    env = srun_env(3, MASTER_PORT="24000")
    assert resolve(env, COLOCATED, TP2_EP4).master_port == 24000
    assert resolve(env, ClusterConfig(master_port=25000), TP2_EP4).master_port == 25000


def test_node_index_comes_from_the_node_name_not_the_step() -> None:
    # `srun --relative=2 -N1`: the step's own SLURM_NODEID is 0, but the task runs on the third node
    env = srun_env(
        0, ntasks=8, SLURMD_NODENAME="gpu03", SLURM_STEP_NODELIST="gpu03", SLURM_TASKS_PER_NODE="8"
    )
    launch = resolve(env, COLOCATED, ParallelConfig())
    assert launch.node_rank == 2 and launch.local_world_size == 8
    # without the name, SLURM_NODEID is all there is
    env.pop("SLURMD_NODENAME")
    env["SLURM_NODEID"] = "1"
    assert resolve(env, COLOCATED, ParallelConfig()).node_rank == 1


def test_srun_step_on_part_of_the_allocation() -> None:
    # `srun -N2 --relative=2` in the 4-node job: 16 tasks on gpu03, gpu04; procid 9 is local 1 of gpu04
    env = srun_env(9, ntasks=16, SLURMD_NODENAME="gpu04", SLURM_STEP_NODELIST="gpu[03-04]")
    env["SLURM_STEP_TASKS_PER_NODE"] = "8(x2)"
    launch = resolve(env, COLOCATED, TP2_EP4, cuda_devices=1)  # 16 = 2 nodes x 8 GPUs: no error
    assert (launch.rank, launch.world_size, launch.local_rank, launch.node_rank) == (9, 16, 1, 3)
    assert launch.master_addr == "gpu03" and launch.train_nodes == ("gpu03", "gpu04")


@pytest.mark.parametrize(
    ("variable", "value"),
    [("SLURM_GPUS_ON_NODE", "4"), ("SLURM_GPUS_PER_NODE", "h100:4"), ("SLURM_GPUS_PER_NODE", "4")],
)
def test_gpus_per_node_from_slurm(variable: str, value: str) -> None:
    env = srun_env(5, ntasks=16, per_node=4)
    env.pop("SLURM_GPUS_ON_NODE")
    env[variable] = value
    launch = resolve(env, COLOCATED, ParallelConfig(), cuda_devices=1)
    assert launch.gpus_per_node == 4 and launch.world_size == 16


def test_gpus_per_node_fallbacks() -> None:
    env = srun_env(5, ntasks=16, per_node=4)
    env.pop("SLURM_GPUS_ON_NODE")
    assert resolve(env, ClusterConfig(gpus_per_node=4), ParallelConfig(), cuda_devices=1).gpus_per_node == 4
    assert resolve(env, COLOCATED, ParallelConfig(), cuda_devices=4).gpus_per_node == 4
    assert resolve(env, COLOCATED, ParallelConfig()).gpus_per_node == 4  # CPU: tasks per node


def test_batch_script_without_srun_is_a_single_process() -> None:
    env = srun_env(0)
    env.pop("SLURM_STEP_ID")  # the batch script itself: SLURM variables but no job step
    launch = resolve(env, COLOCATED, ParallelConfig())
    assert (launch.source, launch.rank, launch.world_size) == ("single", 0, 1)


# ---- torchrun -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("node", "local", "group_rank"), [(0, 0, 2), (1, 3, 0), (3, 7, 1)])
def test_srun_torchrun(node: int, local: int, group_rank: int) -> None:
    launch = resolve(torchrun_env(node, local, group_rank=group_rank), COLOCATED, TP2_EP4, cuda_devices=8)
    assert launch.source == "torchrun" and launch.role == "trainer"
    assert launch.rank == group_rank * 8 + local and launch.world_size == 32  # torchrun's numbering
    assert launch.local_rank == local and launch.local_world_size == 8
    assert launch.node_rank == node  # from SLURMD_NODENAME, not torchrun's group rank
    assert (launch.master_addr, launch.master_port) == ("gpu02", 29500)  # torchrun's store


def test_torchrun_without_slurm() -> None:
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}
    env |= {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    launch = resolve(env, COLOCATED, ParallelConfig())
    assert (launch.rank, launch.world_size, launch.local_rank, launch.node_rank) == (5, 8, 1, 1)
    assert launch.nodes == () and launch.num_nodes == 2
    assert (launch.master_addr, launch.master_port) == ("10.0.0.1", 29400)


# ---- single process -----------------------------------------------------------------------------
def test_single_process() -> None:
    launch = resolve({}, COLOCATED, ParallelConfig())
    assert (launch.source, launch.rank, launch.world_size, launch.local_rank) == ("single", 0, 1, 0)
    assert (launch.master_addr, launch.master_port, launch.role) == ("127.0.0.1", 0, "trainer")
    assert launch.num_nodes == 1 and launch.gpus_per_node == 1
    # one process on an 8-GPU box is allowed (debugging), whatever the GPU count
    assert resolve({}, COLOCATED, ParallelConfig(), cuda_devices=8).gpus_per_node == 8


# ---- disaggregated ------------------------------------------------------------------------------
@pytest.mark.parametrize("procid", [0, 9, 23])
def test_disaggregated_three_train_nodes_one_engine_node_trainers(procid: int) -> None:
    launch = resolve(srun_env(procid), DISAGG, TP2_EP4, cuda_devices=1)
    node, local = procid // 8, procid % 8
    assert launch.role == "trainer" and launch.world_size == 3 * 8
    assert launch.rank == node * 8 + local and launch.node_rank == node
    assert launch.train_nodes == ("gpu01", "gpu02", "gpu03") and launch.engine_nodes == ("gpu04",)
    assert (launch.master_addr, launch.master_port) == ("gpu01", PORT)
    assert engine_urls(launch, DISAGG) == ["http://gpu04:31000", "http://gpu04:31001"]


@pytest.mark.parametrize("procid", [24, 31])
def test_disaggregated_engine_node(procid: int) -> None:
    launch = resolve(srun_env(procid), DISAGG, TP2_EP4, cuda_devices=1)
    assert launch.role == "engine" and launch.node_rank == 3 and launch.local_rank == procid - 24
    assert launch.world_size == 24  # the trainers' world, which this process does not join


def test_disaggregated_engine_step_started_relative() -> None:
    # trainers and engines as two steps: `srun -N1 --relative=3 ...` for the engines
    env = srun_env(0, ntasks=1, per_node=1, SLURMD_NODENAME="gpu04", SLURM_STEP_NODELIST="gpu04")
    env["SLURM_TASKS_PER_NODE"] = "1"
    launch = resolve(env, DISAGG, ParallelConfig())
    assert launch.role == "engine" and launch.node_rank == 3


@pytest.mark.parametrize(("node", "local", "group_rank"), [(0, 0, 3), (2, 5, 0), (3, 1, 1)])
def test_disaggregated_under_srun_torchrun(node: int, local: int, group_rank: int) -> None:
    launch = resolve(torchrun_env(node, local, group_rank=group_rank), DISAGG, TP2_EP4, cuda_devices=8)
    if node == 3:
        assert launch.role == "engine"
        return
    # renumbered over the train nodes in node order; torchrun's store (which counts the engine node's
    # processes) is left alone: the trainers meet on the first train node
    assert launch.role == "trainer" and launch.world_size == 24 and launch.rank == node * 8 + local
    assert (launch.master_addr, launch.master_port) == ("gpu01", PORT)


def test_disaggregated_torchrun_store_on_the_first_train_node_gets_the_next_port() -> None:
    env = torchrun_env(1, 0, group_rank=0, master="gpu01") | {"MASTER_PORT": str(PORT)}
    launch = resolve(env, DISAGG, TP2_EP4, cuda_devices=8)
    assert (launch.master_addr, launch.master_port) == ("gpu01", PORT + 1)


# ---- colocated engines on every node --------------------------------------------------------------
EVERY = ClusterConfig(colocated_engines="every_node", engine_port=31000)


@pytest.mark.parametrize("procid", [0, 13, 31])
def test_every_node_engine_urls(procid: int) -> None:
    launch = resolve(srun_env(procid), EVERY, TP2_EP4, cuda_devices=1)
    assert every_node_engines(launch, EVERY) and launch.role == "trainer"
    # train node k serves engines on 31000 + 2k + i, i < 2 (rollout.num_engines = 2)
    expected = [f"http://gpu0{k + 1}:{31000 + 2 * k + i}" for k in range(4) for i in range(2)]
    assert engine_urls(launch, EVERY, 2) == expected
    k = procid // 8
    assert node_engine_ports(EVERY, k, 2) == [31000 + 2 * k, 31001 + 2 * k]
    assert f"http://{NODES[k]}:{31000 + 2 * k}" in expected


def test_every_node_engines_on_the_steps_nodes_only() -> None:
    env = srun_env(9, ntasks=16, SLURMD_NODENAME="gpu04", SLURM_STEP_NODELIST="gpu[03-04]")
    env["SLURM_STEP_TASKS_PER_NODE"] = "8(x2)"
    launch = resolve(env, EVERY, TP2_EP4, cuda_devices=1)
    assert engine_urls(launch, EVERY, 1) == ["http://gpu03:31000", "http://gpu04:31001"]


def test_first_node_and_single_node_engines_are_launched_by_rank_0() -> None:
    launch = resolve(srun_env(0), COLOCATED, TP2_EP4, cuda_devices=1)
    assert not every_node_engines(launch, COLOCATED) and engine_urls(launch, COLOCATED, 2) == []
    alone = resolve({}, EVERY, ParallelConfig())  # one node: "every_node" is rank 0's node
    assert not every_node_engines(alone, EVERY) and engine_urls(alone, EVERY, 2) == []


def test_every_node_with_tensor_transport_is_a_layout_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_sapo.train.setup import init_distributed

    for name, value in srun_env(2, ntasks=4, per_node=1).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SLURM_TASKS_PER_NODE", "1(x4)")
    cfg = from_dict(TrainJobConfig, {"cluster": {"colocated_engines": "every_node"}})
    assert cfg.rollout.weight_sync.transport == "tensor"  # the default
    with pytest.raises(LayoutError) as info:
        init_distributed(cfg)  # raises before joining any process group
    assert "rollout.weight_sync.transport" in str(info.value) and "4 nodes" in str(info.value)


# ---- layout errors ------------------------------------------------------------------------------
def _error(env: dict[str, str], cluster: ClusterConfig, parallel: ParallelConfig, cuda: int = 0) -> str:
    with pytest.raises(LayoutError) as info:
        resolve(env, cluster, parallel, cuda_devices=cuda)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_error_tp_pp_do_not_divide_world() -> None:
    msg = _error(srun_env(0, ntasks=12, per_node=3), COLOCATED, ParallelConfig(tp=2, pp=4))
    assert "parallel.tp" in msg and "parallel.pp" in msg and "8" in msg and "12" in msg


def test_error_etp_ep_do_not_divide_stage() -> None:
    # 32 ranks, pp=4: 8 ranks per stage; ep=3 does not divide them
    msg = _error(srun_env(0), COLOCATED, ParallelConfig(pp=4, ep=3))
    assert "parallel.ep" in msg and "parallel.etp" in msg and "3" in msg and "8 ranks" in msg


def test_error_trainer_world_does_not_match_gpus() -> None:
    # 4 tasks per node on nodes with 8 GPUs
    msg = _error(srun_env(0, ntasks=16, per_node=4), COLOCATED, ParallelConfig(), cuda=1)
    assert "16" in msg and "4 train node(s) x 8 GPU(s)" in msg and "cluster.gpus_per_node" in msg


def test_error_engine_nodes_leave_no_train_node() -> None:
    cluster = ClusterConfig(placement="disaggregated", engine_nodes=4)
    msg = _error(srun_env(0), cluster, ParallelConfig())
    assert "cluster.engine_nodes=4" in msg and "4 node(s)" in msg


def test_error_node_not_in_nodelist() -> None:
    msg = _error(srun_env(0, SLURMD_NODENAME="login7"), COLOCATED, ParallelConfig())
    assert "SLURMD_NODENAME" in msg and "login7" in msg


def test_error_disaggregated_without_node_names() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    msg = _error(env, DISAGG, ParallelConfig())
    assert "cluster.placement" in msg and "SLURM_JOB_NODELIST" in msg


def test_error_every_node_without_node_names() -> None:
    env = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    msg = _error(env, EVERY, ParallelConfig())
    assert "cluster.colocated_engines" in msg and "SLURM_JOB_NODELIST" in msg


def test_error_bad_integer() -> None:
    msg = _error(srun_env(0, SLURM_PROCID="x"), COLOCATED, ParallelConfig())
    assert "SLURM_PROCID" in msg


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"cluster": {"placement": "disaggregated"}}, "cluster.engine_nodes"),
        ({"cluster": {"placement": "disaggregated", "engine_nodes": 1}}, "rollout.weight_sync.transport"),
        (
            {
                "cluster": {"placement": "disaggregated", "engine_nodes": 1},
                "rollout": {"engine": "transformers", "weight_sync": {"transport": "disk", "disk_dir": "/x"}},
            },
            "rollout.engine",
        ),
        ({"cluster": {"placement": "spread"}}, "cluster.placement"),
        ({"cluster": {"colocated_engines": "some_nodes"}}, "cluster.colocated_engines"),
        (
            {"cluster": {"colocated_engines": "every_node"}, "rollout": {"engine": "transformers"}},
            "cluster.colocated_engines",
        ),
        (
            {"cluster": {"colocated_engines": "every_node"}, "rollout": {"urls": ["http://h:1"]}},
            "rollout.urls",
        ),
        ({"cluster": {"engine_port": 70000}}, "cluster.engine_port"),
    ],
)
def test_config_errors_name_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(TrainJobConfig, overrides)
    assert str(info.value).startswith(key), str(info.value)


def test_disaggregated_config_with_distributed_sync_is_accepted() -> None:
    cfg = from_dict(
        TrainJobConfig,
        {
            "cluster": {"placement": "disaggregated", "engine_nodes": 1},
            "rollout": {"weight_sync": {"transport": "distributed"}},
        },
    )
    assert cfg.cluster.engine_nodes == 1


# ---- engine nodes: the stop marker ----------------------------------------------------------------
def _disaggregated_job(out: Path) -> TrainJobConfig:
    return from_dict(
        TrainJobConfig,
        {
            "cluster": {"placement": "disaggregated", "engine_nodes": 1},
            "rollout": {"weight_sync": {"transport": "distributed"}},
            "run": {"output_dir": str(out)},
        },
    )


def _engine_launch(local_rank: int = 0) -> Launch:
    return resolve(srun_env(24 + local_rank), DISAGG, TP2_EP4)


def _serve(cfg: TrainJobConfig, launch: Launch) -> int:
    out = Path(cfg.run.output_dir)
    return serve_engine_node(launch, cfg.cluster, cfg.rollout, output_dir=out, model_dir=out / "hf_init")


def test_engine_node_other_local_ranks_exit_at_once(tmp_path: Path) -> None:
    cfg = _disaggregated_job(tmp_path)
    assert _serve(cfg, _engine_launch(local_rank=3)) == 0


def test_engine_node_ignores_an_old_marker_and_stops_on_the_trainers_marker(tmp_path: Path) -> None:
    cfg = _disaggregated_job(tmp_path)
    stop_marker(tmp_path).parent.mkdir(parents=True)
    stop_marker(tmp_path).write_text("left by an earlier run\n")
    result: list[int] = []
    # no model ever appears: the engine node waits for it until the trainers stop
    waiter = threading.Thread(target=lambda: result.append(_serve(cfg, _engine_launch())))
    waiter.start()
    waiter.join(2.5)
    assert waiter.is_alive(), "the engine node took an earlier run's marker for its own"
    trainer0 = resolve(srun_env(0), DISAGG, TP2_EP4)
    with pytest.raises(RuntimeError), stop_engines_at_exit(tmp_path, trainer0):
        raise RuntimeError("the trainer failed")  # the marker is written on errors too
    waiter.join(10)
    assert not waiter.is_alive() and result == [0]


def test_only_trainer_rank_0_writes_the_stop_marker(tmp_path: Path) -> None:
    with stop_engines_at_exit(tmp_path, resolve(srun_env(5), DISAGG, TP2_EP4)):
        pass
    assert not stop_marker(tmp_path).exists()
    with stop_engines_at_exit(tmp_path, resolve(srun_env(0), DISAGG, TP2_EP4)):
        pass
    assert stop_marker(tmp_path).is_file()


_THREADS = """
import sys, torch
from megatron_sapo.train.config import TrainJobConfig
from megatron_sapo.train.setup import init_distributed
from megatron_sapo.utils.typed_config import load_config
before = torch.get_num_threads()
init_distributed(load_config(TrainJobConfig, None, sys.argv[1:]))
print(before, torch.get_num_threads())
"""


@pytest.mark.parametrize("threads", [1, 0])
def test_cpu_threads_sets_each_trainer_process_torch_threads(threads: int) -> None:
    """run.cpu_threads on a CPU trainer (a fresh process: torch threads are per process); 0 keeps torch's
    default, which the same process reports before the call."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", _THREADS, f"run.cpu_threads={threads}"],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    before, after = map(int, done.stdout.split()[-2:])
    assert after == (threads or before)
    if threads:
        assert before != after or os.cpu_count() == 1  # the default is one per core: the key changed it
