"""Benchmark: chunked vocab-parallel log-probs vs naive full-vocab fp32 log_softmax (forward + backward).

Compares ``vocab_parallel_logprobs`` (tp = 1, chunked) against
``torch.log_softmax(logits.float(), -1).gather(...)`` on ``[T, V]`` logits at a Qwen-like vocabulary,
each running forward and backward of ``sum(logp · w)``, and prints the peak extra memory and the median
time of each, and the ratios chunked / naive.

How peak memory is measured (CPU): torch's CPU allocator keeps no statistics and tracemalloc does not
see its allocations, so we use the kernel's resident-set high-water mark. Each variant runs in its own
fresh subprocess (so peaks and allocator caches cannot contaminate each other). There, after the inputs
are allocated and touched, we write "5" to ``/proc/self/clear_refs``, which resets the process's peak
RSS (``VmHWM``) to its current RSS; we read ``VmRSS`` as the baseline, run forward + backward, and report
``VmHWM − baseline``. The kernel updates VmHWM on every page fault, so short-lived peaks are caught
(unlike RSS sampling). glibc serves these multi-MB tensors with mmap and unmaps them on free, so freed
tensors do leave the RSS. Where clear_refs is unavailable the first repetition's ``ru_maxrss`` minus the
baseline is used instead (the script says which). The extra memory includes the ``[T, V]`` gradient of
the logits, which both variants must produce. Reported: the largest peak over all repetitions.

Timing: each subprocess runs one untimed warm-up and ``--reps`` timed forward + backward passes; the
variants alternate over ``--rounds`` subprocess rounds so that load from other processes on the machine
hits both alike; the median over all timed passes is reported.

    python benchmarks/bench_logprobs.py --tokens 4096 --vocab 151936 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_sapo.megatron.logprobs import DEFAULT_CHUNK_SIZE, vocab_parallel_logprobs

VARIANTS = ("naive", "chunked", "chunked_inplace")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _naive(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, target[:, None]).squeeze(-1)


def _worker(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    source = torch.empty(args.tokens, args.vocab, dtype=DTYPES[args.dtype]).normal_(std=3.0)
    target = torch.randint(0, args.vocab, (args.tokens,))
    w = torch.randn(args.tokens)
    if args.variant == "naive":
        fn = _naive
    else:
        inplace = args.variant == "chunked_inplace"

        def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return vocab_parallel_logprobs(x, t, chunk_size=args.chunk_size, inplace_backward=inplace)

    peaks, times, method = [], [], "VmHWM after clear_refs"
    # Repetition 0 is a warm-up (thread pools, first-touch costs): its time is dropped, its peak kept.
    logits = None
    for rep in range(args.reps + 1):
        # Fresh logits each repetition, made before the baseline is read (the in-place variant
        # overwrites them with their gradient, as it does with the trainer's temporary logits).
        del logits
        logits = source.clone().requires_grad_()
        exact = _reset_peak()
        base_kb = _status_kb("VmRSS")
        t0 = time.perf_counter()
        (fn(logits, target) * w).sum().backward()
        if rep > 0:
            times.append(time.perf_counter() - t0)
        if exact:
            peaks.append(_status_kb("VmHWM") - base_kb)
        elif rep == 0:
            method = "ru_maxrss (first repetition only)"
            peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kb)
    print(json.dumps({"peak_extra_kb": max(peaks), "times_s": times, "method": method}))


def _run(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--tokens", str(args.tokens)]
    cmd += ["--vocab", str(args.vocab), "--dtype", args.dtype, "--chunk-size", str(args.chunk_size)]
    cmd += ["--reps", str(args.reps), "--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096, help="T, number of tokens")
    p.add_argument("--vocab", type=int, default=151936, help="V, vocabulary size (Qwen2/3: 151936)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="logits dtype")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="tokens per chunk")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per variant (median reported)")
    p.add_argument("--rounds", type=int, default=2, help="alternating naive/chunked subprocess rounds")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    p.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        args.variant = args.worker
        _worker(args)
        return

    gib = 1024**2  # kB per GiB
    logits_gib = args.tokens * args.vocab * DTYPES[args.dtype].itemsize / 1024**3
    print(f"T={args.tokens} V={args.vocab} dtype={args.dtype} chunk_size={args.chunk_size} ", end="")
    print(f"threads={args.threads} reps={args.reps}x{args.rounds}; logits {logits_gib:.2f} GiB")
    # Alternate the variants over rounds so that load from other processes on the machine hits both alike.
    res = {v: {"peak_extra_kb": 0, "times_s": []} for v in VARIANTS}
    for _ in range(args.rounds):
        for v, r in res.items():
            out = _run(v, args)
            r["peak_extra_kb"] = max(r["peak_extra_kb"], out["peak_extra_kb"])
            r["times_s"] += out["times_s"]
            r["method"] = out["method"]
    for v, r in res.items():
        t = statistics.median(r["times_s"])
        times = ", ".join(f"{x:.2f}" for x in r["times_s"])
        print(
            f"{v:16s} peak extra {r['peak_extra_kb'] / gib:6.2f} GiB   median {t:6.2f} s  (fwd+bwd: {times})"
        )
    naive_t = statistics.median(res["naive"]["times_s"])
    for v in VARIANTS[1:]:
        mem = res[v]["peak_extra_kb"] / res["naive"]["peak_extra_kb"]
        tim = statistics.median(res[v]["times_s"]) / naive_t
        print(f"{v}/naive: memory ratio = {mem:.3f}   time ratio = {tim:.3f}")
    print(f"peak memory method: {res['naive']['method']}")


if __name__ == "__main__":
    main()
