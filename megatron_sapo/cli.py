"""`megatron-sapo` command line. Thin: each subcommand calls into the library.

megatron-sapo --help
megatron-sapo env          # versions of the stack and which compute path (CPU compat / CUDA) applies
megatron-sapo train CONFIG.yaml [dotted.key=value ...]   # an RL run; `train --help` lists every key
megatron-sapo train --debug CONFIG.yaml ...               # an error shows its traceback above its one line
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import logging
import os
import platform
import sys
import traceback
import warnings
from pathlib import Path
from types import ModuleType

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


def _import_quietly(module: str) -> ModuleType:
    """Import a module that loads megatron-core, which warns that TE/Apex are missing (expected on CPU),
    while torch logs a missing CUDA runtime: keep stderr for the one-line error."""
    torch_log = logging.getLogger("torch.utils.cpp_extension")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = importlib.import_module(module)
    torch_log.setLevel(level)
    # catch_warnings restored the filter list, dropping the known-noise filters installed during the import
    from megatron_sapo.megatron import quiet_known_warnings

    quiet_known_warnings()
    return loaded


def _job_config_class() -> type:
    """The run config's root class (imports megatron-core: see `_import_quietly`)."""
    return _import_quietly("megatron_sapo.train.config").TrainJobConfig


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


DEBUG_ENV = "MEGATRON_SAPO_DEBUG"
"""Set to 1 (or pass `train --debug`) to see the traceback above a failure's one line."""

FAILURES: tuple[tuple[str, str, int, str], ...] = (
    # (module, class, exit code, label), most specific first. A user-caused failure exits 2: fix the command
    # line, config or files and rerun; nothing was written. A run that broke while running exits 1.
    # a config key/type/value, model.path, reward.name, run.output_dir
    ("megatron_sapo.utils.typed_config", "ConfigError", 2, "error"),
    # processes / nodes / GPUs / model / dtype that do not fit: names the setting
    ("megatron_sapo.megatron.parallel", "LayoutError", 2, "error"),
    # no space left writing a weight snapshot (checkpoints and the final export raise CheckpointError, a
    # LayoutError): names the path and the bytes
    ("megatron_sapo.utils.disk", "DiskFullError", 2, "error"),
    # a malformed dataset row: names the file and row
    ("megatron_sapo.data.datasets", "DataError", 2, "error"),
    # NaN / inf next-token probabilities (e.g. an absurd optim.lr): the run's inputs were valid, training
    # blew up; no checkpoint is written after it
    ("megatron_sapo.rollout.types", "PolicyDiverged", 1, "error"),
    # the engine failed or a weight sync did not take
    ("megatron_sapo.rollout.types", "RolloutError", 1, "rollout error"),
)
"""What `megatron-sapo train` prints as one line (`megatron-sapo train: <label>: <message>`) and exits with.
Looked up in sys.modules: an exception of a class whose module was never imported cannot have been raised,
so a config error is reported before the heavy imports. Anything else is a bug: a traceback, exit 1."""


def _failure(exc: Exception) -> tuple[int, str] | None:
    for module, name, code, label in FAILURES:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(exc, cls):
            return code, label
    return None


def _train(args: argparse.Namespace) -> int:
    try:
        return _run_train(args)
    except Exception as exc:
        failure = _failure(exc)
        if failure is None:
            raise
        if args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        code, label = failure
        print(f"megatron-sapo train: {label}: {exc}", file=sys.stderr)
        return code


def _run_train(args: argparse.Namespace) -> int:
    from megatron_sapo.utils.typed_config import ConfigError, from_dict, read_config_data, save_config

    data = read_config_data(args.config, args.overrides)  # fails fast, before the heavy imports
    cfg = from_dict(_job_config_class(), data)
    validate = _import_quietly("megatron_sapo.train.validate")
    # model.path and reward.name: nothing is written before they are known to be usable
    validate.check_inputs(cfg)
    # under torchrun / srun every process parses it; one writes it
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        from megatron_sapo.train.run_lock import RunDirInUse, claim

        try:
            claim(cfg.run.output_dir)  # before writing: a run holding it keeps its config.yaml
            save_config(cfg, Path(cfg.run.output_dir) / "config.yaml")
        except RunDirInUse:
            pass  # remembered: the trainer refuses on every rank at once (megatron_sapo/train/run_lock.py)
        except OSError as e:
            raise ConfigError(str(e), key="run.output_dir") from e
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("megatron_sapo").setLevel(logging.INFO if not cfg.run.progress else logging.WARNING)
    trainer = importlib.import_module("megatron_sapo.train.loop")  # via sys.modules: tests may stub it
    return trainer.run(cfg) or 0


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
        description="Load CONFIG.yaml, apply the overrides, validate (keys, types, values; model.path is a\n"
        "Hugging Face directory of a supported model_type; reward.name imports a function), save the\n"
        "resolved config as <run.output_dir>/config.yaml, and train. What the user can fix is one error\n"
        "line naming the key or file, exit 2: a bad key/type/value, model.path or reward.name (all before\n"
        "anything is written), a layout that does not fit, a malformed dataset row. A policy that diverges\n"
        "(NaN/inf probabilities) stops with 'policy diverged at step N: ...', exit 1, before that step's\n"
        "row and checkpoint. --debug (or MEGATRON_SAPO_DEBUG=1) adds the traceback.",
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
    train.add_argument(
        "--debug", action="store_true", help=f"show the traceback of an error too (or set {DEBUG_ENV}=1)"
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
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # `train CONFIG.yaml a=1 --debug b=2`: argparse ends the overrides at the option and leaves b=2 over
    if rest and args.command == "train" and not any(r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
