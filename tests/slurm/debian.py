"""Install Debian packages for a test tier (Slurm + munge, shellcheck) when their programs are missing.

    reason = ensure_programs(["shellcheck"], ["shellcheck"])   # None: ready; else why not (skip reason)

Needs root and apt-get (a fresh Debian CI machine as root works; the package lists are fetched with
`apt-get update` only when the first install attempt fails). Nothing is installed when every program is
already on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess

# sbin is not on every root PATH (e.g. under some CI runners); the Slurm/munge daemons live there.
SBIN = ("/usr/sbin", "/sbin")


def which(program: str) -> str | None:
    """`shutil.which` that also looks in /usr/sbin and /sbin."""
    return shutil.which(program) or shutil.which(program, path=os.pathsep.join(SBIN))


def _apt(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Another apt run (a second test session, unattended upgrades) may hold the dpkg lock: wait for it.
    cmd = ["apt-get", "-o", "DPkg::Lock::Timeout=180", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _last_line(text: str) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else "(no output)"


def ensure_programs(programs: list[str], packages: list[str], *, timeout: float = 600) -> str | None:
    """Make `programs` available, installing Debian `packages` if one is missing.

    Returns None when all are on PATH afterwards, else a one-line reason fit for `pytest.skip`.
    """
    missing = [p for p in programs if which(p) is None]
    if not missing:
        return None
    what = f"{', '.join(missing)} not installed"
    if os.geteuid() != 0:
        return f"{what}, and installing {' '.join(packages)} needs root (uid {os.geteuid()})"
    if shutil.which("apt-get") is None:
        return f"{what}, and there is no apt-get to install {' '.join(packages)} (not Debian/Ubuntu)"
    install = ("install", "-y", "--no-install-recommends", *packages)
    try:
        proc = _apt(*install, timeout=timeout)
        if proc.returncode != 0:  # typically "Unable to locate package": empty or stale package lists
            update = _apt("update", timeout=timeout)
            if update.returncode != 0:
                return f"{what}; apt-get update failed: {_last_line(update.stderr or update.stdout)}"
            proc = _apt(*install, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"{what}; apt-get did not finish within {timeout:.0f} s"
    if proc.returncode != 0:
        return (
            f"{what}; apt-get install {' '.join(packages)} failed: {_last_line(proc.stderr or proc.stdout)}"
        )
    still = [p for p in programs if which(p) is None]
    if still:
        return f"apt-get installed {' '.join(packages)} but {', '.join(still)} is still not on PATH"
    return None
