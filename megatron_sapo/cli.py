"""`megatron-sapo` command line. Thin: each subcommand calls into the library.

megatron-sapo --help
megatron-sapo env          # versions of the stack and which compute path (CPU compat / CUDA) applies
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import platform
import sys

STACK = ("torch", "megatron-core", "transformers", "sglang", "transformer-engine")


def _env(_: argparse.Namespace) -> int:
    import torch

    print(f"megatron_sapo {md.version('megatron_sapo')}  python {platform.python_version()}")
    for pkg in STACK:
        try:
            print(f"  {pkg:<20} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"  {pkg:<20} not installed")
    if torch.cuda.is_available():
        print(f"  device               cuda ({torch.cuda.device_count()} x {torch.cuda.get_device_name(0)})")
    else:
        print("  device               cpu (megatron_sapo.megatron.cpu compatibility layer, gloo)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sapo",
        description="SAPO (Soft Adaptive Policy Optimization) RL post-training on Megatron-Core + SGLang.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    env = sub.add_parser("env", help="print the installed stack and the compute path that applies")
    env.set_defaults(func=_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
