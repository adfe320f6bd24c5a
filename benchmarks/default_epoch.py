"""Time of one training epoch of the default run, against a baseline recipe in the same run.

The default experiment (``yolox_shapes``) runs as a user runs it (``vistrain fit``, one data
loader worker, the default thread count) for two epochs of mosaic training; the time of the
second epoch (from the step log at its first step to the one at its last) is taken, so
start-up, data generation and the first epoch's worker start are left out. Each round runs
the candidate and the baseline one after the other, and the median ratio candidate /
baseline of the rounds is printed with its spread: the machine's speed cancels out.

The baseline is given as ``--set`` overrides that restore an earlier recipe on today's
code; by default the recipe before issue 17 (contiguous memory format, no gradient
clipping). ``--baseline-src DIR`` runs the baseline with another checkout's sources instead.

    python benchmarks/default_epoch.py [--rounds 3] [--baseline-set channels_last=false ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

STEPS_PER_EPOCH = 200
"""800 training images at batch 4: the default run's epoch."""

COMMON = [
    "--set",
    "num_epochs=2",
    "--set",
    "switch_epoch=2",
    "--set",
    "val_every=100",
    "--set",
    "checkpoint_period=100",
]
"""Two mosaic epochs, no validation (it is not part of the training step)."""

DEFAULT_BASELINE = ["channels_last=false", "gradient_clip_val=none"]


def epoch_seconds(run_dir: Path) -> float:
    """Seconds between the logged steps that open and close the second epoch."""
    times: dict[int, float] = {}
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as lines:
        for line in lines:
            row = json.loads(line)
            if row["tag"] == "train/loss":
                times[row["step"]] = row["time"]
    first, last = STEPS_PER_EPOCH + 10, 2 * STEPS_PER_EPOCH
    if first not in times or last not in times:
        raise RuntimeError(f"{run_dir}: no train/loss logged at steps {first} and {last}")
    return (times[last] - times[first]) * STEPS_PER_EPOCH / (last - first)


def run_epoch(src: str, overrides: list[str], cache: str, work: str) -> float:
    """One ``vistrain fit`` of two epochs with ``src`` on the path; the second epoch's time."""
    out = Path(tempfile.mkdtemp(dir=work))
    args = [sys.executable, "-m", "vistrain", "fit", *COMMON, "--output-dir", str(out / "run")]
    for item in overrides:
        args += ["--set", item]
    env = dict(os.environ, PYTHONPATH=src, VISTRAIN_CACHE=cache)
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return epoch_seconds(out / "run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--baseline-set",
        nargs="*",
        default=DEFAULT_BASELINE,
        help="KEY=VALUE overrides that make today's code run the baseline recipe",
    )
    parser.add_argument("--baseline-src", help="run the baseline with these sources (src/)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vistrain_bench"))
    args = parser.parse_args()
    here = str(Path(__file__).resolve().parents[1] / "src")
    base_src = args.baseline_src or here
    base_set = [] if args.baseline_src else args.baseline_set
    ratios, news, olds = [], [], []
    with tempfile.TemporaryDirectory() as work:
        for index in range(args.rounds):
            new = run_epoch(here, [], args.cache, work)
            old = run_epoch(base_src, base_set, args.cache, work)
            news.append(new)
            olds.append(old)
            ratios.append(new / old)
            print(
                f"round {index + 1}: default {new:6.1f} s/epoch, baseline {old:6.1f} s/epoch, "
                f"ratio {new / old:.3f}",
                flush=True,
            )
    print(
        f"default epoch / baseline epoch: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}, {args.rounds} rounds); "
        f"medians {statistics.median(news):.1f} s vs {statistics.median(olds):.1f} s"
    )


if __name__ == "__main__":
    main()
