"""Per-step overhead of the vistrain Trainer against a hand-written loop (and Lightning).

A tiny MLP (64-64-10, batch 32, SGD) trains for 2000 steps on one thread, so the step
itself is short and the engine's bookkeeping shows. ``vistrain core only`` is the same run
without the two callbacks (the Trainer, its connectors, LossModule and scalar logs alone).
Each engine runs 5 times, alternated with the hand-written loop; the time of steps
200..2000 is measured from inside the loop (start-up excluded), and the median per-step
overhead against the loop of the same round is printed. The engines' own output (vistrain's
log lines, Lightning's bar) goes to a log file, as in a batch job, so only the summary
reaches the terminal.

``--paired`` is for a machine that other jobs share, where the load changes between two
runs: each engine step is followed by one step of its hand-written loop (same code, a
generator), timed apart, so both see the same load at the same moments; the engine's time
includes the hook call that runs the hand step. Lightning rows are left out then.

Step options get their own rows (the core, without the two callbacks), each against a
hand-written loop doing the same: ``bf16-mixed`` (autocast on the CPU) and
``accumulate_grad_batches=4`` (steps counted as optimizer steps, four batches each).
``--baseline-src DIR`` also measures the vistrain rows (default and step options) with
another checkout's sources (e.g. ``/work/main/src``) in a subprocess of each round, so a
change of the step path is compared in the same run; option rows that the other sources do
not know are left out.

    python benchmarks/overhead.py [--steps 2000] [--rounds 5] [--log FILE]
                                  [--baseline-src DIR] [--paired]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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


def hand_steps(precision: str = "32", accumulate: int = 1) -> Iterator[None]:
    """The reference, a plain loop (autocast, divide, step), pausing after each optimizer step.

    A generator, so ``hand_loop`` can time it alone and ``--paired`` can interleave it with
    the engine step by step (resuming it costs well under 0.1 us per step).
    """
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    data = loader(make_batches())
    autocast = precision == "bf16-mixed"  # no context at all otherwise: the old reference
    micro = 0
    while True:
        for batch in data:
            if autocast:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    out = model(batch["x"])
                    loss = nn.functional.cross_entropy(out, batch["y"])
            else:
                out = model(batch["x"])
                loss = nn.functional.cross_entropy(out, batch["y"])
            if accumulate > 1:
                loss = loss / accumulate
            loss.backward()
            micro += 1
            if micro % accumulate:
                continue
            opt.step()
            opt.zero_grad(set_to_none=True)
            yield


def hand_loop(steps: int, precision: str = "32", accumulate: int = 1) -> float:
    """``steps`` optimizer steps of the reference loop (``hand_steps``); us per step."""
    clock = StepClock(steps)
    for done, _ in enumerate(hand_steps(precision, accumulate), 1):
        clock.tick(done)
        if done == steps:
            break
    return clock.per_step_us()


class _PairedClock(Callback):
    """Runs one step of a hand-written loop after each engine step and times both apart.

    The engine's time is from the end of one hand step to the start of the next (so it
    includes this hook's own call); both share whatever load the machine has at that moment.
    """

    def __init__(self, steps: int, hand: Iterator[None]) -> None:
        super().__init__()
        self.steps = steps
        self.hand = hand
        self.engine_s = 0.0
        self.hand_s = 0.0
        self._hand_end = 0.0

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if not trainer_state.get("step_end", True):
            return
        start = time.perf_counter()
        next(self.hand)
        end = time.perf_counter()
        if trainer_state["global_step"] > WARMUP:
            self.engine_s += start - self._hand_end
            self.hand_s += end - start
        self._hand_end = end

    def per_step_us(self) -> tuple[float, float]:
        measured = self.steps - WARMUP
        return self.engine_s / measured * 1e6, self.hand_s / measured * 1e6


class _ClockCallback(Callback):
    def __init__(self, clock: StepClock) -> None:
        super().__init__()
        self.clock = clock

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer_state.get("step_end", True):  # once per optimizer step
            self.clock.tick(trainer_state["global_step"])


def vistrain_loop(steps: int, with_callbacks: bool = True, **step_options: Any) -> float:
    """``steps`` optimizer steps of the Trainer; us per step.

    ``step_options`` are passed only when given, so this also runs on sources without them
    (``--baseline-src``).
    """
    clock = StepClock(steps)
    _fit(steps, with_callbacks, _ClockCallback(clock), step_options)
    return clock.per_step_us()


def paired_loop(
    steps: int, with_callbacks: bool, step_options: dict[str, Any], hand_options: dict[str, Any]
) -> tuple[float, float]:
    """The Trainer with one hand-loop step after each of its steps: (engine, hand) us per step."""
    clock = _PairedClock(steps, hand_steps(**hand_options))
    _fit(steps, with_callbacks, clock, step_options)
    return clock.per_step_us()


def _fit(steps: int, with_callbacks: bool, clock: Callback, step_options: dict[str, Any]) -> None:
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = LossModule(
        {
            "loss": nn.functional.cross_entropy,  # the hand-written loop calls it too
            "connector": LossConnector({"input": pred_key(""), "target": data_key("y")}),
        }
    )
    with tempfile.TemporaryDirectory() as out:
        callbacks: list[Callback] = [clock]
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
            **step_options,
        )
        trainer.fit(model, [opt], None, loss)


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


VISTRAIN_ROWS: dict[str, tuple[bool, dict[str, Any], dict[str, Any]]] = {
    "vistrain": (True, {}, {}),
    "vistrain core only": (False, {}, {}),
    # The option rows run the core (no Logging/Checkpoint callbacks): they price the option's
    # own step path, against "vistrain core only" as the fp32 reference.
    "core bf16-mixed": (False, {"precision": "bf16-mixed"}, {"precision": "bf16-mixed"}),
    "core accumulate 4": (False, {"accumulate_grad_batches": 4}, {"accumulate": 4}),
}
"""Row name -> (with the two callbacks, Trainer step options, hand-loop options)."""

BASELINE_ROWS = tuple(VISTRAIN_ROWS)
"""The rows measured again with ``--baseline-src``."""

Row = Callable[[int], tuple[float, float]]
"""One measurement of a row: steps -> (engine us/step, its hand-written loop's us/step)."""


def _timed(engine: Callable[[int], float], hand: Callable[[int], float]) -> Row:
    """The hand-written loop alone, then the engine alone."""

    def run(steps: int) -> tuple[float, float]:
        base = hand(steps)
        return engine(steps), base

    return run


def _vistrain_row(spec: tuple[bool, dict[str, Any], dict[str, Any]], paired: bool) -> Row:
    with_callbacks, step_options, hand_options = spec
    if paired:
        return lambda s: paired_loop(s, with_callbacks, step_options, hand_options)
    return _timed(
        lambda s: vistrain_loop(s, with_callbacks, **step_options),
        lambda s: hand_loop(s, **hand_options),
    )


def engines_to_run(baseline_only: bool, paired: bool = False) -> dict[str, Row]:
    """Row name -> its measurement (``paired``: interleaved step by step, vistrain rows only)."""
    rows = {name: _vistrain_row(spec, paired) for name, spec in VISTRAIN_ROWS.items()}
    if baseline_only or paired:
        return rows
    try:
        import lightning  # noqa: F401

        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
        rows["lightning (all off)"] = _timed(lambda s: lightning_loop(s, False), hand_loop)
        rows["lightning (defaults)"] = _timed(lambda s: lightning_loop(s, True), hand_loop)
    except ImportError:
        print("lightning not installed: comparing with the hand-written loop only")
    return rows


def measure_round(rows: dict[str, Row], steps: int) -> dict[str, tuple[float, float]]:
    """One round: row name -> (engine us/step, its hand-written loop's us/step)."""
    result = {}
    for name, run in rows.items():
        try:
            result[name] = run(steps)
        except TypeError:  # a baseline's Trainer without this step option
            continue
    return result


def baseline_round(src: str, steps: int, log: str, paired: bool) -> dict[str, tuple[float, float]]:
    """One round of the vistrain rows with the sources in ``src`` (a subprocess)."""
    env = {**os.environ, "PYTHONPATH": src}
    command = [sys.executable, os.path.abspath(__file__), "--steps", str(steps)]
    command += ["--rounds", "1", "--json-round", "--log", log] + ["--paired"] * paired
    out = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return {name: (a, b) for name, (a, b) in json.loads(out.splitlines()[-1]).items()}


def ratio(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """Median overhead (us/step) and median ratio engine / hand-written loop of the rounds."""
    overhead = statistics.median(run - base for run, base in pairs)
    return overhead, statistics.median(run / base for run, base in pairs)


def _row(name: str, pairs: list[tuple[float, float]]) -> str:
    """One printed row: median overhead and ratio, and the rounds' lowest and highest ratio."""
    overhead, times = ratio(pairs)
    low, high = min(run / base for run, base in pairs), max(run / base for run, base in pairs)
    return (
        f"{name:>30}: {overhead:+7.1f} us/step overhead, ratio {times:.3f}x its hand loop "
        f"(rounds {low:.3f}-{high:.3f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--log",
        default=os.path.join(tempfile.gettempdir(), "vistrain_overhead.log"),
        help="file that receives the engines' output",
    )
    parser.add_argument(
        "--baseline-src", help="also measure the default rows with these sources (a src/ dir)"
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="interleave each engine step with a step of its hand-written loop (vistrain rows "
        "only): both see the same load, for a machine that other jobs share",
    )
    parser.add_argument("--json-round", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("vistrain").setLevel(logging.WARNING)
    rows = engines_to_run(baseline_only=args.json_round, paired=args.paired)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in rows}
    baseline: dict[str, list[tuple[float, float]]] = {name: [] for name in BASELINE_ROWS}
    with (
        open(args.log, "a" if args.json_round else "w", encoding="utf-8") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        for _ in range(args.rounds):
            if args.baseline_src:
                baseline_pairs = baseline_round(
                    args.baseline_src, args.steps, args.log, args.paired
                )
                for name, pair in baseline_pairs.items():
                    baseline[name].append(pair)
            for name, pair in measure_round(rows, args.steps).items():
                results[name].append(pair)
    if args.json_round:
        print(json.dumps({name: pairs[0] for name, pairs in results.items() if pairs}))
        return
    print(f"engine output: {args.log}")
    bases = [base for pairs in results.values() for _, base in pairs if pairs]
    print(
        f"hand-written loop: {statistics.median(bases):.1f} us/step (median, fp32, no accumulation)"
    )
    for name, pairs in results.items():
        print(_row(name, pairs))
    if args.baseline_src:
        for name, pairs in baseline.items():
            if pairs:
                print(_row(f"{name} @ baseline", pairs))


if __name__ == "__main__":
    main()
