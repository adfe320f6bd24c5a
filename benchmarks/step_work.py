"""The work the Trainer adds per optimizer step, counted rather than timed.

``overhead.py`` times the engine against hand-written loops; on a loaded machine its
ratios move by tens of percent between rounds. This script counts instead, so a figure does
not depend on the load: for each of ``overhead.py``'s vistrain rows it runs the engine and
the row's hand-written loop twice (``--steps`` and twice as many steps) and prints, per
optimizer step, the Python function calls (``cProfile``) and the ATen operators (a
``TorchDispatchMode``) the engine makes beyond the loop; the difference of the two run
lengths removes start-up (after one warm-up run). ``--top N`` lists the functions with the
most extra calls.
``--baseline-src DIR`` prints the same for another checkout's sources (a subprocess); option
rows those sources do not know are left out.

    python benchmarks/step_work.py [--steps 300] [--top 0] [--baseline-src DIR]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import functools
import io
import json
import logging
import os
import pstats
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import VISTRAIN_ROWS, WARMUP, hand_loop, vistrain_loop


class _OpCounter(TorchDispatchMode):
    """Counts every ATen operator that reaches the dispatcher's Python mode."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _calls(run: Callable[[int], float], steps: int) -> collections.Counter[str]:
    """Python calls of ``run(steps)`` by function (``file:line(name)``)."""
    profile = cProfile.Profile()
    profile.enable()
    run(steps)
    profile.disable()
    counts: collections.Counter[str] = collections.Counter()
    for (path, line, name), entry in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
        counts[f"{os.path.basename(path)}:{line}({name})"] += entry[1]
    return counts


def _ops(run: Callable[[int], float], steps: int) -> int:
    counter = _OpCounter()
    with counter:
        run(steps)
    return counter.count


def per_step(run: Callable[[int], float], steps: int) -> tuple[collections.Counter[str], float]:
    """Python calls by function and ATen operators, per optimizer step (start-up removed)."""
    run(steps)  # first-time work (lazy imports, caches) is not per step
    short, long = _calls(run, steps), _calls(run, 2 * steps)
    calls = collections.Counter({k: (long[k] - short[k]) / steps for k in long | short})
    return calls, (_ops(run, 2 * steps) - _ops(run, steps)) / steps


def count_rows(steps: int, top: int) -> dict[str, dict[str, Any]]:
    """Row name -> extra calls and operators per step of the engine over its hand loop."""
    result = {}
    for name, (with_callbacks, step_options, hand_options) in VISTRAIN_ROWS.items():
        engine = functools.partial(vistrain_loop, with_callbacks=with_callbacks, **step_options)
        hand = functools.partial(hand_loop, **hand_options)
        try:
            engine_calls, engine_ops = per_step(engine, steps)
        except TypeError:  # a baseline's Trainer without this step option: left out
            continue
        hand_calls, hand_ops = per_step(hand, steps)
        extra = engine_calls.copy()
        extra.subtract(hand_calls)
        result[name] = {
            "calls": sum(engine_calls.values()) - sum(hand_calls.values()),
            "ops": engine_ops - hand_ops,
            "top": [(key, value) for key, value in extra.most_common(top) if value > 0.01],
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--top", type=int, default=0, help="list the N most called extras")
    parser.add_argument("--baseline-src", help="also count with these sources (a src/ dir)")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps <= WARMUP:
        parser.error(f"--steps {args.steps}: use more than {WARMUP} (the loops' warm-up)")
    torch.set_num_threads(1)
    logging.getLogger("vistrain").setLevel(logging.WARNING)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        rows = count_rows(args.steps, args.top)
    if args.json:
        print(json.dumps(rows))
        return
    tables = {"": rows}
    if args.baseline_src:
        command = [sys.executable, os.path.abspath(__file__), "--steps", str(args.steps)]
        command += ["--top", str(args.top), "--json"]
        env = {**os.environ, "PYTHONPATH": args.baseline_src}
        out = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        tables[" @ baseline"] = json.loads(out.stdout.splitlines()[-1])
    print("per optimizer step, engine minus its hand-written loop:")
    for suffix, table in tables.items():
        for name, row in table.items():
            label = f"{name}{suffix}"
            print(f"{label:>30}: {row['calls']:+7.1f} Python calls, {row['ops']:+5.2f} ATen ops")
            for key, value in row["top"]:
                print(f"{'':>34}{value:+7.2f} {key}")


if __name__ == "__main__":
    main()
