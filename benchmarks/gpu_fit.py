"""Images per second and peak GPU memory of the default experiment at one precision.

Trains ``yolox_shapes`` (YOLOX-nano on the generated shapes) with the native Trainer for
``--steps`` optimizer steps and times the steps after ``--warmup`` (cuDNN autotuning,
compilation and the loader's start are excluded). One JSON line is printed, e.g.::

    {"precision": "bf16-mixed", "steps": 200, "images_per_s": 812.3, "peak_mem_mib": 1234.5}

The training set is sized so the timed steps stay inside the first epoch (no epoch-end
checkpoint or validation in the window). Used by ``benchmarks/gpu_check.sh``; usage::

    .venv/bin/python benchmarks/gpu_fit.py --precision bf16-mixed [--steps 300] [--warmup 50]
        [--workers 6] [--set KEY=VALUE ...] [--output-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import torch

from vistrain.engine.callbacks import Callback
from vistrain.engine.trainer import Trainer
from vistrain.zoo import yolox_shapes
from vistrain.zoo.base import apply_overrides


class StepClock(Callback):
    """Synchronises the GPU and reads the clock at two optimizer steps."""

    def __init__(self, start_step: int) -> None:
        super().__init__()
        self.start_step = start_step
        self.started: float | None = None
        self.last: float | None = None
        self.last_step = 0

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        step = trainer_state["global_step"]
        if step == self.start_step:
            torch.cuda.synchronize()
            self.started = time.perf_counter()
            torch.cuda.reset_peak_memory_stats()
        elif step > self.start_step:
            torch.cuda.synchronize()
            self.last, self.last_step = time.perf_counter(), step
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="32")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_fit.py: error: no CUDA GPU (torch.cuda.is_available() is False)")
    if not 0 < args.warmup < args.steps:
        raise SystemExit(f"gpu_fit.py: error: need 0 < --warmup ({args.warmup}) < --steps")

    defaults = yolox_shapes.Params()
    params = apply_overrides(
        defaults,
        [
            f"precision={args.precision}",
            f"num_workers={args.workers}",
            f"num_train_images={(args.steps + 1) * defaults.batch_size}",
            *args.overrides,
        ],
    )
    out = args.output_dir or tempfile.mkdtemp(prefix="vistrain-gpu-fit-")
    torch.manual_seed(params.seed)
    experiment = yolox_shapes.build(params, out)
    clock = StepClock(args.warmup)
    trainer_kwargs: dict[str, Any] = {**experiment.trainer_kwargs, "num_steps": args.steps}
    trainer = Trainer(
        device="cuda",
        output_dir=out,
        train_dataloader=experiment.train_dataloader,
        test_dataloader=experiment.test_dataloader,
        train_data_connector=experiment.train_data_connector,
        test_data_connector=experiment.test_data_connector,
        callbacks=[*experiment.callbacks, clock],
        **trainer_kwargs,
    )
    trainer.fit(
        experiment.model, experiment.optimizers, experiment.lr_schedulers, experiment.loss_module
    )
    if clock.started is None or clock.last is None:
        raise SystemExit("gpu_fit.py: error: the run ended before the timed steps")
    timed_steps = clock.last_step - args.warmup
    images = timed_steps * params.batch_size
    print(
        json.dumps(
            {
                "precision": args.precision,
                "steps": timed_steps,
                "batch_size": params.batch_size,
                "images_per_s": round(images / (clock.last - clock.started), 1),
                "peak_mem_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
                "gpu": torch.cuda.get_device_name(),
            }
        )
    )


if __name__ == "__main__":
    main()
