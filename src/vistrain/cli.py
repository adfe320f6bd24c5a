"""The ``vistrain`` command line: ``fit``, ``test`` and ``configs``.

Usage errors (an unknown config or ``--set`` key, a value of the wrong type, a missing
file) print one line and exit with status 2 before anything is written.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from vistrain.zoo import DEFAULT_EXPERIMENT, available_experiments, load_config
from vistrain.zoo.base import apply_overrides, param_types

logger = logging.getLogger("vistrain")


class UsageError(Exception):
    """A mistake in the command line; reported in one line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vistrain", description="Train and evaluate vision models with callbacks."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            default=DEFAULT_EXPERIMENT,
            help=f"built-in experiment name or a .py file (default: {DEFAULT_EXPERIMENT})",
        )
        p.add_argument(
            "--output-dir", default=None, help="run folder (default: runs/<config>/<time>)"
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override an experiment parameter (repeatable); see `vistrain configs`",
        )

    fit = sub.add_parser("fit", help="train a model")
    common(fit)
    fit.add_argument(
        "--resume",
        nargs="?",
        const="last",
        default=None,
        metavar="CKPT",
        help="resume from CKPT (default: the run folder's checkpoints/last.ckpt)",
    )
    fit.add_argument("--devices", type=int, default=1, help="processes to start on this machine")
    fit.add_argument("--engine", choices=["native", "lightning"], default="native")
    test = sub.add_parser("test", help="evaluate a checkpoint")
    common(test)
    test.add_argument("--ckpt", required=True, help="checkpoint file to evaluate")
    sub.add_parser("configs", help="list the built-in experiments and their parameters")
    return parser


def _config_name(config: str) -> str:
    return os.path.splitext(os.path.basename(config))[0]


def _prepare(args: argparse.Namespace) -> tuple[ModuleType, Any]:
    """Load the experiment and its parameters; raise UsageError on any mistake."""
    try:
        module = load_config(args.config)
        params = apply_overrides(module.Params(), args.overrides)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    return module, params


def _find_last_checkpoint(args: argparse.Namespace) -> tuple[str, str]:
    """Resolve ``--resume`` without a path: (checkpoint, run folder)."""
    if args.output_dir is not None:
        ckpt = os.path.join(args.output_dir, "checkpoints", "last.ckpt")
        if not os.path.isfile(ckpt):
            raise UsageError(f"--resume: no checkpoint at {ckpt}")
        return ckpt, args.output_dir
    pattern = os.path.join("runs", _config_name(args.config), "*", "checkpoints", "last.ckpt")
    found = sorted(glob.glob(pattern), key=os.path.getmtime)
    if not found:
        raise UsageError(f"--resume: no run with a checkpoint matches {pattern}; pass CKPT")
    return found[-1], os.path.dirname(os.path.dirname(found[-1]))


def _output_dir(args: argparse.Namespace) -> str:
    if args.output_dir is not None:
        return str(args.output_dir)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", _config_name(args.config), stamp)


def _launch_workers(args: argparse.Namespace, argv: Sequence[str], output_dir: str) -> int:
    """Start ``--devices`` processes through PyTorch's launcher (torch.distributed.run)."""
    from torch.distributed.run import main as torchrun_main

    rest: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--devices":
            skip = True
            continue
        if item.startswith("--devices=") or item.startswith("--output-dir"):
            if item == "--output-dir":
                skip = True
            continue
        rest.append(item)
    launch_args = [
        "--standalone",
        f"--nproc-per-node={args.devices}",
        "--module",
        "vistrain",
        *rest,
        "--output-dir",
        output_dir,
    ]
    try:
        torchrun_main(launch_args)
    except Exception as err:  # the launcher raises ChildFailedError with every rank's error
        print(f"vistrain: a worker process failed: {err}", file=sys.stderr)
        return 1
    return 0


def _fit(args: argparse.Namespace, argv: Sequence[str]) -> int:
    module, params = _prepare(args)
    if args.devices < 1:
        raise UsageError(f"--devices={args.devices} must be >= 1")
    ckpt_path: str | None = None
    output_dir = _output_dir(args)
    if args.resume == "last":
        ckpt_path, output_dir = _find_last_checkpoint(args)
    elif args.resume is not None:
        if not os.path.isfile(args.resume):
            raise UsageError(f"--resume: checkpoint {args.resume!r} does not exist")
        ckpt_path = args.resume
    if args.engine == "lightning":
        try:
            import lightning  # noqa: F401
        except ImportError:
            raise UsageError(
                "--engine lightning needs Lightning: pip install 'vistrain[pl]'"
            ) from None
    launched_by_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.devices > 1 and not launched_by_torchrun:
        return _launch_workers(args, argv, output_dir)
    from vistrain.engine.checkpoint_io import CheckpointError
    from vistrain.runner import run_fit

    try:
        run_fit(module, params, output_dir, ckpt_path=ckpt_path, engine=args.engine)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    return 0


def _test(args: argparse.Namespace) -> int:
    module, params = _prepare(args)
    if not os.path.isfile(args.ckpt):
        raise UsageError(f"--ckpt: checkpoint {args.ckpt!r} does not exist")
    from vistrain.engine.checkpoint_io import CheckpointError
    from vistrain.runner import run_test

    try:
        logs = run_test(module, params, _output_dir(args), args.ckpt)
    except CheckpointError as err:
        raise UsageError(str(err)) from None
    for key, value in logs.items():
        print(f"test/{key}: {value:.4f}")
    return 0


def _configs() -> int:
    for name in available_experiments():
        module = load_config(name)
        default = " (default)" if name == DEFAULT_EXPERIMENT else ""
        print(f"{name}{default}: {getattr(module, 'DESCRIPTION', '')}")
        defaults = module.Params()
        for key, annotation in param_types(module.Params).items():
            type_name = getattr(annotation, "__name__", str(annotation))
            print(f"    {key} ({type_name}) = {getattr(defaults, key)!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vistrain`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        if args.command == "fit":
            return _fit(args, argv)
        if args.command == "test":
            return _test(args)
        return _configs()
    except UsageError as err:
        print(f"vistrain: error: {err}", file=sys.stderr)
        return 2


__all__ = ["UsageError", "main"]
