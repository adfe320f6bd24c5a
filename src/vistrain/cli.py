"""The ``vistrain`` command line; ``vistrain --help`` lists its subcommands.

Importing this module does not import torch (the subcommands do), so a Ctrl-C at any moment
of a start-up reaches ``main``'s handler instead of printing an import traceback.

Usage errors (an unknown config or ``--set`` key, a value of the wrong type, a missing
file) print one line and exit with status 2 before anything is written. So do the errors a
user fixes without reading code: an output or checkpoint folder that cannot be written, a
config whose ``build`` fails, a checkpoint that cannot continue the run; the line also goes
into the run's ``log.txt`` when there is one. Ctrl-C before training exits with 130 and one
line; output cut off by a closed pipe (``| head``) ends the command quietly with 141.

``fit`` stopped by SIGTERM, SIGINT or SIGUSR1 (``vistrain.engine.stop_signal``) writes a
checkpoint, prints one line (what happened, the checkpoint, the command that resumes) and
exits with 128 + the signal number; with ``--devices N`` the launcher passes the signal to
every rank and exits the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from vistrain import __version__
from vistrain.common.launch_env import adopt_slurm_env, launch_run_id
from vistrain.run_folder import (
    HELD_LOCK_ENV,
    RunFolderError,
    RunFolderLock,
    check_new_run_folder,
)
from vistrain.zoo import DEFAULT_EXPERIMENT, available_experiments, load_config

logger = logging.getLogger("vistrain")


class UsageError(Exception):
    """A mistake in the command line; reported in one line, exit status 2.

    Args:
        message: The line to print (after ``vistrain: error:``).
        log_dir: The run folder whose ``log.txt``, if it exists, also gets the line.
    """

    def __init__(self, message: str, log_dir: str | None = None) -> None:
        super().__init__(message)
        self.log_dir = log_dir


EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
"""128 + SIGINT, what a shell reports for a command stopped by Ctrl-C."""
EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE, what a shell reports for a command whose reader went away."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vistrain", description="Train and evaluate vision models with callbacks."
    )
    parser.add_argument("--version", action="version", version=f"vistrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            default=DEFAULT_EXPERIMENT,
            help=f"built-in experiment name or a .py file (default: {DEFAULT_EXPERIMENT})",
        )
        p.add_argument(
            "--output-dir",
            default=None,
            help="run folder (default: runs/<config>/<time>, for test <time>-test)",
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
    _add_predict_parsers(sub)
    return parser


def _add_predict_parsers(sub: Any) -> None:
    """The ``predict``, ``export`` and ``make-shapes`` subcommands."""

    def checkpoint_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ckpt", required=True, help="vistrain or official YOLOX checkpoint")
        p.add_argument(
            "--config",
            default=None,
            help="the experiment the checkpoint was trained with (class names, input size)",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="score_threshold, nms_threshold, max_detections, image_size, legacy, "
            "classes_from, or a key of --config",
        )

    predict = sub.add_parser("predict", help="detect objects in images with a checkpoint")
    checkpoint_args(predict)
    predict.add_argument("--input", required=True, help="an image file or a folder of images")
    predict.add_argument(
        "--output-dir", default=None, help="where predictions.json and pictures/ go"
    )
    export = sub.add_parser("export", help="write a checkpoint's detector without NMS")
    checkpoint_args(export)
    export.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    export.add_argument("--output", default=None, help="file to write (default: beside --ckpt)")
    shapes = sub.add_parser(
        "make-shapes", help="write generated shapes as a COCO folder (train/ and val/)"
    )
    shapes.add_argument("--out", required=True, help="new or empty folder to write")
    shapes.add_argument("--num-train", type=int, default=200)
    shapes.add_argument("--num-val", type=int, default=50)
    shapes.add_argument("--image-size", type=int, default=256)
    shapes.add_argument("--num-classes", type=int, default=3)
    shapes.add_argument("--seed", type=int, default=0)


def _config_name(config: str) -> str:
    return os.path.splitext(os.path.basename(config))[0]


def _prepare(args: argparse.Namespace) -> tuple[ModuleType, Any]:
    """Load the experiment and its parameters; raise UsageError on any mistake."""
    from vistrain.zoo.base import apply_overrides

    try:
        module = load_config(args.config)
        params = apply_overrides(module.Params(), args.overrides)
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None
    except Exception as err:  # a mistake in the code of a config file, found on import
        from vistrain.run import raised_at

        raise UsageError(
            f"config {args.config!r} could not be loaded: {type(err).__name__}: {err} (at "
            f"{raised_at(err)})"
        ) from None
    return module, params


def _os_error_line(err: OSError) -> str:
    """One line for a file-system error met while running: what failed, on which path."""
    if err.filename is not None and err.strerror:
        return f"cannot write or read {err.filename!r}: {err.strerror}"
    return str(err)


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


def _output_dir(args: argparse.Namespace, suffix: str = "") -> str:
    if args.output_dir is not None:
        return str(args.output_dir)
    run_id = launch_run_id()  # ranks started by srun or torchrun agree on it without talking
    if run_id is not None:
        return os.path.join("runs", _config_name(args.config), f"run-{run_id}{suffix}")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", _config_name(args.config), stamp + suffix)


def _launcher_env(nproc: int) -> None:
    """Choose the workers' OpenMP threads before torchrun does (it prints a banner).

    Each of ``nproc`` processes gets an equal share of this process's cores (at least
    one); a value the user set in ``OMP_NUM_THREADS`` is kept.
    """
    from vistrain.common.cpu import usable_cores

    if not os.environ.get("OMP_NUM_THREADS"):
        os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores() // nproc))


_LAUNCHER_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
"""Signals the launcher passes on to every rank (torch's default list, plus SIGUSR1)."""


def _worker_stop_code(err: Exception) -> int | None:
    """The exit status every failed rank shares when all of them stopped on a signal."""
    failures = getattr(err, "failures", {}).values()
    codes = {getattr(failure, "exitcode", None) for failure in failures}
    if len(codes) == 1:
        code = codes.pop()
        if isinstance(code, int) and 128 < code < 128 + 65:
            return code
    return None


def _launch_workers(args: argparse.Namespace, argv: Sequence[str], output_dir: str) -> int:
    """Start ``--devices`` processes through PyTorch's launcher (torch.distributed.run).

    A stop signal to this process reaches every rank (torch's launcher sends it on and waits
    for them); the ranks stop together, rank 0 prints the stop line, and this process exits
    with 128 + the signal number. The ranks die with this process, even when it is killed
    (``vistrain.common.parent_death``).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
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
        f"--signals-to-handle={_LAUNCHER_SIGNALS}",
        "--module",
        "vistrain",
        *rest,
        "--output-dir",
        output_dir,
    ]
    os.environ[HELD_LOCK_ENV] = "1"  # the workers run under this process's lock
    _launcher_env(args.devices)
    try:
        torchrun_main(launch_args)
    except SignalException as err:  # the ranks got the signal too and have stopped
        return 128 + int(err.sigval)
    except Exception as err:  # the launcher raises ChildFailedError with every rank's error
        code = _worker_stop_code(err)
        if code is not None:  # the ranks were signalled directly and stopped (rank 0 said so)
            return code
        print(f"vistrain: a worker process failed: {err}", file=sys.stderr)
        return 1
    return 0


def _resume_command(args: argparse.Namespace, output_dir: str) -> str:
    """The command line that continues a stopped run from its folder's ``last.ckpt``."""
    parts = ["vistrain", "fit", "--config", args.config]
    for item in args.overrides:
        parts += ["--set", item]
    if args.engine != "native":
        parts += ["--engine", args.engine]
    devices = max(args.devices, int(os.environ.get("WORLD_SIZE", "1")))
    if devices > 1:
        parts += ["--devices", str(devices)]
    parts += ["--output-dir", output_dir, "--resume"]
    return shlex.join(parts)


def _report_stop(stopped: Any, args: argparse.Namespace, output_dir: str) -> int:
    """Log the stop line on rank 0 (console and ``log.txt``); return the exit status."""
    request = stopped.request
    if int(os.environ.get("RANK", "0")) == 0:
        saved = (
            f"checkpoint {stopped.checkpoint_path}"
            if stopped.checkpoint_path is not None
            else "no checkpoint written"
        )
        logger.warning(
            "Stopped by %s at epoch %d, step %d; %s; resume with: %s",
            request.reason,
            stopped.epoch,
            stopped.global_step,
            saved,
            _resume_command(args, output_dir),
        )
    return int(request.exit_code)


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
    lock_held_by_launcher = bool(os.environ.get(HELD_LOCK_ENV))
    from vistrain.common.writable import NotWritableError, check_writable_folder

    try:
        if not lock_held_by_launcher and int(os.environ.get("RANK", "0")) == 0:
            check_writable_folder(
                output_dir, f"--output-dir {output_dir!r}", "pass another --output-dir"
            )
        if ckpt_path is None and not lock_held_by_launcher:
            check_new_run_folder(output_dir)
        take_lock = not lock_held_by_launcher and int(os.environ.get("RANK", "0")) == 0
        with RunFolderLock(output_dir) if take_lock else contextlib.nullcontext():
            if args.devices > 1 and not launched_by_torchrun:
                return _launch_workers(args, argv, output_dir)
            from vistrain.engine.checkpoint_io import CheckpointError
            from vistrain.engine.loop_state import NoTrainingStepsError
            from vistrain.engine.nonfinite_guard import NonFiniteError
            from vistrain.run import ExperimentBuildError, run_fit
            from vistrain.run_params import ResumeRefusedError

            try:
                stopped = run_fit(
                    module, params, output_dir, ckpt_path=ckpt_path, engine=args.engine
                )
            except (
                CheckpointError,
                ExperimentBuildError,
                NotWritableError,
                ResumeRefusedError,
                NoTrainingStepsError,
            ) as err:
                raise UsageError(str(err), log_dir=output_dir) from None
            except NonFiniteError as err:  # not a usage mistake: exit 1, still one line
                print(f"vistrain: error: {err}", file=sys.stderr)
                return 1
            except BrokenPipeError:
                raise
            except OSError as err:
                raise UsageError(_os_error_line(err), log_dir=output_dir) from None
            if stopped is not None:
                return _report_stop(stopped, args, output_dir)
    except (RunFolderError, NotWritableError) as err:
        raise UsageError(str(err)) from None
    return 0


def _test(args: argparse.Namespace) -> int:
    module, params = _prepare(args)
    if not os.path.isfile(args.ckpt):
        raise UsageError(f"--ckpt: checkpoint {args.ckpt!r} does not exist")
    from vistrain.common.writable import NotWritableError, check_writable_folder
    from vistrain.engine.checkpoint_io import CheckpointError
    from vistrain.run import ExperimentBuildError, run_test

    output_dir = _output_dir(args, suffix="-test")
    try:
        check_writable_folder(
            output_dir, f"--output-dir {output_dir!r}", "pass another --output-dir"
        )
        logs = run_test(module, params, output_dir, args.ckpt)
    except (CheckpointError, ExperimentBuildError, NotWritableError) as err:
        raise UsageError(str(err), log_dir=output_dir) from None
    for key, value in logs.items():
        print(f"test/{key}: {value:.4f}")
    print(f"Results in {os.path.abspath(output_dir)}")
    return 0


def _configs() -> int:
    from vistrain.zoo.base import param_types

    for name in available_experiments():
        module = load_config(name)
        default = " (default)" if name == DEFAULT_EXPERIMENT else ""
        print(f"{name}{default}: {getattr(module, 'DESCRIPTION', '')}")
        defaults = module.Params()
        for key, annotation in param_types(module.Params).items():
            type_name = getattr(annotation, "__name__", str(annotation))
            print(f"    {key} ({type_name}) = {getattr(defaults, key)!r}")
    return 0


def _load_detector(args: argparse.Namespace) -> tuple[Any, Any]:
    """The checkpoint's detector and the predict settings, from ``--ckpt/--config/--set``."""
    from vistrain.predict import PredictParams, load_detector
    from vistrain.zoo.base import apply_overrides, param_types

    own_keys = set(param_types(PredictParams))
    own = [item for item in args.overrides if item.split("=", 1)[0].strip() in own_keys]
    rest = [item for item in args.overrides if item not in own]
    info = None
    try:
        params = apply_overrides(PredictParams(), own)
        if args.config is not None:
            module = load_config(args.config)
            if not hasattr(module, "detector_info"):
                raise ValueError(
                    f"config {args.config!r} defines no detector_info(params); use "
                    "--set classes_from=ANNOTATIONS.json instead of --config"
                )
            info = module.detector_info(apply_overrides(module.Params(), rest))
        elif rest:
            apply_overrides(PredictParams(), rest)  # reports the unknown key
        return load_detector(args.ckpt, params, info), params
    except (ValueError, FileNotFoundError) as err:
        raise UsageError(str(err)) from None


def _predict(args: argparse.Namespace) -> int:
    from vistrain.common.log_setup import setup_logger
    from vistrain.predict import list_images, predict_images

    detector, params = _load_detector(args)
    try:
        paths = list_images(args.input)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    output_dir = args.output_dir or os.path.join(
        "runs", "predict", datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    )
    setup_logger()
    logger.info("Predicting with the %s.", detector.source)
    summary = predict_images(detector, paths, output_dir, params)
    print(
        f"{summary.num_detections} detections in {summary.num_images} images -> "
        f"{summary.predictions_file}"
    )
    for path, reason in summary.skipped:
        print(f"skipped {path}: {reason}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from vistrain.common.log_setup import setup_logger
    from vistrain.export import default_output, export_detector

    detector, _ = _load_detector(args)
    output = args.output or default_output(args.ckpt, args.format)
    if os.path.isdir(output):
        raise UsageError(f"--output {output!r} is a folder; name the file to write")
    setup_logger()
    try:
        export_detector(detector.model, args.format, output, int(detector.info.image_size))
    except ImportError as err:
        raise UsageError(
            f"--format onnx needs the onnx package ({err}): pip install 'vistrain[onnx]'"
        ) from None
    print(output)
    return 0


def _make_shapes(args: argparse.Namespace) -> int:
    from vistrain.data.datasets import write_shapes_coco

    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"--out {args.out!r} exists and is not an empty folder; choose a new one")
    try:
        splits = write_shapes_coco(
            args.out,
            num_train=args.num_train,
            num_val=args.num_val,
            image_size=args.image_size,
            seed=args.seed,
            num_classes=args.num_classes,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None
    for name, paths in splits.items():
        print(f"{name}: {paths.annotation_file} (images in {paths.image_root})")
    return 0


def _report_error(message: str, log_dir: str | None) -> None:
    """Print ``vistrain: error: message`` and append it to ``log_dir/log.txt`` if that exists."""
    line = f"vistrain: error: {message}"
    print(line, file=sys.stderr)
    log_file = os.path.join(log_dir, "log.txt") if log_dir is not None else None
    if log_file is not None and os.path.isfile(log_file):
        stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with contextlib.suppress(OSError), open(log_file, "a", encoding="utf-8") as handle:
            handle.write(f"[{stamp} ERROR] {line}\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vistrain`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args, argv)
    except UsageError as err:
        _report_error(str(err), err.log_dir)
        return EXIT_USAGE
    except BrokenPipeError:
        from vistrain.common.log_setup import silence_stdout

        silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("vistrain: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED


def _dispatch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run the chosen subcommand; UsageError for the user's mistakes."""
    try:
        adopt_slurm_env()
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.command == "fit":
        return _fit(args, argv)
    if args.command == "test":
        return _test(args)
    if args.command == "predict":
        return _predict(args)
    if args.command == "export":
        return _export(args)
    if args.command == "make-shapes":
        return _make_shapes(args)
    return _configs()


__all__ = ["UsageError", "main"]
