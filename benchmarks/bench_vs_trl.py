"""Benchmark: the same SAPO RL job through Hugging Face TRL's GRPOTrainer and through `megatron-sapo train`.

    make install-bench                                    # TRL 1.16.0 (requirements/bench.txt), not in base
    python benchmarks/bench_vs_trl.py --size quickstart   # 500 RL steps each side (~7 min idle, 2 cores)
    python benchmarks/bench_vs_trl.py --size large        # the larger policy (see SIZES)
    python benchmarks/bench_vs_trl.py --size quickstart --steps 20 --json /tmp/trl.json   # a quick check

Per size: (1) the start policy: `megatron-sapo train configs/quickstart.yaml run.steps=0` (tiny Qwen3-MoE
built offline + the supervised cold start, exported as a Hugging Face directory);
(2) megatron-sapo from it (`model.path=<start> sft.steps=0`, SGLang rollouts) in a child process;
(3) TRL from it in a child process of this script (`trl-child`); never both at once. Peak RSS is the
largest sum of RSS over each child's whole process tree (SGLang server included), sampled every 0.2 s.
Both final policies and the start policy are scored by one greedy evaluator (transformers `generate`,
one prompt at a time, the run's eval split, `exact_match`): accuracy gain = final − start.

The job is configs/quickstart.yaml resolved by megatron-sapo's own config loader; TRL gets the same
values (`trl_kwargs`; TRL 1.16 source, trl/trainer/grpo_config.py and grpo_trainer.py):

| job (megatron-sapo key)                   | TRL GRPOConfig                                             |
|-------------------------------------------|------------------------------------------------------------|
| policy: model.path=<start>, sft.steps=0   | the same HF directory, fp32 (`bf16=False`, `use_cpu=True`) |
| prompts: data.synthetic, seed, chat tmpl  | the same records in megatron-sapo's per-step order,        |
|                                           | `shuffle_dataset=False`; chat template applied by TRL      |
|                                           | (the token ids are checked equal to megatron-sapo's)       |
| reward.name=exact_match                   | a reward function calling megatron_sapo's `exact_match`    |
| rollout.samples_per_prompt=8              | `num_generations=8`                                        |
| rollout.prompts_per_step=16               | `generation_batch_size` = 16 × 8 = 128 completions         |
| loss.mini_batches=4                       | `steps_per_generation=4`, `per_device_train_batch_size=32`,|
|                                           | `gradient_accumulation_steps=1`, `num_iterations=1`        |
| rollout.sampling.max_new_tokens=4         | `max_completion_length=4`                                  |
| temperature 1.0, top_p 1, top_k off       | `temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1`|
| loss.name=sapo, tau_pos 1.0, tau_neg 1.05 | `loss_type="sapo"`, `sapo_temperature_pos/neg`             |
| seq-mean-token-mean                       | sapo's reduction (per-sequence token mean, batch mean)     |
| group advantages (r−mean)/(std+1e-6)      | `scale_rewards="group"`: (r−mean)/(std+1e-4)               |
| no KL, no entropy bonus, MoE aux loss 0   | `beta=0.0`, `router_aux_loss_coef=0.0`                     |
| optim.lr 3e-4, warmup 40, cosine          | `learning_rate`, `warmup_steps=40`,                        |
| decay over 4 × run.steps optimizer steps  | `lr_scheduler_type="cosine"`, `max_steps` = 4 × RL steps   |
| Adam β 0.9/0.999, ε 1e-8, wd 0, clip 1.0  | `adamw_torch`, the same betas/ε, `weight_decay=0`,         |
|                                           | `max_grad_norm=1.0`                                        |
| run.steps (RL steps)                      | `max_steps` / 4 (TRL counts optimizer steps)               |

Not matched exactly: the advantage ε (1e-4 vs 1e-6: equal-reward groups are 0 on both sides); TRL
shuffles the 128 samples before splitting them into mini-batches, megatron-sapo balances them by tokens;
rollout sampling is unseeded on both sides (SGLang ignores seeds without deterministic inference), so
the accuracy gain varies by several points from run to run. TRL trains without gradient checkpointing
(its default is on; off is the faster setting at these sizes). `optim.decay_steps` is set to 4 × steps on
both sides (= the quickstart's 2000 at 500 steps), since TRL's cosine always ends at `max_steps`.
megatron-sapo runs with `data.synthetic.n_eval=0` (no in-run evals: TRL runs none either).

Measured per side: RL steps/s from the median step time (megatron-sapo: its `time/step_s`, rollout +
update + weight sync + sync check; TRL: wall time between the ends of every 4th optimizer step, i.e.
generation + reward + π_old + 4 updates + its logging), and for the whole run (process start to exit,
start-up and the final save included); generated tokens/s = completion tokens (EOS included) over the RL
steps / the sum of the step times; peak RSS; CPU seconds (user + system of the whole process tree over the
whole run) per RL step, which others' jobs on a shared machine stretch far less than wall time; the mean
1-minute load average while the side ran. Where the time goes: rollout (generation + reward + π_old
pass on TRL's side, as it does them together) vs the rest of the step. `--size large` is a policy where
compute dominates the fixed per-step costs (see SIZES).
Tests: tests/unit/test_bench_vs_trl.py (knob mapping and table, without TRL).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata as md
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "configs" / "quickstart.yaml"

SIZES: dict[str, dict] = {
    "quickstart": {"overrides": [], "steps": 500},
    # ~45× the quickstart's parameters (7.2M vs 162k, 8 experts top-2): per step, megatron-sapo's update
    # and both sides' generation grow with the model while the fixed costs (HTTP, scheduling, weight-sync
    # check, TRL's Python per step) do not; 4 × 4 tokens of generation keeps a run within minutes.
    "large": {
        "overrides": [
            "model.tiny.hidden=256",
            "model.tiny.layers=4",
            "model.tiny.heads=8",
            "model.tiny.kv_heads=4",
            "model.tiny.head_dim=32",
            "model.tiny.experts=8",
            "model.tiny.moe_ffn=256",
            "sft.lr=1.0e-3",
        ],
        "steps": 100,
    },
}
"""Each size: megatron-sapo overrides of configs/quickstart.yaml for the start policy, default RL steps."""

EXPERTS = "eager"
"""transformers' MoE experts implementation for TRL's policy and the evaluator. Its default on CPU,
"grouped_mm", took 0.2-7 s (erratic) for one forward+backward of 32 x 22 tokens of the large policy where
"eager" took 0.15-0.19 s ("batched_mm": 9-19 s), so TRL gets the fastest one (`--trl-experts` to change)."""

VERSIONS = ("torch", "transformers", "trl", "accelerate", "sglang", "megatron-core", "megatron_sapo")


@dataclass(frozen=True)
class Job:
    """The RL job both sides run (values from the resolved megatron-sapo config)."""

    steps: int
    prompts_per_step: int
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    mini_batches: int
    lr: float
    warmup_steps: int
    clip_grad: float
    tau_pos: float
    tau_neg: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    weight_decay: float
    seed: int

    @property
    def optimizer_steps(self) -> int:
        return self.steps * self.mini_batches


def job_from_config(cfg, steps: int) -> Job:
    """The Job of a megatron-sapo `TrainJobConfig` (only the knobs both trainers have)."""
    r, o, p = cfg.rollout, cfg.optim, cfg.loss.params
    return Job(
        steps=steps,
        prompts_per_step=r.prompts_per_step,
        samples_per_prompt=r.samples_per_prompt,
        max_new_tokens=r.sampling.max_new_tokens,
        temperature=r.sampling.temperature,
        mini_batches=cfg.loss.mini_batches,
        lr=o.lr,
        warmup_steps=o.warmup_steps,
        clip_grad=o.clip_grad,
        tau_pos=p.get("tau_pos", 1.0),
        tau_neg=p.get("tau_neg", 1.05),
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        weight_decay=o.weight_decay,
        seed=cfg.run.seed,
    )


def ours_overrides(job: Job, start: Path, out: Path) -> list[str]:
    """`megatron-sapo train configs/quickstart.yaml` overrides for the RL run from `start`."""
    return [
        f"model.path={start}",
        "sft.steps=0",
        f"run.steps={job.steps}",
        f"run.output_dir={out}",
        "run.eval_every=0",
        "data.synthetic.n_eval=0",  # no in-run eval: TRL runs none; one evaluator scores both afterwards
        f"optim.decay_steps={job.optimizer_steps}",  # TRL's cosine ends at max_steps
    ]


def trl_kwargs(job: Job, out: Path) -> dict:
    """GRPOConfig keyword arguments for the same job (see the module docstring's table)."""
    generation_batch = job.prompts_per_step * job.samples_per_prompt
    if generation_batch % job.mini_batches:
        raise ValueError(
            f"{generation_batch} samples per step do not split into {job.mini_batches} mini-batches"
        )
    return dict(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=generation_batch // job.mini_batches,
        gradient_accumulation_steps=1,
        steps_per_generation=job.mini_batches,
        num_iterations=1,
        num_generations=job.samples_per_prompt,
        max_completion_length=job.max_new_tokens,
        temperature=job.temperature,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        loss_type="sapo",
        sapo_temperature_pos=job.tau_pos,
        sapo_temperature_neg=job.tau_neg,
        scale_rewards="group",
        beta=0.0,
        router_aux_loss_coef=0.0,
        mask_truncated_completions=False,
        learning_rate=job.lr,
        lr_scheduler_type="cosine",
        warmup_steps=job.warmup_steps,
        max_steps=job.optimizer_steps,
        max_grad_norm=job.clip_grad,
        optim="adamw_torch",
        adam_beta1=job.adam_beta1,
        adam_beta2=job.adam_beta2,
        adam_epsilon=job.adam_eps,
        weight_decay=job.weight_decay,
        shuffle_dataset=False,
        seed=job.seed,
        logging_steps=job.mini_batches,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )


@dataclass
class Side:
    """One trainer's numbers."""

    name: str
    step_s: list[float]
    whole_s: float
    generated_tokens: int
    peak_rss_mib: float
    rollout_s: float
    acc_start: float = float("nan")
    acc_final: float = float("nan")
    load: float = float("nan")
    cpu_s: float = float("nan")

    @property
    def median_step_s(self) -> float:
        return statistics.median(self.step_s)

    @property
    def loop_s(self) -> float:
        return sum(self.step_s)

    def row(self) -> dict[str, float]:
        return {
            "median_step_s": self.median_step_s,
            "steps_per_s_median": 1.0 / self.median_step_s,
            "whole_run_s": self.whole_s,
            "steps_per_s_whole": len(self.step_s) / self.whole_s,
            "overhead_s": self.whole_s - self.loop_s,
            "rollout_share": self.rollout_s / self.loop_s,
            "gen_tokens_per_s": self.generated_tokens / self.loop_s,
            "peak_rss_mib": self.peak_rss_mib,
            "acc_start": self.acc_start,
            "acc_final": self.acc_final,
            "acc_gain": self.acc_final - self.acc_start,
            "load_avg": self.load,
            "cpu_s_per_step": self.cpu_s / len(self.step_s),
        }


RATIOS = ("steps_per_s_median", "steps_per_s_whole", "gen_tokens_per_s", "peak_rss_mib", "cpu_s_per_step")


def format_table(size: str, steps: int, sides: list[Side]) -> str:
    """The result table of one size, with ours/TRL ratios when both sides ran."""
    head = (
        f"{'side':<14}{'median step s':>14}{'steps/s':>9}{'whole run s':>12}{'steps/s whole':>14}"
        f"{'start-up+end s':>15}{'rollout %':>10}{'gen tok/s':>10}{'peak RSS MiB':>13}{'CPU s/step':>11}{'load':>6}  eval start -> final (gain)"
    )
    lines = [f"size={size} RL steps={steps}", head]
    rows = {s.name: s.row() for s in sides}
    for name, r in rows.items():
        lines.append(
            f"{name:<14}{r['median_step_s']:>14.3f}{r['steps_per_s_median']:>9.2f}{r['whole_run_s']:>12.1f}"
            f"{r['steps_per_s_whole']:>14.2f}{r['overhead_s']:>15.1f}{100 * r['rollout_share']:>10.0f}"
            f"{r['gen_tokens_per_s']:>10.0f}{r['peak_rss_mib']:>13.0f}{r['cpu_s_per_step']:>11.2f}{r['load_avg']:>6.1f}"
            f"  {r['acc_start']:.2f} -> {r['acc_final']:.2f} ({100 * r['acc_gain']:+.0f} points)"
        )
    if {"megatron-sapo", "trl"} <= rows.keys():
        ours, trl = rows["megatron-sapo"], rows["trl"]
        ratios = "  ".join(f"{k} {ours[k] / trl[k]:.2f}x" for k in RATIOS)
        gain = 100 * (ours["acc_gain"] - trl["acc_gain"])
        lines.append(f"megatron-sapo / trl: {ratios}  accuracy gain difference {gain:+.0f} points")
    return "\n".join(lines)


class TreeMonitor:
    """Largest sum of RSS over a process and all its descendants, and the mean 1-minute load average of
    the machine (other users' jobs included), sampled every `interval` seconds."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        import psutil

        self._root, self._interval, self.peak, self._loads = psutil.Process(pid), interval, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                for p in [self._root, *self._root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):  # a child that just exited
                        total += p.memory_info().rss
            except psutil.Error:
                pass
            self.peak = max(self.peak, total)
            self._loads.append(os.getloadavg()[0])
            self._stop.wait(self._interval)

    def stop(self) -> tuple[float, float]:
        """(peak tree RSS MiB, mean load average)."""
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20, statistics.fmean(self._loads or [float("nan")])


def _run_child(cmd: list[str], log_path: Path) -> tuple[float, float, float, float]:
    """(wall seconds, peak tree RSS MiB, mean load average, CPU seconds) of a child process; raises if it
    fails. CPU seconds: user + system time of the child and every descendant it reaped (SGLang servers
    included), which the other users' load stretches far less than wall time."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        monitor = TreeMonitor(proc.pid)
        rc = proc.wait()
        wall = time.perf_counter() - t0
    peak, load = monitor.stop()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    if rc != 0:
        tail = log_path.read_text().splitlines()[-20:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {rc}; log {log_path}:\n" + "\n".join(tail))
    return wall, peak, load, cpu


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "megatron_sapo.cli", "train", str(QUICKSTART), *overrides]


def prepare(size: str, steps: int, work: Path) -> tuple[Job, Path, list[dict], list[dict]]:
    """The start policy (built once per work dir), the Job, the per-step train prompts and the eval set."""
    from transformers import AutoTokenizer

    from megatron_sapo.train.config import TrainJobConfig
    from megatron_sapo.train.data import load_data
    from megatron_sapo.utils.typed_config import load_config

    extra = SIZES[size]["overrides"]
    start = work / "start"
    if not (start / "hf" / "config.json").exists():
        # run.steps=0: the cold start and its export only; the in-process engine for the step-0 eval
        cold = ["run.steps=0", "rollout.engine=transformers"]
        cmd = _train_cmd([*extra, *cold, f"run.output_dir={start}"])
        wall, *_ = _run_child(cmd, work / "start.log")
        print(f"start policy: {start / 'hf'} ({wall:.0f} s: build + cold start + export)", flush=True)
    cfg = load_config(TrainJobConfig, QUICKSTART, extra)
    job = job_from_config(cfg, steps)
    data = load_data(cfg, AutoTokenizer.from_pretrained(start / "hf"))
    train = []
    for step in range(steps):  # megatron-sapo's rollout order: train_batch(step × prompts_per_step, ...)
        records, ids = data.train_batch(step * job.prompts_per_step, job.prompts_per_step)
        train += [{"prompt": r.prompt, "answer": r.answer, "ids": i} for r, i in zip(records, ids)]
    evals = [{"prompt": r.prompt, "answer": r.answer, "ids": i} for r, i in zip(data.eval, data.eval_ids)]
    return job, start / "hf", train, evals


def run_ours(job: Job, start: Path, work: Path) -> Side:
    out = work / "ours"
    wall, peak, load, cpu = _run_child(_train_cmd(ours_overrides(job, start, out)), work / "ours.log")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "time/step_s" in r]
    return Side(
        name="megatron-sapo",
        step_s=[r["time/step_s"] for r in rows],
        whole_s=wall,
        generated_tokens=round(sum(r["rollout/response_len"] * r["rollout/samples"] for r in rows)),
        peak_rss_mib=peak,
        rollout_s=sum(r["time/rollout_s"] for r in rows),
        load=load,
        cpu_s=cpu,
    )


def run_trl(job: Job, start: Path, train: list[dict], work: Path, experts: str) -> Side:
    out = work / "trl"
    out.mkdir(parents=True, exist_ok=True)
    spec = {"job": asdict(job), "start": str(start), "train": train, "experts": experts}
    (out / "job.json").write_text(json.dumps(spec))
    wall, peak, load, cpu = _run_child([sys.executable, __file__, "trl-child", str(out)], work / "trl.log")
    t = json.loads((out / "times.json").read_text())
    return Side(
        name="trl",
        step_s=t["step_s"],
        whole_s=wall,
        generated_tokens=t["generated_tokens"],
        peak_rss_mib=peak,
        rollout_s=t["rollout_s"],
        load=load,
        cpu_s=cpu,
    )


def trl_child(out: Path) -> None:
    """The TRL side (a child process of this script): train, time every RL step, save the final policy."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_sapo.data.datasets import PromptRecord
    from megatron_sapo.rewards.exact_match import exact_match

    spec = json.loads((out / "job.json").read_text())
    job = Job(**spec["job"])
    tokenizer = AutoTokenizer.from_pretrained(spec["start"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["start"], dtype=torch.float32, experts_implementation=spec["experts"]
    )
    rows = spec["train"]
    first = [{"role": "user", "content": rows[0]["prompt"]}]
    ids = tokenizer.apply_chat_template(first, add_generation_prompt=True, tokenize=True, return_dict=False)
    if list(ids) != rows[0]["ids"]:  # TRL renders conversational prompts itself: same tokens as ours?
        raise RuntimeError(f"TRL's prompt tokens {list(ids)} differ from megatron-sapo's {rows[0]['ids']}")
    dataset = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows]
    )
    stats = {"generated_tokens": 0, "rollout_s": 0.0}

    def reward(completions, answer, completion_ids, **_):
        stats["generated_tokens"] += sum(len(c) for c in completion_ids)
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [exact_match(t, PromptRecord(prompt="", answer=a)) for t, a in zip(texts, answer)]

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            result = super()._generate_and_score_completions(inputs)
            stats["rollout_s"] += time.perf_counter() - t0
            return result

    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer = Timed(
        model=model,
        reward_funcs=reward,
        args=GRPOConfig(**trl_kwargs(job, out / "run")),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[StepTimes()],
    )
    trainer.train()
    trainer.save_model(str(out / "hf"))
    rl_ends = ends[:: job.mini_batches]  # train begin, then the end of every 4th optimizer step
    step_s = [b - a for a, b in itertools.pairwise(rl_ends)]
    (out / "times.json").write_text(json.dumps({**stats, "step_s": step_s}))


def greedy_accuracy(model_dir: Path, evals: list[dict], max_new_tokens: int) -> float:
    """Greedy exact-match accuracy of a HF policy on the eval prompts (one prompt at a time, no padding)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_sapo.data.datasets import PromptRecord
    from megatron_sapo.rewards.exact_match import exact_match

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, experts_implementation=EXPERTS
    ).eval()
    correct = 0
    with torch.no_grad():
        for e in evals:
            ids = torch.tensor([e["ids"]])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            text = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
            correct += exact_match(text, PromptRecord(prompt=e["prompt"], answer=e["answer"])) > 0.5
    return correct / len(evals)


def versions() -> str:
    def version(pkg: str) -> str:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return "not installed"

    return "  ".join(f"{p} {version(p)}" for p in VERSIONS)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=[*SIZES, "both"], default="quickstart")
    ap.add_argument("--steps", type=int, default=None, help="RL steps (default: per size, see SIZES)")
    ap.add_argument("--sides", default="megatron-sapo,trl", help="comma-separated: megatron-sapo, trl")
    ap.add_argument("--workdir", type=Path, default=ROOT / "outputs" / "bench_vs_trl")
    ap.add_argument("--trl-experts", default=EXPERTS, help="transformers experts_implementation for TRL")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    sizes = list(SIZES) if args.size == "both" else [args.size]
    print(versions(), flush=True)
    print(f"load: {os.getloadavg()}", flush=True)
    results = {"versions": versions(), "sizes": {}}
    for size in sizes:
        steps = args.steps or SIZES[size]["steps"]
        work = args.workdir / size
        work.mkdir(parents=True, exist_ok=True)
        job, start, train, evals = prepare(size, steps, work)
        sides = []
        for name in args.sides.split(","):  # one after the other, never concurrently
            print(f"[{size}] {name}: {steps} RL steps ...", flush=True)
            side = (
                run_ours(job, start, work)
                if name == "megatron-sapo"
                else run_trl(job, start, train, work, args.trl_experts)
            )
            print(f"[{size}] {name}: {side.whole_s:.0f} s, load {os.getloadavg()}", flush=True)
            sides.append(side)
        acc_start = greedy_accuracy(start, evals, job.max_new_tokens)
        for side in sides:
            final = work / ("ours" if side.name == "megatron-sapo" else "trl") / "hf"
            side.acc_start, side.acc_final = acc_start, greedy_accuracy(final, evals, job.max_new_tokens)
        print(format_table(size, steps, sides), flush=True)
        results["sizes"][size] = {
            "job": asdict(job),
            "eval_prompts": len(evals),
            "sides": {s.name: {**s.row(), "step_s": s.step_s} for s in sides},
        }
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "trl-child":
        sys.path.insert(0, str(ROOT))
        trl_child(Path(sys.argv[2]))
        sys.exit(0)
    sys.exit(main())
