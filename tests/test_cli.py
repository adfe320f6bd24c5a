from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import vistrain
from cli_helpers import TINY_TOY_SETS, run_vistrain, set_args, toy_args
from trainer_fixtures import read_metrics
from vistrain.cli import main
from vistrain.engine.checkpoint_io import load_checkpoint, save_checkpoint

TINY = set_args("num_epochs=2", *TINY_TOY_SETS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", "--config", "toy_classifier", "--set", "nope=1"], "unknown key 'nope'"),
        (["fit", "--config", "toy_classifier", "--set", "batch_size=abc"], "expected int"),
        (["fit", "--config", "toy_classifier", "--set", "batch_size"], "is not KEY=VALUE"),
        (["fit", "--config", "missing_file.py"], "does not exist"),
        (["fit", "--config", "no_such_experiment"], "choose one of"),
        (["fit", "--config", "toy_classifier", "--set", "num_epochs=0"], "num_epochs=0"),
        (["test", "--config", "toy_classifier", "--ckpt", "missing.ckpt"], "does not exist"),
        (["fit", "--config", "toy_classifier", "--resume"], "no run with a checkpoint"),
    ],
)
def test_usage_errors_are_one_line_and_write_nothing(tmp_path, capsys, args, message) -> None:
    os.chdir(tmp_path)
    assert (
        main([*args, "--output-dir", str(tmp_path / "out")] if "--resume" not in args else args)
        == 2
    )
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and err.startswith("vistrain: error:")
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def test_unknown_key_lists_valid_keys(capsys) -> None:
    assert main(["fit", "--config", "toy_classifier", "--set", "epochs=3"]) == 2
    err = capsys.readouterr().err
    for key in ("num_epochs", "batch_size", "lr", "seed"):
        assert key in err


def test_configs_lists_experiments_and_params(capsys) -> None:
    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    assert "toy_classifier" in out and "num_epochs (int)" in out


def test_fit_test_and_resume_end_to_end(tmp_path) -> None:
    out = tmp_path / "run"
    proc = run_vistrain(
        "fit", "--config", "toy_classifier", "--output-dir", str(out), *TINY, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    ckpts = sorted(os.listdir(out / "checkpoints"))
    assert "last.ckpt" in ckpts and "epoch=1-step=4.ckpt" in ckpts
    tags = {r["tag"] for r in read_metrics(str(out))}
    assert {"val/Cls/top1", "val/Cls/top5", "train/loss", "lr", "epoch"} <= tags
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(out))
    # resume to 3 epochs from the run folder's last.ckpt
    proc = run_vistrain(
        "fit",
        "--config",
        "toy_classifier",
        "--output-dir",
        str(out),
        "--resume",
        *TINY,
        "--set",
        "num_epochs=3",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch=2-step=6.ckpt" in os.listdir(out / "checkpoints")
    assert "Resumed from" in proc.stdout + proc.stderr
    proc = run_vistrain(
        "test",
        "--config",
        "toy_classifier",
        "--ckpt",
        str(out / "checkpoints" / "last.ckpt"),
        "--output-dir",
        str(tmp_path / "test"),
        *TINY,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "EMA weights" in proc.stdout + proc.stderr
    assert "test/Cls/" in proc.stdout
    # Which weights were tested: test_test_evaluates_the_ema_weights_of_the_checkpoint_named.
    assert set(_scalars(tmp_path / "test", "test/Cls/top1")) == {6}  # last.ckpt's step


def test_test_evaluates_the_ema_weights_of_the_checkpoint_named(tmp_path) -> None:
    """``vistrain test CKPT`` scores the EMA weights of CKPT as its validation during fit did.

    Batches of 8 make the tiny run's accuracy change from epoch to epoch (at its default batch
    of 32 it stays at one value), so testing another checkpoint, an unloaded model or the raw
    weights would give another number. The raw-weights case is a copy of the last checkpoint
    with its EMA and raw weights swapped.
    """
    run = tmp_path / "run"
    sets = toy_args(*TINY_TOY_SETS, "num_epochs=2", "batch_size=8")
    assert main(["fit", *sets, "--output-dir", str(run)]) == 0
    val = _scalars(run, "val/Cls/top1")
    assert len(val) == 2 and len(set(val.values())) == 2, val  # not a flat metric

    def tested(ckpt: Path) -> dict[int, float]:
        out = tmp_path / f"test_{ckpt.stem}"
        assert main(["test", *sets, "--ckpt", str(ckpt), "--output-dir", str(out)]) == 0
        return _scalars(out, "test/Cls/top1")

    last = run / "checkpoints" / "last.ckpt"
    assert tested(run / "checkpoints" / "epoch=0-step=8.ckpt") == {8: val[8]}
    assert tested(last) == {16: val[16]}
    ckpt = load_checkpoint(last)
    state = ckpt["state_dict"]
    raw = {key: value for key, value in state.items() if key.startswith("model.")}
    for key, value in raw.items():
        state[key], state["ema_" + key] = state["ema_" + key], value
    save_checkpoint(ckpt, tmp_path / "swapped.ckpt")
    assert tested(tmp_path / "swapped.ckpt")[16] != val[16]  # the raw weights score otherwise


def _scalars(folder: Path, tag: str) -> dict[int, float]:
    """Step -> value of ``tag`` in ``folder/metrics.jsonl``."""
    return {r["step"]: r["value"] for r in read_metrics(str(folder)) if r["tag"] == tag}


def _records(folder: Path) -> list[dict[str, Any]]:
    return read_metrics(str(folder))


def _results_folder(stdout: str) -> Path:
    lines = [line for line in stdout.splitlines() if line.startswith("Results in ")]
    assert len(lines) == 1, stdout
    return Path(lines[0].removeprefix("Results in "))


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"vistrain {vistrain.__version__}"


def test_mistyped_key_suggests_the_closest_one_first(capsys) -> None:
    assert main(["fit", "--config", "toy_classifier", "--set", "num_epoch=3"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'num_epochs'?" in err
    assert err.index("did you mean") < err.index("valid keys")
    assert main(["fit", "--config", "toy_classifier", "--set", "zzzz=3"]) == 2
    assert "did you mean" not in capsys.readouterr().err  # nothing close: only the list


LIGHTNING_NOISE = (
    "GPU available",
    "TPU available",
    "Tip:",
    "litlogger",
    "deprecated",
    "Deprecation",
    "FutureWarning",
    "`Trainer.fit` stopped",
)


def test_lightning_engine_prints_only_vistrain_lines(tmp_path) -> None:
    pytest.importorskip("lightning")
    proc = run_vistrain(
        "fit",
        "--config",
        "toy_classifier",
        "--engine",
        "lightning",
        "--output-dir",
        str(tmp_path / "run"),
        *TINY,
        "--set",
        "num_epochs=1",
        "--set",
        "num_threads=1",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    output = proc.stdout + proc.stderr
    assert "Torch uses 1 thread(s)." in output  # the toy classifier takes num_threads
    assert re.search(r"Epoch \d+: 2/2", output) and "Classification accuracy" in output
    for noise in LIGHTNING_NOISE:
        assert noise not in output, (noise, output)


def test_devices_launcher_prints_no_omp_banner(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    proc = run_vistrain(
        "fit",
        "--config",
        "toy_classifier",
        "--devices",
        "2",
        "--output-dir",
        str(tmp_path / "run"),
        *TINY,
        "--set",
        "num_epochs=1",
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    output = proc.stdout + proc.stderr
    assert "OMP_NUM_THREADS" not in output and "*****" not in output, output
    assert re.search(r"Epoch \d+: 1/1", output)  # 64 images, batch 32 per process: one step each


@pytest.fixture(scope="module")
def tiny_yolox(tmp_path_factory) -> dict[str, Any]:
    """The default experiment for one epoch (its own switch rule), then ``vistrain test``."""
    tmp = tmp_path_factory.mktemp("yolox_one_epoch")
    sets = set_args(
        "image_size=64",
        "batch_size=8",
        "num_train_images=32",
        "num_val_images=8",
        "num_workers=0",
        "log_every=1",
        "vis_every=2",
        "num_threads=1",
        f"cache_dir={tmp / 'cache'}",
    )
    run = tmp / "run"
    fit = run_vistrain("fit", "--output-dir", str(run), "--set", "num_epochs=1", *sets, cwd=tmp)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    test = run_vistrain("test", "--ckpt", str(ckpt), *sets, cwd=tmp)
    assert test.returncode == 0, test.stderr[-3000:]
    return {"tmp": tmp, "run": run, "fit": fit, "test": test, "ckpt": ckpt, "sets": sets}


def test_one_epoch_of_the_default_config_trains_without_mosaic(tiny_yolox) -> None:
    output = tiny_yolox["fit"].stdout + tiny_yolox["fit"].stderr
    # 1 epoch < no_aug_epochs: the whole run is in the final mode, as in official YOLOX
    assert "YOLOX mode switch at epoch 0" in output
    tags = {r["tag"] for r in _records(tiny_yolox["run"])}
    assert "train/det.loss_l1" in tags and "val/Det/AP50" in tags


def test_test_writes_into_a_named_folder_with_the_checkpoints_step(tiny_yolox) -> None:
    folder = _results_folder(tiny_yolox["test"].stdout)
    assert folder.parent == tiny_yolox["tmp"] / "runs" / "yolox_shapes"
    assert folder.name.endswith("-test") and folder.is_dir()
    records = [r for r in _records(folder) if r["tag"].startswith("test/")]
    assert records and {(r["step"], r["epoch"]) for r in records} == {(4, 0)}  # 32/8 steps
    assert not (folder / "checkpoints").exists() and not (folder / "vis" / "train").exists()
    pictures = list((folder / "vis" / "test" / "step0000004").glob("*.png"))
    assert pictures and (folder / "log.txt").is_file()
    with Image.open(pictures[0]) as picture:
        assert min(picture.size) >= 320  # 64-pixel images enlarged for readable labels


def test_a_checkpoint_of_another_experiment_names_it(tiny_yolox, tmp_path, capsys) -> None:
    toy = tmp_path / "toy"
    assert main(["fit", "--config", "toy_classifier", "--output-dir", str(toy), *TINY]) == 0
    toy_ckpt = str(toy / "checkpoints" / "last.ckpt")
    assert load_checkpoint(toy_ckpt)["callbacks"]["RunInfoCallback"]["experiment"] == (
        "toy_classifier"
    )
    capsys.readouterr()
    sets = tiny_yolox["sets"]
    for args in (["test", "--ckpt", toy_ckpt], ["fit", "--resume", toy_ckpt]):
        out = tmp_path / f"out_{args[0]}"
        assert main([*args, "--output-dir", str(out), *sets]) == 2
        err = capsys.readouterr().err
        assert err.startswith("vistrain: error:") and err.count("\n") == 1
        assert "checkpoint of experiment 'toy_classifier', not 'yolox_shapes'" in err
        assert "--config toy_classifier" in err
        if args[0] == "test":
            assert not out.exists()
