"""Benchmark: where every second of an RL step goes, and generation inside the loop vs the engine alone.

    python benchmarks/bench_rl_step.py                         # quickstart size, 60 RL steps
    python benchmarks/bench_rl_step.py --size large --steps 20
    python benchmarks/bench_rl_step.py --size quickstart large --json /tmp/rl_step.json

Per size, in one run:
1. The start policy: `megatron-sapo train configs/quickstart.yaml run.steps=0` (the cold start, then the
   Hugging Face export of the post-cold-start policy), with the size's model overrides.
2. One SGLang server launched here (`rollout.server` CPU flags) serving that policy, locked with a fresh
   key handed to the trainer through the environment (`rollout.urls`).
3. The RL job from that policy (`model.path=<start>/hf sft.steps=0`), `--steps` steps against that
   server; the phase split is read back from its metrics.jsonl: every row's time/* keys (generation,
   reward, pi_old, updates, export, engine load, guard, eval, checkpoint, and time/other_s, the gaps
   between them), median over the steps after the first `--skip`, with each phase's share of the
   median step.
4. The same server, right after the run (it holds the final weights): the step's requests (the
   quickstart's prompts_per_step prompts x samples_per_prompt samples, its max_new_tokens and
   temperature) sent `--reps` times (a) through the trainer's own client (`SGLangEngine.generate`: chunks
   of `request_batch`, `max_concurrency` in flight) and (b) as one native SGLang /generate request with
   every sample: the engine's own throughput, no client of ours. Reported: generated tokens/s in the
   loop (Σ rollout/generated_tokens / Σ time/generate_s over the measured steps), through the client,
   and native; the ratio loop / native (goal >= 0.8) says what our request path costs.

Tokens/s counts generated tokens only (each sample's response, EOS included). Results and commands:
benchmarks/RESULTS.md ("bench_rl_step").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG = ROOT / "configs" / "quickstart.yaml"
from bench_vs_trl import SIZES as TRL_SIZES  # noqa: E402  (benchmarks/ is the script's own directory)

from megatron_sapo.train.loop import PHASES as LOOP_PHASES  # noqa: E402

SIZES = {size: spec["overrides"] for size, spec in TRL_SIZES.items()}
"""The sizes bench_vs_trl.py runs (the quickstart's tiny MoE, and "large": hidden 256, 4 layers, 8 experts)."""

PHASES = (*LOOP_PHASES, "time/other_s")
"""The loop's own step split (megatron_sapo.train.loop.PHASES) and the gaps between its phases."""


def _train(overrides: list[str], out: Path, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "megatron_sapo.cli", "train", str(CONFIG), *overrides]
    cmd += [f"run.output_dir={out}", "run.progress=false"]
    out.mkdir(parents=True, exist_ok=True)
    log = out.with_name(out.name + ".log")
    # to a file, not a pipe: torch's shared-memory manager outlives the run holding its inherited stdout
    with open(log, "w") as fh:
        done = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{log.read_text()[-3000:]}")


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/step_s" in r]


def _replay(url: str, key, model_dir: str, prompts: list[list[int]], cfg: dict, reps: int) -> dict:
    """Tokens/s of one step's requests through our client and as one native request, on `url`."""
    import requests

    from megatron_sapo.rollout.client import Endpoint, SGLangEngine
    from megatron_sapo.rollout.types import SamplingParams

    n = cfg["samples_per_prompt"]
    sampling = SamplingParams(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"])
    engine = SGLangEngine([Endpoint(url, key)], model_path=model_dir)
    payload = {
        "input_ids": [p for p in prompts for _ in range(n)],
        "sampling_params": sampling.to_sglang(),
        "return_logprob": True,  # as the loop asks: the engine's log-probs travel back either way
    }
    client, native = [], []
    flush = {"headers": key.headers("/flush_cache"), "timeout": 60}
    for _ in range(reps):
        # the loop's requests follow a weight sync, which empties the prefix cache: so do these
        requests.post(f"{url}/flush_cache", **flush).raise_for_status()
        t = time.perf_counter()
        gens = engine.generate(prompts, sampling, n=n)
        client.append(sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t))
        requests.post(f"{url}/flush_cache", **flush).raise_for_status()
        t = time.perf_counter()
        answer = requests.post(f"{url}/generate", json=payload, headers=key.headers("/generate"), timeout=600)
        answer.raise_for_status()
        tokens = sum(o["meta_info"]["completion_tokens"] for o in answer.json())
        native.append(tokens / (time.perf_counter() - t))
    return {
        "client_tokens_per_s": statistics.median(client),
        "native_tokens_per_s": statistics.median(native),
    }


def bench_size(size: str, steps: int, skip: int, reps: int, work: Path) -> dict:
    from megatron_sapo.rollout.engine_key import ADMIN_KEY_ENV, API_KEY_ENV
    from megatron_sapo.rollout.server import ServerConfig, SGLangServer
    from megatron_sapo.train.config import TrainJobConfig
    from megatron_sapo.train.data import load_data
    from megatron_sapo.train.setup import load_tokenizer_and_config
    from megatron_sapo.utils.typed_config import load_config

    overrides = SIZES[size]
    start = work / size / "start"
    t = time.perf_counter()
    _train([*overrides, "run.steps=0"], start)
    start_s = time.perf_counter() - t
    model_dir = str(start / "hf")
    server = SGLangServer(ServerConfig(model_path=model_dir, device="cpu", log_dir=str(work / size / "logs")))
    server.start()
    try:
        env = dict(os.environ, **{API_KEY_ENV: server.key.api, ADMIN_KEY_ENV: server.key.admin})
        run = work / size / "rl"
        rl = [*overrides, f"model.path={model_dir}", "sft.steps=0", f"run.steps={steps}"]
        rl += [f"rollout.urls=[{server.url}]"]
        t = time.perf_counter()
        _train(rl, run, env)
        run_s = time.perf_counter() - t
        rows = _rows(run)[skip:]
        if not rows:
            raise RuntimeError(f"{size}: no step left after --skip {skip}; raise --steps")
        cfg = load_config(TrainJobConfig, CONFIG, rl)
        tokenizer, _ = load_tokenizer_and_config(Path(model_dir))
        data = load_data(cfg, tokenizer)
        r = cfg.rollout
        prompts = data.train_prompt_ids(0, r.prompts_per_step)
        engine_side = _replay(
            server.url,
            server.key,
            model_dir,
            prompts,
            {
                "samples_per_prompt": r.samples_per_prompt,
                "max_new_tokens": r.sampling.max_new_tokens,
                "temperature": r.sampling.temperature,
            },
            reps,
        )
    finally:
        server.stop()
    step = statistics.median(x["time/step_s"] for x in rows)
    phases = {k: statistics.median(x.get(k, 0.0) for x in rows) for k in PHASES}
    loop_tps = sum(x["rollout/generated_tokens"] for x in rows) / sum(x["time/generate_s"] for x in rows)
    return {
        "size": size,
        "steps": steps,
        "measured_steps": len(rows),
        "start_s": start_s,
        "run_s": run_s,
        "median_step_s": step,
        "phases": phases,
        "loop_tokens_per_s": loop_tps,
        **engine_side,
        "loop_over_native": loop_tps / engine_side["native_tokens_per_s"],
    }


def report(result: dict) -> str:
    step = result["median_step_s"]
    lines = [
        f"== {result['size']}: {result['measured_steps']} of {result['steps']} RL steps, median step "
        f"{step:.3f} s ({1 / step:.2f} steps/s); RL run {result['run_s']:.0f} s with start-up",
        f"{'phase':<20} {'median s':>9} {'of step':>8}",
    ]
    for key, value in result["phases"].items():
        lines.append(f"{key:<20} {value:9.4f} {value / step:8.1%}")
    lines.append(f"{'(sum of medians)':<20} {sum(result['phases'].values()):9.4f}")
    lines.append(
        f"generation tokens/s: in the loop {result['loop_tokens_per_s']:.0f}, our client alone "
        f"{result['client_tokens_per_s']:.0f}, native SGLang request {result['native_tokens_per_s']:.0f}; "
        f"loop / native = {result['loop_over_native']:.2f} (goal >= 0.8)"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", nargs="+", choices=sorted(SIZES), default=["quickstart"])
    parser.add_argument("--steps", type=int, default=60, help="RL steps per size")
    parser.add_argument("--skip", type=int, default=5, help="first steps left out of the medians")
    parser.add_argument("--reps", type=int, default=10, help="replays of one step's requests")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary directory")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()[0]:.2f} (1 min); {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_rl_step-") as tmp:
        work = args.workdir or Path(tmp)
        results = [bench_size(size, args.steps, args.skip, args.reps, work) for size in args.size]
    for result in results:
        print(report(result))
    print(f"load after: {os.getloadavg()[0]:.2f} (1 min)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
