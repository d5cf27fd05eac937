"""The Python half of benchmarks/gpu_check.sh: machine facts, and one report from the phases' outputs.

    python benchmarks/gpu_report.py env --json WORK/env.json      # prints facts; last line cuda_devices=N
    python benchmarks/gpu_report.py report --work WORK --out OUT  # OUT/report.md + OUT/report.json

Standard library only (torch is imported by `env`, if it is there), so a report is written whatever else
is broken. `report` reads what gpu_check.sh left in WORK: `phases.tsv` (one line per phase: name, status
passed / failed / timed_out / skipped, exit code, seconds, time box, log path, reason), `cuda` (the
device count the script acted on), `env.json` (+ `env_after.json`, the versions after the install phase), `install.tsv`, `tests.xml` (pytest's JUnit
XML; without it the counts come from the log's summary line), `train_step.json` and `weight_sync.json`
(the benchmarks' `--json`). The log tail of every failed or timed-out phase goes into report.md.
Tests: tests/unit/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

PHASE_FIELDS = ("name", "status", "rc", "seconds", "timebox", "log", "reason")
STATUSES = ("passed", "failed", "timed_out", "skipped")
# Distribution names whose versions the report shows (the first installed of each group).
PACKAGES = {
    "torch": ["torch"],
    "megatron-core": ["megatron-core"],
    "transformer-engine": ["transformer-engine", "transformer-engine-cu13", "transformer-engine-cu12"],
    "transformer-engine-torch": ["transformer-engine-torch", "transformer_engine_torch"],
    "transformers": ["transformers"],
    "sglang": ["sglang"],
    "sglang-kernel": ["sglang-kernel", "sgl-kernel"],
    "flashinfer": ["flashinfer-python"],
    "triton": ["triton"],
}
# Modules a phase needs, checked with find_spec (nothing is imported: importing sglang pulls in a lot).
MODULES = ("megatron", "transformer_engine", "sglang", "sgl_kernel", "flashinfer")
TAIL_LINES = 25


# ---------------------------------------------------------------- env


def _version(names: list[str]) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _nvidia_smi() -> list[str] | str:
    if not shutil.which("nvidia-smi"):
        return "nvidia-smi not found"
    query = "--query-gpu=name,memory.total,driver_version"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"
    return out.stdout.strip().splitlines() if out.returncode == 0 else f"nvidia-smi: {out.stderr.strip()}"


def _torch_facts() -> dict[str, Any]:
    try:
        import torch
    except Exception as exc:  # any import failure means: no usable torch
        return {"error": f"import torch failed: {exc}", "device_count": 0}
    facts: dict[str, Any] = {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    if facts["device_count"]:
        facts["devices"] = [
            {
                "name": torch.cuda.get_device_name(i),
                "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
                "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            }
            for i in range(facts["device_count"])
        ]
        facts["bf16"] = torch.cuda.is_bf16_supported()
    return facts


def collect_env() -> dict[str, Any]:
    """Machine, GPU, torch/CUDA and package facts (torch is imported; nothing else is)."""
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "nvidia_smi": _nvidia_smi(),
        "torch": _torch_facts(),
        "packages": {key: _version(names) for key, names in PACKAGES.items()},
        "modules": {m: importlib.util.find_spec(m) is not None for m in MODULES},
    }


# ---------------------------------------------------------------- parsing the phases' outputs


def read_phases(path: Path) -> list[dict[str, Any]]:
    """phases.tsv rows as dicts (rc int or None, seconds and timebox float)."""
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = dict(zip(PHASE_FIELDS, line.split("\t") + [""] * len(PHASE_FIELDS)))
        if row["status"] not in STATUSES:
            raise ValueError(f"{path}: phase {row['name']!r} has unknown status {row['status']!r}")
        row["rc"] = int(row["rc"]) if row["rc"].lstrip("-").isdigit() else None
        row["seconds"] = float(row["seconds"] or 0)
        row["timebox"] = float(row["timebox"] or 0)
        rows.append(row)
    return rows


def parse_junit(path: Path) -> dict[str, Any]:
    """Counts from pytest's JUnit XML: tests, passed, failed, errors, skipped, and who failed / why skipped."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out: dict[str, Any] = {"tests": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "skips": {}}
    for suite in suites:
        for case in suite.iter("testcase"):
            out["tests"] += 1
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            if case.find("failure") is not None:
                out["failed"] += 1
                out["failures"].append(name)
            elif case.find("error") is not None:
                out["errors"] += 1
                out["failures"].append(name)
            elif (skip := case.find("skipped")) is not None:
                out["skipped"] += 1
                reason = (skip.get("message") or "").strip()
                out["skips"][reason] = out["skips"].get(reason, 0) + 1
    out["passed"] = out["tests"] - out["failed"] - out["errors"] - out["skipped"]
    return out


def parse_pytest_log(text: str) -> dict[str, Any]:
    """Counts from pytest's closing line ("2 passed, 1 skipped in 3.0s"), for a run without its XML."""
    counts: dict[str, Any] = {}
    for line in reversed(text.splitlines()):
        found = re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)", line)
        if found and re.search(r" in [\d.]+s", line):
            for n, word in found:
                counts["errors" if word.startswith("error") else word] = int(n)
            break
    return counts


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def phase_numbers(name: str, work: Path, log_text: str) -> dict[str, Any]:
    """The key numbers of one phase from its output files (or its log)."""
    if name == "env":
        env = _read_json(work / "env_after.json") or _read_json(work / "env.json")
        if not env:
            return {}
        torch = env.get("torch", {})
        devices = torch.get("devices") or []
        return {
            "gpu": devices[0]["name"] if devices else None,
            "gpus": torch.get("device_count", 0),
            "gpu_memory_gib": devices[0]["memory_gib"] if devices else None,
            "torch": torch.get("version"),
            "cuda": torch.get("cuda_build"),
            "python": env.get("python"),
            "nvidia_smi": env.get("nvidia_smi"),
            "torch_error": torch.get("error"),
            **{k: v for k, v in env.get("packages", {}).items() if k != "torch"},
        }
    if name == "install":
        path = work / "install.tsv"
        if not path.is_file():
            return {}
        rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
        return {row[0]: " ".join(row[1:]) for row in rows}
    if name == "tests":
        if (work / "tests.xml").is_file():
            try:
                return parse_junit(work / "tests.xml")
            except ET.ParseError:
                pass
        return parse_pytest_log(log_text)
    if name == "train_step":
        data = _read_json(work / "train_step.json")
        if not data:
            return {}
        keys = ("device", "model", "spec", "dtype", "gpus", "tflops_per_gpu", "mfu", "tokens_per_s", "step_s")
        out = {k: data.get(k) for k in keys}
        out.update(
            peak_memory_gib=data.get("peak_memory_gib"),
            params_b=data.get("params", 0) / 1e9,
            active_params_b=data.get("active_params", 0) / 1e9,
            layers=data.get("args", {}).get("layers"),
        )
        return out
    if name == "weight_sync":
        data = _read_json(work / "weight_sync.json")
        if not data:
            return {}
        out = {k: data.get(k) for k in ("device", "gpu", "dtype", "server_start_s", "distributed_backend")}
        for transport, r in data.get("transports", {}).items():
            out[transport] = {
                "gb": r["gb"],
                "seconds": r["seconds"],
                "gb_per_s": 1 / r["s_per_gb"],
                "logprob_diff_max": r["logprob_diff_max"],
            }
        return out
    return {}


# ---------------------------------------------------------------- the report


def build_report(work: Path, out: Path) -> dict[str, Any]:
    """Everything the report says, as one JSON-able dict (report.json)."""
    phases = read_phases(work / "phases.tsv")
    for phase in phases:
        log = out / phase["log"] if phase["log"] else None
        text = log.read_text(errors="replace") if log and log.is_file() else ""
        phase["numbers"] = phase_numbers(phase["name"], work, text)
        if phase["status"] in ("failed", "timed_out") and log:
            phase["log_tail"] = _tail(log)
    env = _read_json(work / "env_after.json") or _read_json(work / "env.json") or {}
    # gpu_check.sh's verdict (its env phase, or GPU_CHECK_ASSUME_CUDA); else what torch said
    marker = work / "cuda"
    cuda = (
        marker.read_text().strip() not in ("", "0")
        if marker.is_file()
        else bool(env.get("torch", {}).get("device_count"))
    )
    bad = [p["name"] for p in phases if p["status"] in ("failed", "timed_out")]
    verdict = (
        "no CUDA device: every GPU phase skipped"
        if not cuda
        else (f"problems in: {', '.join(bad)}" if bad else "every phase that ran passed")
    )
    return {
        "verdict": verdict,
        "cuda": cuda,
        "total_seconds": sum(p["seconds"] for p in phases),
        "budget_seconds": float((work / "budget").read_text()) if (work / "budget").is_file() else None,
        "env": env,
        "phases": phases,
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _summary(phase: dict[str, Any]) -> str:
    n, name = phase["numbers"], phase["name"]
    if phase["status"] == "skipped":
        return phase["reason"]
    if name == "tests" and n:
        text = ", ".join(f"{n[k]} {k}" for k in ("passed", "failed", "errors", "skipped") if n.get(k))
        return text or "no tests ran"
    if name == "train_step" and n.get("tflops_per_gpu") is not None:
        return (
            f"{n['tflops_per_gpu']:.1f} TFLOP/s per GPU (MFU {100 * n['mfu']:.1f}%), "
            f"{n['tokens_per_s']:,.0f} tokens/s, {n['model']} x{n['layers']} layers, {n['spec']} spec"
        )
    if name == "weight_sync" and n.get("tensor"):
        rates = [f"{t} {n[t]['gb_per_s']:.2f} GB/s" for t in ("tensor", "distributed", "disk") if t in n]
        return ", ".join(rates)
    if name == "env" and n:
        gpus = f"{n['gpus']} x {n['gpu']}" if n.get("gpus") else f"no CUDA device ({n.get('nvidia_smi')})"
        return f"{gpus}, torch {n.get('torch')} (CUDA build {n.get('cuda')})"
    return phase["reason"]


def render_markdown(report: dict[str, Any]) -> str:
    """report.md: verdict, one table row per phase, the numbers per phase, failed phases' log tails."""
    env = report["env"]
    lines = [
        f"# GPU check: {env.get('host', '?')}, {env.get('time', '?')}",
        "",
        f"**{report['verdict']}** (total {report['total_seconds']:.0f} s"
        + (f" of a {report['budget_seconds']:.0f} s budget)" if report["budget_seconds"] else ")"),
        "",
        "| phase | status | seconds / box | key numbers | log |",
        "| --- | --- | --- | --- | --- |",
    ]
    for p in report["phases"]:
        status = p["status"].replace("_", " ") + (f" (rc {p['rc']})" if p["status"] == "failed" else "")
        lines.append(
            f"| {p['name']} | {status} | {p['seconds']:.0f} / {p['timebox']:.0f} | {_summary(p)} | "
            f"{p['log'] or '-'} |"
        )
    for p in report["phases"]:
        if not p["numbers"] and "log_tail" not in p:
            continue
        lines += ["", f"## {p['name']}"]
        lines += [""] if p["numbers"] else []
        for key, value in p["numbers"].items():
            if value is None:
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "-"
            elif isinstance(value, list):
                value = ", ".join(map(str, value)) or "-"
            lines.append(f"- {key}: {_fmt(value)}")
        if "log_tail" in p:
            lines += ["", f"Last lines of {p['log']}:", "", "```", p["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env", help="print machine facts, write them as JSON")
    env.add_argument("--json", type=Path, required=True)
    rep = sub.add_parser("report", help="write OUT/report.md and OUT/report.json")
    rep.add_argument("--work", type=Path, required=True, help="gpu_check.sh's work directory")
    rep.add_argument("--out", type=Path, required=True, help="the output directory (logs are in it)")
    args = parser.parse_args()
    if args.command == "env":
        facts = collect_env()
        args.json.write_text(json.dumps(facts, indent=1))
        print(json.dumps(facts, indent=1))
        print(f"cuda_devices={facts['torch'].get('device_count', 0)}")
        return
    report = build_report(args.work, args.out)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    text = render_markdown(report)
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
