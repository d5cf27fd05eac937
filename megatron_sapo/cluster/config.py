"""Where trainers and SGLang engines run across the allocation (the `cluster:` section of a run config).

Read by `cluster/launch.py` and `cluster/engine_nodes.py`. Tests: tests/unit/test_launch.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megatron_sapo.utils.typed_config import check, check_choice, check_min

PLACEMENTS = ("colocated", "disaggregated")
COLOCATED_ENGINES = ("first_node", "every_node")


@dataclass
class ClusterConfig:
    """Where trainers and SGLang engines run across the allocation (see megatron_sapo/cluster/launch.py)."""

    placement: Literal["colocated", "disaggregated"] = "colocated"
    """"colocated": every node trains and runs `rollout.num_engines` SGLang engines on its own node
    (trainer rank 0's node only, or every train node: `colocated_engines`); "disaggregated": the last
    `engine_nodes` nodes only serve SGLang engines (`engines_per_node` each, `rollout.num_engines` is not
    used) and the first ones train."""
    colocated_engines: Literal["first_node", "every_node"] = "first_node"
    """Colocated on several nodes: "first_node" = trainer rank 0 launches the engines on its node;
    "every_node" = local rank 0 of every train node launches `rollout.num_engines` on its node (on
    `engine_port` + node index x num_engines + i) and trainer rank 0 spreads the rollouts over all of them;
    weights then reach them by "distributed" or "disk" ("tensor" reaches only rank 0's node)."""
    engine_nodes: int = 0
    """Disaggregated: how many nodes (the last ones of the allocation) run SGLang engines."""
    engines_per_node: int = 1
    """Disaggregated: SGLang servers per engine node (each `rollout.server.tp_size` GPUs)."""
    engine_port: int = 30000
    """Disaggregated: engine i of a node listens on engine_port + i (colocated "every_node": see there)."""
    gpus_per_node: int | None = None
    """GPUs per node; null = from SLURM (SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE), else the visible ones."""
    master_port: int | None = None
    """Port of the trainers' rendezvous under plain srun; null = MASTER_PORT, else derived from the job id."""

    def __post_init__(self) -> None:
        check_choice(self.placement, PLACEMENTS, "placement")
        check_choice(self.colocated_engines, COLOCATED_ENGINES, "colocated_engines")
        check_min(self, "engine_nodes", minimum=0)
        check_min(self, "engines_per_node", "gpus_per_node")
        for name in ("engine_port", "master_port"):
            port = getattr(self, name)
            check(port is None or 0 < port < 65536, name, f"must be a TCP port in 1..65535, got {port}")
        check(
            self.placement == "colocated" or self.engine_nodes > 0,
            "engine_nodes",
            "must be >= 1 for cluster.placement 'disaggregated' (the last N nodes run the engines)",
        )
