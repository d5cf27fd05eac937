"""Real-Slurm tier: a session-wide two-node Slurm cluster on 127.0.0.1 (tests/slurm/cluster.py).

Needs root: it installs Slurm + munge from Debian when missing (tests/slurm/debian.py), starts munged,
slurmctld and two slurmd, and adds the node names to /etc/hosts for the session. Skipped, with the
reason, only when not root or when the packages cannot be installed; a cluster that does not come up
is a failure. Teardown (cancel jobs, stop the daemons by pid, restore /etc/hosts) always runs.
Run: `python -m pytest tests/slurm -q -rs` (~3-4 min on 2 cores).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.slurm.cluster import LocalSlurm
from tests.slurm.debian import ensure_programs

SLURM_PROGRAMS = ["slurmctld", "slurmd", "sbatch", "srun", "scontrol", "sinfo", "munged", "munge", "unmunge"]
SLURM_PACKAGES = ["slurm-wlm", "munge"]


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurm]:
    if os.geteuid() != 0:
        pytest.skip(
            f"the real-Slurm tier starts slurmctld/slurmd/munged and edits /etc/hosts: needs root "
            f"(running as uid {os.geteuid()})"
        )
    reason = ensure_programs(SLURM_PROGRAMS, SLURM_PACKAGES)
    if reason:
        pytest.skip(f"no Slurm: {reason}")
    cluster = LocalSlurm.start()
    try:
        yield cluster
    finally:
        cluster.stop()
