"""Where this process sits in a (multi-node) job: rank, node, rendezvous address and role, from the env.

    launch = resolve(os.environ, cfg.cluster, cfg.parallel, cuda_devices=gpu_count())
    launch.role          # "trainer" or "engine" (disaggregated: the last cluster.engine_nodes nodes)
    engine_urls(launch, cfg.cluster, cfg.rollout.num_engines)   # ["http://node4:30000", ...]: the engines
                                                              # of other nodes the trainer talks to

The same `megatron-sapo train CONFIG.yaml` works under `srun`, under `torchrun` (also `srun torchrun`)
and alone; `resolve` reads only the mapping it is given (pass `os.environ`), so every layout can be
checked with hand-written environments. Rules:
- torchrun (RANK and WORLD_SIZE set) wins: its ranks and rendezvous; the node list still comes from
  SLURM when present.
- plain srun (SLURM_PROCID with a job step): RANK = SLURM_PROCID, WORLD = SLURM_NTASKS, LOCAL_RANK =
  SLURM_LOCALID, MASTER_ADDR = the first node, MASTER_PORT = cluster.master_port, else MASTER_PORT,
  else 20000 + job id % 10000 (below the default engine ports; the same on every node, no exchange).
- a node's index is the position of SLURMD_NODENAME in the expanded SLURM_JOB_NODELIST (right for
  steps started with `srun --relative` too), else SLURM_NODEID.
- disaggregated: processes on the last `engine_nodes` nodes get role "engine"; trainer ranks are
  renumbered over the train nodes (rank = node × tasks per node + local rank) and meet on the first
  train node, so the engine nodes never join the trainers' process group.
- colocated with `colocated_engines: every_node` on several nodes: local rank 0 of train node k serves
  `rollout.num_engines` engines on ports engine_port + k × num_engines + i (distinct across nodes, so
  "nodes" that share one host in tests do not collide); the trainers need the node names (SLURM).
A layout that cannot work is a `LayoutError` (megatron/parallel.py, whose `check_layout` checks the
parallel sizes): one line naming the setting and the numbers.
Tests: tests/unit/test_launch.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from megatron_sapo.cluster.config import ClusterConfig
from megatron_sapo.megatron.parallel import LayoutError, ParallelConfig, check_layout

__all__ = [
    "Launch",
    "LayoutError",
    "engine_urls",
    "every_node_engines",
    "expand_nodelist",
    "node_engine_ports",
    "resolve",
]


# ---- SLURM hostlists ------------------------------------------------------------------------------
def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: "a[1,2],b" -> ["a[1,2]", "b"]."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in hostlist {text!r}")
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if depth:
        raise ValueError(f"unbalanced '[' in hostlist {text!r}")
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_range(spec: str, text: str) -> list[str]:
    """ "1-3,05" -> ["1", "2", "3", "05"]; a range keeps the zero padding of its lower bound."""
    out = []
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if m is None:
            raise ValueError(f"bad range {item!r} in hostlist {text!r}")
        lo, hi = m.group(1), m.group(2)
        if hi is None:
            out.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r} in hostlist {text!r}")
        out += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1)]
    return out


def _expand_one(host: str, text: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", host)
    if m is None:
        return [host]
    head, tail = host[: m.start()], host[m.end() :]
    # every later bracket group multiplies out too: "r[1-2]n[1-2]" -> r1n1 r1n2 r2n1 r2n2
    return [head + v + rest for v in _expand_range(m.group(1), text) for rest in _expand_one(tail, text)]


def expand_nodelist(text: str) -> list[str]:
    """SLURM hostlist -> hostnames: "node[1-3,05],gpu-a[01-02],login" -> node1 node2 node3 node05 ..."""
    return [h for part in _split_top_level(text.strip()) for h in _expand_one(part, text)]


def _expand_counts(text: str) -> list[int]:
    """SLURM_TASKS_PER_NODE form -> one count per node: "8(x2),4" -> [8, 8, 4]."""
    out = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if m is None:
            raise LayoutError(f"SLURM_TASKS_PER_NODE: cannot read {text!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def _gpu_count(text: str) -> int | None:
    """ "8", "h100:8" or "gpu:h100:8" -> 8; a form without a count -> None."""
    m = re.search(r"(\d+)\s*$", text.split(",")[0])
    return int(m.group(1)) if m else None


# ---- the launch ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """This process's place in the job (see the module docstring for where each number comes from)."""

    source: Literal["slurm", "torchrun", "single"]
    """What started the process: plain srun, torchrun (also under srun), or nothing (one process)."""
    rank: int
    """Trainer rank (renumbered over the train nodes when disaggregated); -1 on engine nodes."""
    world_size: int
    """Number of trainer ranks."""
    local_rank: int
    """Index of this process on its node."""
    local_world_size: int
    """Processes per node."""
    node_rank: int
    """Index of this process's node in `nodes` (the allocation's node order)."""
    nodes: tuple[str, ...]
    """Every node of the job (hostnames); empty when unknown (torchrun without SLURM)."""
    train_nodes: tuple[str, ...]
    """Nodes whose processes train (colocated under srun: the nodes of this job step)."""
    engine_nodes: tuple[str, ...]
    """Nodes that only serve SGLang engines (disaggregated); empty when colocated."""
    master_addr: str
    """Host of the trainers' rendezvous (trainer rank 0's node)."""
    master_port: int
    """Port of the trainers' rendezvous; 0 = pick a free one (a single process)."""
    role: Literal["trainer", "engine"]
    """"engine" for processes on engine nodes (disaggregated), else "trainer"."""
    gpus_per_node: int
    """GPUs per node (cluster.gpus_per_node, SLURM, visible CUDA devices, else processes per node)."""
    num_nodes: int
    """Number of nodes of the job (also when their names are unknown)."""
    cuda: bool = False
    """Whether this process sees CUDA devices (else the job runs on CPU: gloo, no GPU checks)."""

    def describe(self) -> str:
        """One log line: source, nodes, world."""
        names = ",".join(self.nodes) if self.nodes else "names unknown"
        engines = f", engine nodes {','.join(self.engine_nodes)}" if self.engine_nodes else ""
        return (
            f"launch: {self.source}, {self.num_nodes} node(s) ({names}){engines}, "
            f"{self.world_size} trainer rank(s) ({self.local_world_size} per node), "
            f"rendezvous {self.master_addr}:{self.master_port or 'free port'}, {f'{self.gpus_per_node} GPU(s)/node' if self.cuda else 'CPU'}"
        )


def _int(env: Mapping[str, str], *names: str, default: int | None = None) -> int:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name])
            except ValueError:
                raise LayoutError(f"{name}: expected an integer, got {env[name]!r}") from None
    if default is None:
        raise LayoutError(f"{' or '.join(names)} is not set")
    return default


def _slurm_nodes(env: Mapping[str, str], *names: str) -> list[str]:
    """The first of the `names` hostlists that is set, expanded ([] when none is)."""
    for name in names:
        if env.get(name):
            try:
                return expand_nodelist(env[name])
            except ValueError as e:
                raise LayoutError(f"{name}: {e}") from None
    return []


def _node_index(env: Mapping[str, str], nodes: list[str]) -> int:
    name = env.get("SLURMD_NODENAME")
    if name:
        if name not in nodes:
            raise LayoutError(f"SLURMD_NODENAME {name!r} is not in the job's node list {','.join(nodes)}")
        return nodes.index(name)
    index = _int(env, "SLURM_NODEID", default=0)
    if not 0 <= index < len(nodes):
        raise LayoutError(f"SLURM_NODEID {index} is outside the job's {len(nodes)} nodes")
    return index


def _slurm_tasks_per_node(env: Mapping[str, str], node: str, step_nodes: list[str], world: int) -> int:
    counts_text = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if counts_text:
        counts = _expand_counts(counts_text)
        if len(counts) == len(step_nodes) and node in step_nodes:
            return counts[step_nodes.index(node)]
    return max(1, world // max(1, len(step_nodes)))


def resolve(
    env: Mapping[str, str], cluster: ClusterConfig, parallel: ParallelConfig, cuda_devices: int = 0
) -> Launch:
    """This process's `Launch` from `env` (pass `os.environ`); raises LayoutError for a layout that cannot run.

    `cuda_devices`: visible CUDA devices (0 on CPU); GPU counts are checked only when it is > 0.
    """
    nodes = _slurm_nodes(env, "SLURM_JOB_NODELIST", "SLURM_NODELIST")
    step_nodes = _slurm_nodes(env, "SLURM_STEP_NODELIST") or nodes
    torchrun = "RANK" in env and "WORLD_SIZE" in env
    srun = not torchrun and "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env)
    if torchrun:
        source = "torchrun"
        rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
        local_rank = _int(env, "LOCAL_RANK", default=0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", default=world)
        master_addr, master_port = env.get("MASTER_ADDR", "127.0.0.1"), _int(env, "MASTER_PORT", default=0)
        if nodes:
            node = _node_index(env, nodes)
        else:
            node = _int(env, "GROUP_RANK", default=rank // local_world)
        num_nodes = len(nodes) or max(1, world // local_world)
    elif srun:
        source = "slurm"
        if not nodes:
            raise LayoutError("srun without SLURM_JOB_NODELIST: cannot find the nodes of the job")
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID", default=0)
        node = _node_index(env, nodes)
        local_world = _slurm_tasks_per_node(env, nodes[node], step_nodes, world)
        master_addr = step_nodes[0]  # SLURM_PROCID 0 runs on the step's first node
        master_port = cluster.master_port or _int(env, "MASTER_PORT", default=0)
        master_port = master_port or _derived_port(env)
        num_nodes = len(nodes)
    else:
        source, rank, world, local_rank, local_world, node = "single", 0, 1, 0, 1, 0
        master_addr, master_port = "127.0.0.1", cluster.master_port or _int(env, "MASTER_PORT", default=0)
        nodes, step_nodes, num_nodes = [], [], 1
    gpus = cluster.gpus_per_node or _slurm_gpus(env) or cuda_devices or local_world

    role: Literal["trainer", "engine"] = "trainer"
    train_nodes, engine_nodes = tuple(step_nodes if source == "slurm" else nodes), ()
    if cluster.placement == "disaggregated":
        if not nodes:
            raise LayoutError(
                "cluster.placement 'disaggregated' needs the job's node names (SLURM_JOB_NODELIST): "
                "run under srun (or srun torchrun)"
            )
        if cluster.engine_nodes >= len(nodes):
            raise LayoutError(
                f"cluster.engine_nodes={cluster.engine_nodes} leaves no train node: the job has "
                f"{len(nodes)} node(s) ({','.join(nodes)})"
            )
        split = len(nodes) - cluster.engine_nodes
        train_nodes, engine_nodes = tuple(nodes[:split]), tuple(nodes[split:])
        world = split * local_world
        if node >= split:
            role, rank = "engine", -1
        else:
            rank = node * local_world + local_rank
        if source == "torchrun":
            # torchrun's store may sit on an engine node and its world counts the engines' processes:
            # the trainers meet on their own store (on the next port when torchrun's is on that host)
            torch_store = (master_addr, master_port)
            master_addr, master_port = train_nodes[0], cluster.master_port or _derived_port(env)
            if (master_addr, master_port) == torch_store:
                master_port += 1
        master_addr = train_nodes[0]

    if (
        cluster.placement == "colocated"
        and cluster.colocated_engines == "every_node"
        and num_nodes > 1
        and not train_nodes
    ):
        raise LayoutError(
            "cluster.colocated_engines 'every_node' needs the names of the job's nodes (SLURM_JOB_NODELIST) to "
            "find each node's engines: run under srun (or srun torchrun)"
        )
    launch = Launch(
        source=source,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        local_world_size=local_world,
        node_rank=node,
        nodes=tuple(nodes),
        train_nodes=train_nodes,
        engine_nodes=engine_nodes,
        master_addr=master_addr,
        master_port=master_port,
        role=role,
        gpus_per_node=gpus,
        num_nodes=num_nodes,
        cuda=cuda_devices > 0,
    )
    check_layout(parallel, world=world, gpu=cuda_devices > 0)
    if cuda_devices > 0 and source != "single":
        # colocated: the nodes that run trainer processes (a step may cover part of the allocation)
        n_train = len(engine_nodes and train_nodes) or max(1, world // local_world)
        if world != n_train * gpus:
            raise LayoutError(
                f"trainer world size {world} != {n_train} train node(s) x {gpus} GPU(s) per node: start one "
                "process per GPU (or set cluster.gpus_per_node to the GPUs the trainers use)"
            )
    return launch


def _derived_port(env: Mapping[str, str]) -> int:
    """The same port on every node of a job without any exchange; below the default engine ports."""
    return 20000 + _int(env, "SLURM_JOB_ID", "SLURM_JOBID") % 10000


def _slurm_gpus(env: Mapping[str, str]) -> int | None:
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        if env.get(name):
            count = _gpu_count(env[name])
            if count:
                return count
    return None


def every_node_engines(launch: Launch, cluster: ClusterConfig) -> bool:
    """Colocated engines on every train node (`colocated_engines: every_node` on more than one node)."""
    return (
        cluster.placement == "colocated"
        and cluster.colocated_engines == "every_node"
        and len(launch.train_nodes) > 1
    )


def node_engine_ports(cluster: ClusterConfig, node_index: int, count: int) -> list[int]:
    """Colocated "every_node": the ports of train node `node_index`'s `count` engines."""
    first = cluster.engine_port + node_index * count
    return list(range(first, first + count))


def engine_urls(launch: Launch, cluster: ClusterConfig, num_engines: int = 1) -> list[str]:
    """The SGLang servers the trainers find by URL (empty: rank 0 launches its own, or `rollout.urls`).

    Disaggregated: http://<engine node>:<engine_port + i>, i < engines_per_node. Colocated "every_node":
    http://<train node k>:<port> for the `num_engines` ports of `node_engine_ports(cluster, k, num_engines)`.
    """
    if launch.engine_nodes:
        return [
            f"http://{node}:{cluster.engine_port + i}"
            for node in launch.engine_nodes
            for i in range(cluster.engines_per_node)
        ]
    if every_node_engines(launch, cluster):
        return [
            f"http://{node}:{port}"
            for k, node in enumerate(launch.train_nodes)
            for port in node_engine_ports(cluster, k, num_engines)
        ]
    return []
