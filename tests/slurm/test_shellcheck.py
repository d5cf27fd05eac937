"""shellcheck passes on every shell script under examples/, tools/ and benchmarks/ (*.sh, *.sbatch).

Installs Debian's shellcheck when missing (as root); skipped, with the reason, when it cannot.
`make lint` runs the same check. Run: `python -m pytest tests/slurm/test_shellcheck.py -q -rs`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.slurm.debian import ensure_programs, which

ROOT = Path(__file__).resolve().parents[2]


def shell_scripts() -> list[Path]:
    return sorted(
        p
        for d in ("examples", "tools", "benchmarks")
        for ext in ("sh", "sbatch")
        for p in (ROOT / d).rglob(f"*.{ext}")
    )


def test_scripts_exist() -> None:
    names = {p.name for p in shell_scripts()}
    assert {
        "tiny_cpu.sbatch",
        "qwen3_30b_a3b_sapo.sbatch",
        "qwen3_vl_30b_a3b_sapo.sbatch",
        "convert_hf_to_megatron.sbatch",
        "convert_megatron_to_hf.sbatch",
        "gpu_check.sh",
    } <= names, names


def test_shellcheck_passes() -> None:
    reason = ensure_programs(["shellcheck"], ["shellcheck"])
    if reason:
        pytest.skip(f"no shellcheck: {reason}")
    scripts = [str(p.relative_to(ROOT)) for p in shell_scripts()]
    proc = subprocess.run(
        [which("shellcheck") or "shellcheck", "--format=gcc", *scripts],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
