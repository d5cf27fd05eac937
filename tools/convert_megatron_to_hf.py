"""Convert a Megatron checkpoint written by tools/convert_hf_to_megatron.py back to a Hugging Face dir.

    python tools/convert_megatron_to_hf.py --megatron-dir M --output-dir H2            # one rank
    torchrun --nproc-per-node 4 --master-port 29512 tools/convert_megatron_to_hf.py \
        --megatron-dir M --output-dir H2 --tp 2 --pp 2 --max-shard-size 2GB

The checkpoint is loaded at the given layout (any: torch_dist reshards from the saved one), full tensors
stream to rank 0, which writes size-bounded safetensors shards + model.safetensors.index.json in the
source dtype, with config.json, tokenizer and generation config: transformers' from_pretrained and
SGLang load the result. User errors print one line and exit 2. Library: megatron_sapo.convert.
Tests: `python -m pytest tests/e2e/test_converters.py -q`
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_sapo.convert import (
    Layout,
    check_layout,
    default_layout,
    load_hf_config,
    megatron_to_hf,
    parallel_session,
    read_metadata,
    world_size,
)
from megatron_sapo.convert.cli import parse_size, run_cli, say


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Without --tp/--pp/--ep the N ranks are used as EP=N (MoE), else TP=N, else PP=N, else "
        "data parallel, whichever divides the model first. N must be a multiple of tp*pp*ep.",
    )
    parser.add_argument("--megatron-dir", required=True, help="output dir of convert_hf_to_megatron.py")
    parser.add_argument(
        "--output-dir", required=True, help="Hugging Face dir to write (no *.safetensors in it)"
    )
    parser.add_argument("--tp", type=int, help="tensor parallel size to load at (default: see below)")
    parser.add_argument("--pp", type=int, help="pipeline parallel size to load at")
    parser.add_argument("--ep", type=int, help="expert parallel size to load at")
    parser.add_argument("--vpp", type=int, help="virtual pipeline stages per pipeline rank (needs --pp > 1)")
    parser.add_argument(
        "--max-shard-size", default="2GB", help="bound on one safetensors shard, e.g. 2GB, 500MiB [2GB]"
    )
    parser.add_argument(
        "--bucket-size", default="512MiB", help="bound on one transfer to rank 0 (memory per rank) [512MiB]"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    max_shard, bucket = parse_size(args.max_shard_size), parse_size(args.bucket_size)
    read_metadata(args.megatron_dir)  # a converter output, before anything distributed starts
    hf_config = load_hf_config(args.megatron_dir)
    world = world_size()
    given = {k: getattr(args, k) for k in ("tp", "pp", "ep", "vpp") if getattr(args, k) is not None}
    layout = Layout(**given) if given else default_layout(hf_config, world=world)
    check_layout(hf_config, layout, world=world)
    start = time.monotonic()
    with parallel_session(layout):
        megatron_to_hf(
            args.megatron_dir,
            args.output_dir,
            max_shard_bytes=max_shard,
            bucket_bytes=bucket,
            progress=not args.no_progress,
        )
    say(f"wrote {args.output_dir} (loaded at {layout}) in {time.monotonic() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(run_cli(main))
