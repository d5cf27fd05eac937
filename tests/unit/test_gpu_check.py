"""benchmarks/gpu_check.sh and benchmarks/gpu_report.py on CPU: plan, time boxes, skips, the report.

The script runs for real (bash, `timeout`, the report writer); GPU phases are replaced through
GPU_CHECK_CMD_<phase> with small shell commands, and GPU_CHECK_ASSUME_CUDA=1 lets them run here. The
no-CUDA run uses the real env phase (torch in a child process). Nothing here imports sglang.

    python -m pytest tests/unit/test_gpu_check.py -q
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PHASES = ["env", "install", "tests", "train_step", "weight_sync"]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_report = _module("gpu_report")


def _run(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_") and k != "OUT"}
    return subprocess.run(
        ["bash", str(SCRIPT), "--python", sys.executable, *args],
        env={**environ, **env},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _fake(**commands: str) -> dict[str, str]:
    """Environment running `commands` (by phase) instead of the real phases, CUDA assumed."""
    env = {f"GPU_CHECK_CMD_{p}": "echo fake " + p for p in PHASES}
    env.update({f"GPU_CHECK_CMD_{k}": v for k, v in commands.items()}, GPU_CHECK_ASSUME_CUDA="1")
    return env


def _running(pid: int) -> bool:
    """Whether `pid` is alive (a killed child that nobody has reaped yet is a zombie: not alive)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _phases(out: Path) -> dict[str, dict]:
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.md").is_file()
    return {p["name"]: p for p in report["phases"]}


# ---------------------------------------------------------------- the script


def test_dry_run_prints_the_plan_and_runs_nothing(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = _run("--dry-run", "--out", str(out), "--budget", "300", "--train-args", "--layers 2")
    assert proc.returncode == 0, proc.stderr
    assert f"report in {out}, budget 300 s" in proc.stdout
    for phase in PHASES:
        assert f"  {phase} " in proc.stdout
    assert "bench_train_step_gpu.py --model moe --spec te|local --layers 2" in proc.stdout
    assert "bench_weight_sync.py --device cuda" in proc.stdout
    assert not out.exists()  # nothing was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA path needs a machine without CUDA")
def test_without_cuda_every_gpu_phase_is_skipped_and_the_exit_code_says_so(tmp_path: Path) -> None:
    proc = _run("--out", str(tmp_path))
    assert proc.returncode == 2, proc.stderr
    assert "NO CUDA DEVICE" in proc.stderr
    phases = _phases(tmp_path)
    assert list(phases) == PHASES
    assert phases["env"]["status"] == "passed"
    assert phases["env"]["numbers"]["gpus"] == 0
    assert phases["env"]["numbers"]["torch"] == torch.__version__
    for name in PHASES[1:]:
        assert phases[name]["status"] == "skipped" and phases[name]["reason"] == "no CUDA device"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cuda"] is False and report["verdict"].startswith("no CUDA device")


def test_a_phase_past_its_time_box_is_timed_out_and_the_next_ones_run(tmp_path: Path) -> None:
    pid_file = tmp_path / "sleeper.pid"
    env = _fake(tests=f"echo started; sleep 60 & echo $! > {pid_file}; wait")
    start = time.monotonic()
    proc = _run("--out", str(tmp_path), GPU_CHECK_BOX_tests="2", **env)
    assert time.monotonic() - start < 20
    assert proc.returncode == 1, proc.stderr  # a timed-out phase fails the check
    phases = _phases(tmp_path)
    tests = phases["tests"]
    assert tests["status"] == "timed_out" and tests["rc"] == 124 and tests["timebox"] == 2
    assert 1.5 <= tests["seconds"] < 10
    assert "started" in tests["log_tail"] and tests["log"] == "tests.log"
    assert not _running(int(pid_file.read_text()))  # timeout ended the phase's whole process group
    for name in ("install", "train_step", "weight_sync"):
        assert phases[name]["status"] == "passed", name
    assert "fake weight_sync" in (tmp_path / "weight_sync.log").read_text()
    md = (tmp_path / "report.md").read_text()
    assert "| tests | timed out | 2 / 2 |" in md and "problems in: tests" in md


def test_failed_and_skipping_phases_are_recorded_with_their_reason(tmp_path: Path) -> None:
    env = _fake(
        train_step="echo 'gpu_check: skip: megatron-core is not importable'; exit 3",
        weight_sync="echo server died >&2; exit 7",
    )
    proc = _run("--out", str(tmp_path), **env)
    assert proc.returncode == 1
    phases = _phases(tmp_path)
    assert phases["train_step"]["status"] == "skipped"
    assert phases["train_step"]["reason"] == "megatron-core is not importable"
    assert phases["weight_sync"]["status"] == "failed" and phases["weight_sync"]["rc"] == 7
    assert phases["weight_sync"]["log_tail"] == "server died"


def test_a_spent_budget_skips_the_remaining_phases(tmp_path: Path) -> None:
    proc = _run("--out", str(tmp_path), "--budget", "16", **_fake())  # 15 s are kept for the report
    assert proc.returncode == 0, proc.stderr
    phases = _phases(tmp_path)
    assert {p["status"] for p in phases.values()} == {"skipped"}
    assert all(p["reason"].startswith("budget exhausted") for p in phases.values())


def test_bad_options_are_usage_errors(tmp_path: Path) -> None:
    assert _run("--frobnicate").returncode == 64
    assert _run("--budget", "ten").returncode == 64


# ---------------------------------------------------------------- the report from fake outputs

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.gpu.test_engine_gpu" name="test_bf16" time="9"/>
<testcase classname="tests.gpu.test_engine_gpu" name="test_fp32" time="3"><failure message="boom"/></testcase>
<testcase classname="tests.gpu.test_engine_gpu" name="test_tp2[dense]"><skipped message="needs 2 GPUs"/></testcase>
<testcase classname="tests.gpu.test_engine_gpu" name="test_tp2[moe]"><skipped message="needs 2 GPUs"/></testcase>
</testsuite></testsuites>"""


def _work(tmp_path: Path) -> tuple[Path, Path]:
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    rows = [
        ("env", "passed", "0", "4.2", "60", "env.log", ""),
        ("install", "passed", "0", "1.0", "150", "install.log", ""),
        ("tests", "failed", "1", "80.5", "150", "tests.log", "exit code 1"),
        ("train_step", "passed", "0", "95.0", "180", "train_step.log", ""),
        (
            "weight_sync",
            "timed_out",
            "124",
            "180.0",
            "180",
            "weight_sync.log",
            "no result within its 180 s box",
        ),
    ]
    (work / "phases.tsv").write_text("".join("\t".join(r) + "\n" for r in rows))
    (work / "cuda").write_text("1\n")
    (work / "budget").write_text("540\n")
    env = {
        "host": "gpu1",
        "time": "now",
        "python": "3.12.3",
        "nvidia_smi": ["NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04"],
        "torch": {"version": "2.11.0", "cuda_build": "13.0", "device_count": 1, "devices": [
            {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "memory_gib": 79.2}]},
        "packages": {"megatron-core": "0.16.1", "transformer-engine": None},
    }  # fmt: skip
    (work / "env.json").write_text(json.dumps(env))
    (work / "install.tsv").write_text("wheels\tinstalled\t2 from .whl\nsglang-cuda\tmissing\tno index\n")
    (work / "tests.xml").write_text(JUNIT)
    train = dict(device="NVIDIA H100 80GB HBM3", model="moe", spec="local", dtype="bf16", gpus=1,
                 tflops_per_gpu=123.4, mfu=0.1248, tokens_per_s=20000.0, step_s=1.6, peak_memory_gib=61.0,
                 params=3.1e9, active_params=0.54e9, args={"layers": 4})  # fmt: skip
    (work / "train_step.json").write_text(json.dumps(train))
    for name in ("env", "install", "tests", "train_step"):
        (out / f"{name}.log").write_text(f"{name} output\n")
    (out / "weight_sync.log").write_text("\n".join(f"line {i}" for i in range(100)) + "\n")
    return work, out


def test_report_from_fake_phase_outputs(tmp_path: Path) -> None:
    work, out = _work(tmp_path)
    report = gpu_report.build_report(work, out)
    phases = {p["name"]: p for p in report["phases"]}
    assert report["cuda"] is True and report["verdict"] == "problems in: tests, weight_sync"
    assert report["total_seconds"] == pytest.approx(4.2 + 1 + 80.5 + 95 + 180)
    assert phases["env"]["numbers"]["gpu"] == "NVIDIA H100 80GB HBM3"
    assert phases["install"]["numbers"] == {
        "wheels": "installed 2 from .whl",
        "sglang-cuda": "missing no index",
    }
    tests = phases["tests"]["numbers"]
    assert (tests["tests"], tests["passed"], tests["failed"], tests["skipped"]) == (4, 1, 1, 2)
    assert tests["failures"] == ["tests.gpu.test_engine_gpu::test_fp32"]
    assert tests["skips"] == {"needs 2 GPUs": 2}
    assert phases["train_step"]["numbers"]["tflops_per_gpu"] == 123.4
    assert phases["train_step"]["numbers"]["layers"] == 4
    assert phases["weight_sync"]["numbers"] == {}  # no JSON: it timed out
    tail = phases["weight_sync"]["log_tail"].splitlines()
    assert tail == [f"line {i}" for i in range(75, 100)]  # the last 25 lines
    assert "log_tail" not in phases["train_step"]

    md = gpu_report.render_markdown(report)
    assert "| tests | failed (rc 1) | 80 / 150 | 1 passed, 1 failed, 2 skipped | tests.log |" in md
    assert "123.4 TFLOP/s per GPU (MFU 12.5%)" in md and "moe x4 layers, local spec" in md
    assert "| weight_sync | timed out | 180 / 180 |" in md and "line 99" in md


def test_report_cli_writes_both_files(tmp_path: Path) -> None:
    work, out = _work(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/gpu_report.py"),
            "report",
            "--work",
            str(work),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "report.json").read_text())["phases"][0]["name"] == "env"
    assert (out / "report.md").read_text() == proc.stdout.rstrip("\n") + "\n"


def test_weight_sync_numbers_and_pytest_summary_parsing(tmp_path: Path) -> None:
    sync = {"device": "cuda", "dtype": "bf16", "server_start_s": 41.0, "distributed_backend": "gloo",
            "transports": {"tensor": {"gb": 1.0, "seconds": 0.25, "s_per_gb": 0.25, "logprob_diff_max": 0.01}}}  # fmt: skip
    (tmp_path / "weight_sync.json").write_text(json.dumps(sync))
    numbers = gpu_report.phase_numbers("weight_sync", tmp_path, "")
    assert numbers["tensor"]["gb_per_s"] == pytest.approx(4.0)
    assert numbers["distributed_backend"] == "gloo"
    log = "....\nFAILED tests/gpu/x.py::t\n===== 1 failed, 3 passed, 2 skipped, 1 error in 12.5s =====\n"
    assert gpu_report.phase_numbers("tests", tmp_path, log) == {
        "failed": 1,
        "passed": 3,
        "skipped": 2,
        "errors": 1,
    }
    assert gpu_report.parse_pytest_log("collecting ... interrupted") == {}


def test_phase_table_rejects_an_unknown_status(tmp_path: Path) -> None:
    (tmp_path / "phases.tsv").write_text("tests\tmaybe\t0\t1\t2\ttests.log\t\n")
    with pytest.raises(ValueError, match="unknown status 'maybe'"):
        gpu_report.read_phases(tmp_path / "phases.tsv")


def test_moe_flops_count_qwen3_30b_a3b_active_parameters() -> None:
    bench = _module("bench_train_step_gpu")
    args = dict(bench.MODELS["moe"], model="moe", layers=48, vocab=151936, seq=4096)
    per_token, n_active = bench.flops_per_token(args)
    # Qwen3-30B-A3B's model card: 3.3B activated parameters (input embedding included, counted here once)
    assert n_active + args["vocab"] * args["hidden"] == pytest.approx(3.3e9, rel=0.02)
    attention = 6 * 48 * 32 * 128 * 4096
    assert per_token == pytest.approx(6 * n_active + attention)
