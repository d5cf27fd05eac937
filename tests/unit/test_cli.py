"""The `megatron-sapo` console script: help and the `env` report (versions read back independently).

Run: python -m pytest tests/unit/test_cli.py -q
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_sapo.cli import main


def test_env_reports_the_installed_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    for pkg in ("torch", "megatron-core", "transformers"):
        assert f"{pkg:<20} {md.version(pkg)}" in out


def test_help_lists_commands_and_bad_command_fails(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "env" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["no-such-command"])
    assert exc.value.code == 2


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "megatron-sapo"  # the venv's bin/, whether or not it is on PATH
    assert exe.exists(), f"console script missing at {exe}: was the package installed (make install)?"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert out.startswith("usage: megatron-sapo")
