"""Benchmark: weight-export throughput of the bridge, and speed / peak memory of the checkpoint converters.

(a) Export: `megatron_sapo.bridge.export_hf_weights` on a >= 1 GiB random fp32 model (megatron's own
random init, built by `build_gpt_model`) at TP2 (a dense Qwen3: MoE with TP>1 needs sequence
parallelism, which has no CPU path) and at EP2 (a Qwen3-MoE of about the same size), 2 gloo ranks
(`run_on_ranks`, 1 torch thread each). Every rank iterates the generator; rank 0 drains each bucket by
copying every tensor's bytes into one preallocated (pre-touched) byte buffer, as a consumer that ships
the bucket would, and drops it before asking for the next, as the bridge asks. Two references, both
measured in the same run (median over `--reps`):
- memcpy: loop GB/s = HF bytes received on rank 0 / wall time of the whole loop on rank 0 (drain
  included; barrier first), against a single-process `dst.copy_(src)` of the same number of bytes
  between two pre-touched buffers (torch's default threads); ratio export / memcpy (target >= 0.3).
  Rank 0's peak extra RSS during the export (VmHWM after `/proc/self/clear_refs`, above the post-build
  RSS) is printed too: the bridge promises one bucket plus one gathered parameter.
- the transport: the export's own all-gathers replayed raw in the same processes, over the same process
  groups (gloo here; whatever backend the groups have, e.g. NCCL on GPU), same dtype, same order, into
  one pre-allocated, pre-touched output buffer, timed on rank 0 in each rep right after the export.
  "whole": one collective per gathered parameter with its whole shard as input (a TP-split parameter
  over its TP group, an expert over the EP group), as a plain caller would gather; "chunks": exactly the
  collectives the export issued (its row chunks through its staging buffer, recorded in an untimed
  export by wrapping the export's all-gather). GB/s is defined the same way on both sides: bytes the
  collectives deliver on rank 0 (sum of their outputs: group size x shard bytes) / seconds, where the
  export's seconds are the loop's minus rank 0's drain (the consumer's work), so ratio =
  all_gather seconds / export seconds (target >= 0.7). Under "whole" and "chunks" the first column is
  the number of collectives.

(b) Converters: a random Qwen3 HF model of each `--convert-gb` size (default 1.5 GB) is saved with
`save_pretrained(max_shard_size=--max-shard)` (default 500MB, so there are several shards), then
converted with `tools/convert_hf_to_megatron.py` and back with `tools/convert_megatron_to_hf.py`
(same `--max-shard-size`), each with 1 process (plain python) and 2 (`torchrun`; hf->mcore at TP2).
Each converter process runs inside this script (`--measure-into`, via `runpy`): it first does the
converters' imports (torch, megatron-core, transformers, `megatron_sapo.convert`), records VmRSS as
its baseline, resets the kernel's high-water mark to it (`/proc/self/clear_refs` 5), runs the tool and
records VmHWM as its peak (short peaks count; touched pages of mmap'd files count as resident).
Reported for the rank with the largest peak: base, peak ("raw"), peak − base ("above base"), both
divided by the largest shard file of the HF checkpoint (target: peak <= 1.5 × largest shard), the
largest tensor, wall seconds (process start to exit, imports included), work seconds (after the
imports) and GB/s = HF bytes / seconds for both.

    python benchmarks/bench_bridge.py                                  # both parts, defaults
    python benchmarks/bench_bridge.py --skip-convert --buckets-mib 512 64
    python benchmarks/bench_bridge.py --skip-export --convert-gb 1.5 --max-shard 500MB
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_sapo.utils.spawn import free_port, run_on_ranks

ROOT = Path(__file__).resolve().parent.parent
GB = 1e9


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _export_config(layout: str, args: argparse.Namespace):  # -> transformers PretrainedConfig
    from transformers import Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128,
        num_key_value_heads=max(1, args.hidden // 512),
        head_dim=128,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    if layout == "TP2":
        return Qwen3Config(**common, intermediate_size=args.intermediate)
    # EP2: as many expert bytes per layer as the dense MLP has.
    experts = args.experts
    return Qwen3MoeConfig(
        **common,
        intermediate_size=args.intermediate,
        num_experts=experts,
        num_experts_per_tok=2,
        moe_intermediate_size=args.intermediate // experts,
    )


def _gathers(model, hf_config) -> list[tuple[object, torch.Tensor]]:
    """The all-gathers the export runs on this rank, one per gathered parameter, in its order:
    (group, input shard). TP-split parameters over their TP group (expert-TP for experts), experts over
    the EP group (its input is then the TP-gathered tensor: a stand-in of that shape when TP > 1)."""
    from megatron_sapo.bridge.arch import mapping_table
    from megatron_sapo.bridge.layout import ParallelGroups, group_size, local_parameters, model_chunks

    groups, table = ParallelGroups.from_parallel_state(), mapping_table(hf_config)
    out = []
    for lp in local_parameters(model_chunks(model), table, groups):
        if not lp.mapping.exported(table.dims):
            continue
        shard, tp = lp.param.detach(), group_size(lp.tp_group)
        if lp.mapping.split is not None and tp > 1:
            out.append((lp.tp_group, shard))
            shard = shard.new_ones(lp.mapping.full_shape(tuple(shard.shape), tp))
        if lp.mapping.is_expert and group_size(groups.ep) > 1:
            out.append((groups.ep, shard))
    return out


def _export_chunks(model, hf_config, bucket_bytes: int) -> list[tuple[object, torch.Tensor]]:
    """The collectives one export really issues on this rank (row chunks through its staging buffer),
    recorded by wrapping the export's all-gather for one untimed run: (group, a stand-in input)."""
    from megatron_sapo.bridge import export as export_module

    calls, real = [], export_module._all_gather_single

    def record(out: torch.Tensor, piece: torch.Tensor, group=None) -> None:
        calls.append((group, torch.ones_like(piece)))
        real(out, piece, group=group)

    export_module._all_gather_single = record
    try:
        for bucket in export_module.export_hf_weights(model, hf_config, bucket_bytes=bucket_bytes):
            del bucket
    finally:
        export_module._all_gather_single = real
    return calls


def _all_gather_seconds(gathers: list[tuple[object, torch.Tensor]], buffer: torch.Tensor) -> float:
    """One pass of the raw collectives: each input all-gathered over its group into a view of `buffer`
    (pre-allocated, pre-touched, reused), in order."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    dist.barrier()
    t0 = time.perf_counter()
    for group, shard in gathers:
        n = dist.get_world_size(group)
        out = buffer[: n * shard.numel() * shard.element_size()].view(shard.dtype)
        gather(out, shard.reshape(-1), group=group)
    return time.perf_counter() - t0


def _export_rank(rank: int, world_size: int, layout: str, args: argparse.Namespace) -> dict:
    import torch.distributed as dist

    from megatron_sapo.bridge import export_hf_weights
    from megatron_sapo.megatron.models import build_gpt_model
    from megatron_sapo.megatron.testing import init_megatron_cpu

    torch.set_num_threads(1)  # 2 ranks on the machine's cores
    init_megatron_cpu(**({"tp": 2} if layout == "TP2" else {"ep": 2}))
    hf_config = _export_config(layout, args)
    model = build_gpt_model(hf_config).eval()
    local_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer = torch.ones(max(args.buckets_mib) << 20, dtype=torch.uint8)  # pre-touched drain target
    gathers = _gathers(model, hf_config)
    gathered = sum(dist.get_world_size(g) * t.numel() * t.element_size() for g, t in gathers)
    gather_out = torch.ones(
        max((dist.get_world_size(g) * t.numel() * t.element_size() for g, t in gathers), default=1),
        dtype=torch.uint8,
    )
    out = {"local_bytes": local_bytes, "gathered": gathered, "collectives": len(gathers), "runs": {}}
    for mib in args.buckets_mib:
        chunks = _export_chunks(model, hf_config, mib << 20)
        times, drains, raw, raw_chunks, peaks, received = [], [], [], [], [], 0
        for _ in range(args.reps):
            dist.barrier()
            Path("/proc/self/clear_refs").write_text("5")
            base_kb = _status_kb("VmRSS")
            t0 = time.perf_counter()
            received, drain = 0, 0.0
            for bucket in export_hf_weights(model, hf_config, bucket_bytes=mib << 20, dst_ranks=(0,)):
                d0, offset = time.perf_counter(), 0
                for _, tensor in bucket:
                    flat = tensor.reshape(-1).view(torch.uint8)
                    if offset + flat.numel() > buffer.numel():  # a single tensor above the bucket size
                        offset, buffer = 0, torch.ones(flat.numel(), dtype=torch.uint8)
                    buffer[offset : offset + flat.numel()].copy_(flat)
                    offset += flat.numel()
                received += offset
                bucket = tensor = flat = None  # loop variables would keep this bucket alive during the next
                drain += time.perf_counter() - d0
            times.append(time.perf_counter() - t0)
            drains.append(drain)
            peaks.append((_status_kb("VmHWM") - base_kb) << 10)
            raw.append(_all_gather_seconds(gathers, gather_out))  # same reps: same load
            raw_chunks.append(_all_gather_seconds(chunks, gather_out))
        out["runs"][mib] = {
            "bytes": received,
            "times": times,
            "drains": drains,
            "all_gather": raw,
            "chunks": raw_chunks,
            "collectives": len(chunks),
            "peak_extra": max(peaks),
        }
    return out


def _memcpy_times(nbytes: int, reps: int) -> list[float]:
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.zeros(nbytes, dtype=torch.uint8)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return times


def bench_export(args: argparse.Namespace) -> None:
    print(
        f"== export: vocab={args.vocab} hidden={args.hidden} layers={args.layers} "
        f"intermediate={args.intermediate} (EP2: {args.experts} experts x {args.intermediate // args.experts})"
        f", fp32, 2 gloo ranks x 1 thread, reps={args.reps}; memcpy: {torch.get_num_threads()} threads"
    )
    results = {layout: run_on_ranks(_export_rank, world_size=2, args=(layout, args), timeout=1800)[0]
               for layout in args.layouts}  # fmt: skip
    print("-- vs memcpy (loop = export + rank 0's drain; GB = HF bytes received on rank 0)")
    print(
        f"{'layout':<6} {'bucket':>8} {'GB':>6} {'loop s':>7} {'GB/s':>6} {'memcpy GB/s':>11} {'ratio':>6} "
        f"{'rank0 peak extra':>17}  loop times"
    )
    for layout, result in results.items():
        for mib, run in result["runs"].items():
            nbytes, t = run["bytes"], statistics.median(run["times"])
            copy = statistics.median(_memcpy_times(nbytes, args.reps))
            print(
                f"{layout:<6} {mib:>4} MiB {nbytes / GB:>6.2f} {t:>7.2f} {nbytes / t / GB:>6.2f} "
                f"{nbytes / copy / GB:>11.2f} {copy / t:>6.2f} {run['peak_extra'] / 2**20:>13.0f} MiB  "
                + ", ".join(f"{x:.2f}" for x in run["times"])
            )
    print(
        "-- vs the transport (export = loop - drain; all_gather = the export's collectives run raw into a "
        "pre-touched buffer: whole = one per gathered shard, chunks = the export's own row chunks; "
        "GB = bytes the collectives deliver on rank 0; ratio = export GB/s / all_gather GB/s)"
    )
    print(
        f"{'layout':<6} {'bucket':>8} {'GB':>6} {'export s':>8} {'GB/s':>6} | {'whole':>5} {'s':>5} "
        f"{'GB/s':>5} {'ratio':>5} | {'chunks':>6} {'s':>5} {'GB/s':>5} {'ratio':>5}  export / whole / chunks s"
    )
    for layout, result in results.items():
        nbytes = result["gathered"]
        for mib, run in result["runs"].items():
            exports = [t - d for t, d in zip(run["times"], run["drains"], strict=True)]
            export, whole, chunks = map(statistics.median, (exports, run["all_gather"], run["chunks"]))
            print(
                f"{layout:<6} {mib:>4} MiB {nbytes / GB:>6.2f} {export:>8.2f} {nbytes / export / GB:>6.2f} | "
                f"{result['collectives']:>5} {whole:>5.2f} {nbytes / whole / GB:>5.2f} {whole / export:>5.2f} | "
                f"{run['collectives']:>6} {chunks:>5.2f} {nbytes / chunks / GB:>5.2f} {chunks / export:>5.2f}  "
                + " / ".join(
                    ", ".join(f"{x:.2f}" for x in xs) for xs in (exports, run["all_gather"], run["chunks"])
                )
            )


def _save_random_hf(path: Path, size_gb: float, max_shard: str) -> tuple[int, int]:
    """A random Qwen3 of about `size_gb` GB in fp32, saved in shards; (its bytes, its largest tensor's)."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    hidden, vocab, inter = 1024, 16384, 4096
    per_layer = 4 * (2 * hidden * 1024 + 2 * hidden * 512 + 3 * hidden * inter + 4 * 128 + 2 * hidden)
    layers = max(1, round((size_gb * GB - 2 * 4 * vocab * hidden) / per_layer))
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=64, tie_word_embeddings=False,
        max_position_embeddings=4096, dtype="float32",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_config(config).float()
    model.save_pretrained(path, max_shard_size=max_shard)
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return sum(sizes), max(sizes)


def _measure(out_file: str, tool: str, tool_args: list[str]) -> None:
    """Run `tool` in this process and write {base, peak, seconds, code} to `out_file`.<RANK>.

    base = VmRSS once the converters' imports are done, before any work; the kernel's high-water mark is
    then reset to it (`/proc/self/clear_refs` 5) and peak = VmHWM when the tool has finished.
    """
    import megatron.core  # noqa: F401  (the imports every converter does: part of the baseline)
    import transformers  # noqa: F401

    import megatron_sapo.convert  # noqa: F401

    base = _status_kb("VmRSS") << 10
    Path("/proc/self/clear_refs").write_text("5")
    sys.argv = [tool, *tool_args]
    code, t0 = 0, time.perf_counter()
    try:
        runpy.run_path(tool, run_name="__main__")
    except SystemExit as done:
        code = done.code or 0
    seconds, peak = time.perf_counter() - t0, _status_kb("VmHWM") << 10
    Path(f"{out_file}.{os.environ.get('RANK', '0')}").write_text(
        json.dumps(dict(base=base, peak=peak, seconds=seconds, code=code))
    )
    sys.exit(code)


def _run(cmd: list[str], procs: int, log_dir: Path) -> tuple[float, dict[str, int]]:
    """Run a converter (script + args) on `procs` ranks through `_measure`: (wall seconds, the rank with
    the largest peak's {base, peak, seconds})."""
    for old in log_dir.glob("rss.*"):
        old.unlink()
    measured = [str(Path(__file__).resolve()), "--measure-into", str(log_dir / "rss"), *cmd]
    launcher = [sys.executable]
    if procs > 1:
        launcher += [
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={procs}",
            f"--master-port={free_port()}",
        ]
    t0 = time.perf_counter()
    proc = subprocess.run([*launcher, *measured], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ranks = [json.loads(f.read_text()) for f in log_dir.glob("rss.*")]
    return seconds, max(ranks, key=lambda r: r["peak"])


TO_MCORE, TO_HF = "tools/convert_hf_to_megatron.py", "tools/convert_megatron_to_hf.py"


def bench_convert(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench_bridge_", dir=args.workdir))
    try:
        print(
            f"== converters: random Qwen3 fp32, save_pretrained max_shard_size={args.max_shard}, "
            f"mcore->hf --max-shard-size {args.max_shard}; RSS of the rank with the largest peak: base = "
            f"VmRSS after imports, peak = VmHWM (reset to base before the work)"
        )
        print(
            f"{'direction':<9} {'procs':>5} {'GB':>5} {'wall s':>6} {'GB/s':>5} {'work s':>6} {'GB/s':>5} {'base RSS':>9} "
            f"{'peak RSS':>9} {'above base':>10} {'largest shard':>13} {'largest tensor':>14} "
            f"{'peak/shard':>10} {'above/shard':>11}"
        )
        for size in args.convert_gb:
            hf = work / f"hf_{size}"
            nbytes, tensor = _save_random_hf(hf, size, args.max_shard)
            shard = max(f.stat().st_size for f in hf.glob("*.safetensors"))
            for procs in args.procs:
                mcore, back = work / f"mcore_{size}_{procs}", work / f"back_{size}_{procs}"
                layout = [] if procs == 1 else ["--tp", str(procs)]
                to_hf = ["--max-shard-size", args.max_shard, "--no-progress"]
                runs = [
                    ("hf->mcore", [TO_MCORE, "--hf-dir", str(hf), "--output-dir", str(mcore), *layout]),
                    ("mcore->hf", [TO_HF, "--megatron-dir", str(mcore), "--output-dir", str(back), *to_hf]),
                ]
                for name, cmd in runs:
                    seconds, rss = _run(cmd, procs, work)
                    base, peak = rss["base"], rss["peak"]
                    print(
                        f"{name:<9} {procs:>5} {nbytes / GB:>5.2f} {seconds:>6.1f} {nbytes / seconds / GB:>5.2f} "
                        f"{rss['seconds']:>6.1f} {nbytes / rss['seconds'] / GB:>5.2f} "
                        f"{base / 2**20:>5.0f} MiB {peak / 2**20:>5.0f} MiB {(peak - base) / 2**20:>6.0f} MiB "
                        f"{shard / 2**20:>9.0f} MiB {tensor / 2**20:>10.0f} MiB "
                        f"{peak / shard:>10.2f} {(peak - base) / shard:>11.2f}"
                    )
                shutil.rmtree(mcore)
                shutil.rmtree(back)
            shutil.rmtree(hf)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    if sys.argv[1:2] == ["--measure-into"]:  # internal: one converter process of bench_convert
        _measure(sys.argv[2], sys.argv[3], sys.argv[4:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", nargs="+", choices=["TP2", "EP2"], default=["TP2", "EP2"])
    p.add_argument("--buckets-mib", type=int, nargs="+", default=[512, 64], help="export bucket sizes")
    p.add_argument("--vocab", type=int, default=32000, help="export model: vocabulary")
    p.add_argument("--hidden", type=int, default=2048, help="export model: hidden size (multiple of 512)")
    p.add_argument("--layers", type=int, default=3, help="export model: decoder layers")
    p.add_argument("--intermediate", type=int, default=8192, help="export model: dense MLP width")
    p.add_argument("--experts", type=int, default=8, help="export model (EP2): experts of width I/E")
    p.add_argument("--reps", type=int, default=3, help="timed exports / memcpys (median reported)")
    p.add_argument("--convert-gb", type=float, nargs="+", default=[1.5], help="HF model sizes")
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="converter process counts")
    p.add_argument("--max-shard", default="500MB", help="save_pretrained / converter max shard size")
    p.add_argument("--workdir", default=None, help="scratch dir for checkpoints (default: system tmp)")
    p.add_argument("--skip-export", action="store_true")
    p.add_argument("--skip-convert", action="store_true")
    args = p.parse_args()
    if not args.skip_export:
        bench_export(args)
    if not args.skip_convert:
        bench_convert(args)


if __name__ == "__main__":
    main()
