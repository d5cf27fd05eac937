"""Convert a Megatron checkpoint written by tools/convert_hf_to_megatron.py back to a Hugging Face dir.

    python tools/convert_megatron_to_hf.py --megatron-dir M --output-dir H2            # one process
    torchrun --nproc-per-node 4 --master-port 29512 tools/convert_megatron_to_hf.py \
        --megatron-dir M --output-dir H2 --max-shard-size 2GB

No model is built and no parallel layout is needed: the torch_dist checkpoint (saved at any layout) is
read tensor by tensor, each full tensor is turned into HF tensors by the bridge's mapping table and
written straight into its safetensors shard; with N processes the shards are split among them. Memory
per process: about one (largest) tensor, independent of the model and shard sizes. Output: size-bounded
shards + model.safetensors.index.json in the source dtype, config.json, tokenizer and generation config,
a VLM's processor and chat template (transformers' from_pretrained and SGLang load it); Qwen3-VL-MoE
experts fused per layer as in the official checkpoints. User errors print one line and exit 2.
Library: megatron_sapo.convert.
Tests: `python -m pytest tests/e2e/test_converters.py tests/e2e/test_vlm_converters.py -q`
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_sapo.convert import megatron_to_hf, process_group, read_metadata
from megatron_sapo.convert.cli import parse_size, run_cli, say


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Any number of processes works (torchrun --nproc-per-node N, or plain python): each writes "
        "every N-th shard.",
    )
    parser.add_argument("--megatron-dir", required=True, help="output dir of convert_hf_to_megatron.py")
    parser.add_argument(
        "--output-dir", required=True, help="Hugging Face dir to write (no *.safetensors in it)"
    )
    parser.add_argument(
        "--max-shard-size", default="2GB", help="bound on one safetensors shard, e.g. 2GB, 500MiB [2GB]"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    max_shard = parse_size(args.max_shard_size)
    read_metadata(args.megatron_dir)  # a converter output, before anything distributed starts
    start = time.monotonic()
    with process_group():
        megatron_to_hf(
            args.megatron_dir, args.output_dir, max_shard_bytes=max_shard, progress=not args.no_progress
        )
    say(f"wrote {args.output_dir} in {time.monotonic() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(run_cli(main))
