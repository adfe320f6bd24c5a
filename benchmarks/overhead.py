"""Per-step overhead of the vistrain Trainer against a hand-written loop (and Lightning).

A tiny MLP (64-64-10, batch 32, SGD) trains for 2000 steps on one thread, so the step
itself is short and the engine's bookkeeping shows. ``vistrain core only`` is the same run
without the two callbacks (the Trainer, its connectors, LossModule and scalar logs alone).
Each engine runs 5 times, alternated with the hand-written loop; the time of steps
200..2000 is measured from inside the loop (start-up excluded), and the median per-step
overhead against the loop of the same round is printed. The engines' own output (vistrain's
log lines, Lightning's bar) goes to a log file, as in a batch job, so only the summary
reaches the terminal.

    python benchmarks/overhead.py [--steps 2000] [--rounds 5] [--log FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from vistrain.engine.callbacks import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.callbacks.logging import LoggingCallback
from vistrain.engine.connectors import DataConnector, LossConnector, data_key, pred_key
from vistrain.engine.loss_module import LossModule
from vistrain.engine.trainer import Trainer

BATCHES_PER_EPOCH = 100
WARMUP = 200


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [
        {"x": torch.randn(32, 64, generator=gen), "y": torch.randint(0, 10, (32,), generator=gen)}
        for _ in range(BATCHES_PER_EPOCH)
    ]


def loader(batches: list[dict[str, torch.Tensor]]) -> DataLoader[Any]:
    return DataLoader(batches, batch_size=None, shuffle=False)  # type: ignore[arg-type]


class StepClock:
    """Records perf_counter at the start of step WARMUP and at the end of the last step."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.start = 0.0
        self.end = 0.0

    def tick(self, step_done: int) -> None:
        if step_done == WARMUP:
            self.start = time.perf_counter()
        elif step_done == self.steps:
            self.end = time.perf_counter()

    def per_step_us(self) -> float:
        return (self.end - self.start) / (self.steps - WARMUP) * 1e6


def hand_loop(steps: int) -> float:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = loader(make_batches())
    clock = StepClock(steps)
    done = 0
    while done < steps:
        for batch in data:
            out = model(batch["x"])
            loss = nn.functional.cross_entropy(out, batch["y"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
            clock.tick(done)
            if done == steps:
                break
    return clock.per_step_us()


class _ClockCallback(Callback):
    def __init__(self, clock: StepClock) -> None:
        super().__init__()
        self.clock = clock

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.clock.tick(trainer_state["global_step"])


def vistrain_loop(steps: int, with_callbacks: bool = True) -> float:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    clock = StepClock(steps)
    loss = LossModule(
        {
            "loss": nn.functional.cross_entropy,  # the hand-written loop calls it too
            "connector": LossConnector({"input": pred_key(""), "target": data_key("y")}),
        }
    )
    with tempfile.TemporaryDirectory() as out:
        callbacks: list[Callback] = [_ClockCallback(clock)]
        if with_callbacks:
            callbacks[:0] = [
                LoggingCallback(refresh_rate=50),
                CheckpointCallback(save_prefix=out, checkpoint_period=10_000),
            ]
        trainer = Trainer(
            "cpu",
            out,
            loader(make_batches()),
            None,
            DataConnector({"x": "x"}),
            None,
            callbacks,
            num_epochs=-1,
            num_steps=steps,
            log_every_n_steps=50,
        )
        trainer.fit(model, [opt], None, loss)
    return clock.per_step_us()


def lightning_loop(steps: int, defaults: bool) -> float:
    import lightning.pytorch as pl

    clock = StepClock(steps)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = MLP()

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            loss = nn.functional.cross_entropy(self.model(batch["x"]), batch["y"])
            if defaults:
                self.log("loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            clock.tick(trainer.global_step)

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        kwargs: dict[str, Any] = {"max_steps": steps, "accelerator": "cpu", "devices": 1}
        if defaults:
            kwargs.update(default_root_dir=out)
        else:
            kwargs.update(
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
            )
        trainer = pl.Trainer(callbacks=[Clock()], **kwargs)
        trainer.fit(Module(), train_dataloaders=loader(make_batches()))
    return clock.per_step_us()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--log",
        default=os.path.join(tempfile.gettempdir(), "vistrain_overhead.log"),
        help="file that receives the engines' output",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    import logging

    logging.getLogger("vistrain").setLevel(logging.WARNING)
    engines: dict[str, Callable[[int], float]] = {
        "vistrain": vistrain_loop,
        "vistrain core only": lambda s: vistrain_loop(s, with_callbacks=False),
    }
    try:
        import lightning  # noqa: F401

        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        engines["lightning (all off)"] = lambda s: lightning_loop(s, defaults=False)
        engines["lightning (defaults)"] = lambda s: lightning_loop(s, defaults=True)
    except ImportError:
        print("lightning not installed: comparing with the hand-written loop only")
    overheads: dict[str, list[float]] = {name: [] for name in engines}
    bases: list[float] = []
    with (
        open(args.log, "w", encoding="utf-8") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        for _ in range(args.rounds):
            for name, run in engines.items():
                base = hand_loop(args.steps)
                bases.append(base)
                overheads[name].append(run(args.steps) - base)
    print(f"engine output: {args.log}")
    base_med = statistics.median(bases)
    print(f"hand-written loop: {base_med:.1f} us/step (median of {len(bases)})")
    for name, values in overheads.items():
        med = statistics.median(values)
        print(
            f"{name:>22}: +{med:7.1f} us/step overhead, "
            f"ratio {(base_med + med) / base_med:.3f}x the hand-written loop"
        )


if __name__ == "__main__":
    main()
