"""Convert a Hugging Face checkpoint into a Megatron distributed checkpoint at a TP / PP / EP layout.

    torchrun --nproc-per-node 2 --master-port 29511 tools/convert_hf_to_megatron.py \
        --hf-dir /ckpt/Qwen3-0.6B --output-dir /ckpt/Qwen3-0.6B-mcore --tp 2
    python tools/convert_hf_to_megatron.py --hf-dir H --output-dir M          # one rank, no torchrun

Every rank reads only its slices of the safetensors, one parameter at a time while the checkpoint is
written (the model is never materialised). The output holds the torch_dist checkpoint, the HF
config / tokenizer / generation config (a VLM's processor and chat template too) and megatron_sapo.json,
so tools/convert_megatron_to_hf.py can go back. Vision-language models (qwen3_vl, qwen3_vl_moe) take the
same flags; their deepstack layers must sit on the first pipeline stage. User errors print one line and
exit 2. Library: megatron_sapo.convert.
Tests: `python -m pytest tests/e2e/test_converters.py tests/e2e/test_vlm_converters.py -q`
"""

from __future__ import annotations

import argparse
import sys
import time

from megatron_sapo.convert import (
    ParallelConfig,
    check_layout,
    hf_to_megatron,
    load_hf_config,
    parallel_session,
    world_size,
)
from megatron_sapo.convert.cli import run_cli, say


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="The number of ranks (torchrun --nproc-per-node, 1 without torchrun) must be a multiple of "
        "tp*pp*ep; ranks beyond tp*pp hold data-parallel copies, over which experts are spread (EP).",
    )
    parser.add_argument("--hf-dir", required=True, help="Hugging Face model dir: config.json + *.safetensors")
    parser.add_argument("--output-dir", required=True, help="where to write the Megatron checkpoint")
    parser.add_argument("--tp", type=int, default=1, help="tensor parallel size (divides heads) [1]")
    parser.add_argument("--pp", type=int, default=1, help="pipeline parallel size (divides layers) [1]")
    parser.add_argument("--ep", type=int, default=1, help="expert parallel size (divides num_experts) [1]")
    parser.add_argument(
        "--vpp", type=int, default=None, help="virtual pipeline stages per pipeline rank (needs --pp > 1)"
    )
    parser.add_argument(
        "--spec",
        choices=("auto", "local", "te"),
        default="auto",
        help="megatron layer spec: te = Transformer Engine (GPU), local = megatron-core modules (CPU), "
        "auto = te when TE and CUDA are available [auto]",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    layout = ParallelConfig(tp=args.tp, pp=args.pp, ep=args.ep, vpp=args.vpp)
    hf_config = load_hf_config(args.hf_dir)
    check_layout(hf_config, layout, world=world_size())
    start = time.monotonic()
    with parallel_session(layout):
        hf_to_megatron(args.hf_dir, args.output_dir, spec=args.spec)
    say(f"wrote {args.output_dir} ({hf_config.model_type}, {layout}) in {time.monotonic() - start:.1f}s")


if __name__ == "__main__":
    sys.exit(run_cli(main))
