"""`megatron-sapo` command line. Thin: each subcommand calls into the library.

megatron-sapo --help
megatron-sapo env          # versions of the stack and which compute path (CPU compat / CUDA) applies
megatron-sapo train CONFIG.yaml [dotted.key=value ...]   # an RL run; `train --help` lists every key
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import logging
import os
import platform
import sys
import warnings
from pathlib import Path

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


def _job_config_class() -> type:
    """The run config's root class. Importing it loads megatron-core, which warns that TE/Apex are missing
    (expected on CPU), and torch logs a missing CUDA runtime: keep stderr for the one-line config error."""
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron_sapo.train.config import TrainJobConfig
    torch_log.setLevel(level)
    return TrainJobConfig


class _TrainHelp(argparse.Action):
    """`train --help`: the usage plus every config key (the sections are imported only when asked)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace, values, option_string=None) -> None:
        from megatron_sapo.utils.typed_config import describe_config

        parser.epilog = (
            "config keys (YAML: one mapping per section; override any as dotted.key=value):\n\n"
            + describe_config(_job_config_class())
        )
        parser.print_help()
        parser.exit()


def _train(args: argparse.Namespace) -> int:
    from megatron_sapo.utils.typed_config import ConfigError, from_dict, read_config_data, save_config

    try:
        data = read_config_data(args.config, args.overrides)  # fails fast, before the heavy imports
        cfg = from_dict(_job_config_class(), data)
    except ConfigError as e:
        print(f"megatron-sapo train: error: {e}", file=sys.stderr)
        return 2
    # under torchrun / srun every process parses it; one writes it
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        from megatron_sapo.train.run_lock import RunDirInUse, claim

        try:
            claim(cfg.run.output_dir)  # before writing: a run holding it keeps its config.yaml
            save_config(cfg, Path(cfg.run.output_dir) / "config.yaml")
        except RunDirInUse:
            pass  # remembered: the trainer refuses on every rank at once (megatron_sapo/train/run_lock.py)
        except OSError as e:
            print(f"megatron-sapo train: error: run.output_dir: {e}", file=sys.stderr)
            return 2
    from megatron_sapo.data import DataError
    from megatron_sapo.megatron.parallel import LayoutError
    from megatron_sapo.rollout import RolloutError

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megatron_sapo").setLevel(logging.INFO if not cfg.run.progress else logging.WARNING)
    trainer = importlib.import_module("megatron_sapo.train.loop")  # via sys.modules: tests may stub it
    try:
        return trainer.run(cfg) or 0
    except LayoutError as e:  # processes / nodes / GPUs / model / dtype that do not fit: names the setting
        print(f"megatron-sapo train: error: {e}", file=sys.stderr)
        return 2
    except DataError as e:  # a bad dataset row: the message names the file and row
        print(f"megatron-sapo train: error: {e}", file=sys.stderr)
        return 2
    except RolloutError as e:  # the engine failed or a weight sync did not take: the message says why
        print(f"megatron-sapo train: rollout error: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-sapo",
        description="SAPO (Soft Adaptive Policy Optimization) RL post-training on Megatron-Core + SGLang.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    env = sub.add_parser("env", help="print the installed stack and the compute path that applies")
    env.set_defaults(func=_env)
    train = sub.add_parser(
        "train",
        help="run SAPO RL post-training from a YAML config (+ dotted.key=value overrides)",
        description="Load CONFIG.yaml, apply the overrides, validate, save the resolved config as\n"
        "<run.output_dir>/config.yaml, and train. A bad key, type or value is one error line (exit 2).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    train.add_argument(
        "-h",
        "--help",
        action=_TrainHelp,
        nargs=0,
        default=argparse.SUPPRESS,
        help="show this help and every key",
    )
    train.add_argument("config", metavar="CONFIG.yaml", help="run config (e.g. configs/quickstart.yaml)")
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override a key, e.g. rollout.sampling.temperature=0.7",
    )
    train.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
