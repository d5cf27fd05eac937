"""Benchmark: RL steps/s and generated tokens/s at rollout.max_staleness 0, 1, 2 on the quickstart job.

    python benchmarks/bench_async.py                      # 150 RL steps per staleness, real SGLang CPU server
    python benchmarks/bench_async.py --steps 40 --staleness 0 1 --json /tmp/async.json
    python benchmarks/bench_async.py --staleness 0 1 1p     # "1p": staleness 1 with rollout.partial

One start policy (the quickstart's cold start, `run.steps=0`, exported once), then the quickstart RL job
from it (`model.path=<start>/hf sft.steps=0`, no in-run eval) once per staleness, one run after the other,
each with its own SGLang server. Each run is read back from its metrics.jsonl over the steps after the
first `--skip`:
- median step seconds and steps/s, and the whole run's steps/s with start-up and end;
- generated tokens/s: Σ rollout/generated_tokens / Σ time/step_s;
- the trainer's idle share: the seconds per step it waited for the engines (staleness 0: the whole
  rollout, time/generate_s + time/reward_s; asynchronous: time/rollout_wait_s + time/sync_wait_s) over
  the step's wall time;
- the engines' idle share: 1 − (their generate + reward seconds) / step seconds. Asynchronous runs report
  those as rollout/generate_s and rollout/reward_s, since they run beside the step.
- staleness: the mean of rollout/staleness_mean and the max of rollout/staleness_max; samples dropped;
  partial rollouts ("Kp"): the mean token staleness and the share of samples continued across a sync.
On 2 cores the trainer (1 torch thread) and the SGLang server share the machine, so overlap gains less
than on GPUs, where the engines and the trainers have devices of their own. Results:
benchmarks/RESULTS.md ("bench_async").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"


def _train(overrides: list[str], log: Path) -> float:
    """Run `megatron-sapo train configs/quickstart.yaml OVERRIDES`; its wall seconds."""
    cmd = [
        sys.executable,
        "-m",
        "megatron_sapo.cli",
        "train",
        str(QUICKSTART),
        "run.progress=false",
        *overrides,
    ]
    started = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(
            cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=out
        ).returncode
    if rc:
        raise RuntimeError(f"exit {rc}: {' '.join(cmd)}; log {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - started


def summarise(rows: list[dict], skip: int, wall: float, steps: int) -> dict[str, float]:
    """The table's numbers from one run's metrics rows (RL steps only, after the first `skip`)."""
    timed = [r for r in rows if "time/step_s" in r][skip:]
    step_s = [r["time/step_s"] for r in timed]
    engine_s = [
        r.get("time/generate_s", 0) + r.get("time/reward_s", 0) + r.get("rollout/generate_s", 0)
        + r.get("rollout/reward_s", 0)
        for r in timed
    ]  # fmt: skip
    asynchronous = any("rollout/staleness_max" in r for r in timed)
    waited = [
        r.get("time/rollout_wait_s", 0) + r.get("time/sync_wait_s", 0) if asynchronous else e
        for r, e in zip(timed, engine_s)
    ]
    total = sum(step_s)
    return {
        "median_step_s": statistics.median(step_s),
        "steps_per_s": 1 / statistics.median(step_s),
        "steps_per_s_whole": steps / wall,
        "gen_tokens_per_s": sum(r["rollout/generated_tokens"] for r in timed) / total,
        "trainer_idle": sum(waited) / total,
        "engine_idle": 1 - sum(engine_s) / total,
        "staleness_mean": statistics.mean(r.get("rollout/staleness_mean", 0) for r in timed),
        "staleness_max": max(r.get("rollout/staleness_max", 0) for r in timed),
        "dropped": sum(r.get("rollout/dropped_stale", 0) for r in timed),
        "reward_mean": statistics.mean(r["reward/mean"] for r in timed),
        "token_staleness_mean": statistics.mean(
            r.get("rollout/token_staleness_mean", r.get("rollout/staleness_mean", 0)) for r in timed
        ),
        "partial_share": sum(r.get("rollout/partial_samples", 0) for r in timed)
        / sum(r["rollout/samples"] for r in timed),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the medians (warm-up)")
    ap.add_argument(
        "--staleness",
        nargs="+",
        default=["0", "1", "2"],
        help="rollout.max_staleness values; a trailing p (1p) also turns rollout.partial on",
    )
    ap.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_async")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    start = work / "start"
    if not (start / "hf" / "config.json").exists():
        _train(["run.steps=0", "rollout.engine=transformers", f"run.output_dir={start}"], work / "start.log")
    print(
        f"load before: {os.getloadavg()[0]:.2f} (1 min); {os.cpu_count()} cores; {args.steps} RL steps each"
    )
    results = {}
    for spec in args.staleness:
        k, partial = int(spec.rstrip("p")), spec.endswith("p")
        out = work / f"staleness{spec}"
        overrides = [
            f"model.path={start / 'hf'}",
            "sft.steps=0",
            f"run.steps={args.steps}",
            "run.eval_every=0",
        ]
        overrides += ["data.synthetic.n_eval=0", f"rollout.max_staleness={k}", f"run.output_dir={out}"]
        overrides += [f"rollout.partial={str(partial).lower()}"]
        wall = _train(overrides, work / f"staleness{spec}.log")
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        results[spec] = summarise(rows, args.skip, wall, args.steps)
    base = results.get("0")
    print(
        f"{'staleness':>9} {'median step s':>13} {'steps/s':>8} {'whole':>6} {'gen tok/s':>9} "
        f"{'trainer idle':>12} {'engine idle':>11} {'stale mean/max':>14} {'token stale':>11} "
        f"{'partial':>7} {'dropped':>7} {'reward':>6}" + ("  vs staleness 0" if base else "")
    )
    for k, r in results.items():
        ratio = f"  {r['steps_per_s'] / base['steps_per_s']:.2f}x steps/s" if base else ""
        print(
            f"{k:>9} {r['median_step_s']:>13.3f} {r['steps_per_s']:>8.2f} {r['steps_per_s_whole']:>6.2f} "
            f"{r['gen_tokens_per_s']:>9.0f} {r['trainer_idle']:>12.0%} {r['engine_idle']:>11.0%} "
            f"{r['staleness_mean']:>9.2f}/{r['staleness_max']:<4.0f} {r['token_staleness_mean']:>11.2f} "
            f"{r['partial_share']:>7.0%} {r['dropped']:>7.0f} {r['reward_mean']:>6.3f}" + ratio
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
