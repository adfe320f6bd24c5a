"""The ``yolox_coco`` experiment on a tiny folder shaped like a user's own COCO data.

The folder (written by ``vistrain make-shapes`` and edited by ``coco_folder_utils``) has
category ids 3, 7, 11 listed out of order, an image without boxes, a JPEG and a
non-square image. A two-epoch run with the mode switch after the first must train,
validate with the right category ids and checkpoint; the recipe's defaults must be the
official exp files' values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from cli_helpers import set_args
from coco_folder_utils import coco_sets, make_awkward_coco
from vistrain.cli import main
from vistrain.engine.optim import yolox_warm_cos
from vistrain.model.yolox import YOLOX
from vistrain.zoo import load_config
from vistrain.zoo.base import apply_overrides
from vistrain.zoo.yolox_coco import Params

OFFICIAL = Path("/work/shared/fixtures/yolox_official/yolox_nano_official.pth")

TINY = [
    "size=nano",
    "image_size=64",
    "multiscale_min=32",
    "multiscale_max=96",
    "resize_interval=1",
    "batch_size=4",
    "num_epochs=2",
    "no_aug_epochs=1",
    "warmup_epochs=1",
    "val_every=1",
    "log_every=1",
    "vis_every=1",
    "num_workers=0",
    "num_threads=1",
    "ema_warmup_steps=2",
    "score_threshold=0",  # an untrained model scores below the official 0.01
    "mosaic_prob=1",  # every sample through mosaic and mixup (the empty image too)
    "mixup_prob=1",
]


@pytest.fixture(scope="module")
def coco_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_awkward_coco(tmp_path_factory.mktemp("coco") / "data")


def test_short_run_on_awkward_coco_folder(coco_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code = main(["fit", "--config", "yolox_coco", *coco_sets(coco_folder), *set_args(*TINY),
                 "--output-dir", str(out)])  # fmt: skip
    assert code == 0
    assert (out / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4  # 8 images / batch 4, two epochs
    # Three classes from the file, whatever their ids.
    assert ckpt["state_dict"]["model.head.cls_preds.0.weight"].shape[0] == 3
    # Every epoch validated: predictions carry the file's category ids, never an index.
    saved = sorted((out / "eval").rglob("*.json"))
    assert saved, "no saved predictions"
    detections = json.loads(saved[-1].read_text())
    assert detections and {d["category_id"] for d in detections} <= {3, 7, 11}
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tags = {r["tag"] for r in records}
    assert "val/Det/AP" in tags
    # The L1 term exactly in the last (no-aug) epoch: steps 3 and 4.
    assert [r["step"] for r in records if r["tag"] == "train/det.loss_l1"] == [3, 4]
    losses = [r["value"] for r in records if r["tag"] == "train/loss"]
    assert losses and all(math.isfinite(v) for v in losses)
    # `vistrain test CKPT` finds exactly the detections CKPT's validation found (its EMA
    # weights). The two checkpoints' detections differ, so testing the wrong checkpoint or
    # an unloaded model would not match, which the APs of so short a run (0) cannot tell.
    found = {}
    test_args = ["test", "--config", "yolox_coco", *coco_sets(coco_folder), *set_args(*TINY)]
    for step, name in ((2, "epoch=0-step=2.ckpt"), (4, "last.ckpt")):
        tested = tmp_path / f"test_{step}"
        ckpt_args = ["--ckpt", str(out / "checkpoints" / name), "--output-dir", str(tested)]
        assert main([*test_args, *ckpt_args]) == 0
        found[step] = _detections(out, step)
        assert _detections(tested, step) == found[step]
    assert found[2] and found[4] and found[2] != found[4]


def _detections(run: Path, step: int) -> list[dict[str, object]]:
    """The detections a run saved when it evaluated at ``step``."""
    (path,) = (run / "eval" / "Det").glob(f"detections_epoch=*-step={step}.json")
    return json.loads(path.read_text())


def test_defaults_are_the_official_recipe() -> None:
    nano, tiny, s, x = (Params(size=name).recipe() for name in ("nano", "tiny", "s", "x"))
    assert (nano.image_size, nano.mosaic_prob, nano.mixup_prob) == (416, 0.5, 0.0)
    assert (nano.multiscale_min, nano.multiscale_max, nano.mosaic_scale) == (320, 640, (0.5, 1.5))
    assert (tiny.image_size, tiny.mosaic_prob, tiny.mixup_prob) == (416, 1.0, 0.0)
    for big in (s, x):
        assert (big.image_size, big.mosaic_prob, big.mixup_prob) == (640, 1.0, 1.0)
        assert (big.multiscale_min, big.multiscale_max, big.mosaic_scale) == (480, 800, (0.1, 2.0))
    base = Params()
    assert (base.num_epochs, base.no_aug_epochs, base.warmup_epochs) == (300, 15, 5)
    assert (base.lr_per_64, base.min_lr_ratio, base.momentum, base.weight_decay) == (
        0.01, 0.05, 0.9, 5e-4,
    )  # fmt: skip
    assert (base.ema_decay, base.ema_warmup_steps) == (0.9998, 2000)
    assert (base.degrees, base.translate, base.shear, base.flip_prob) == (10.0, 0.1, 2.0, 0.5)
    # A key set by the user wins over the size's official value.
    assert Params(size="s", image_size=320).recipe().multiscale_min == 160
    assert Params(size="nano", mosaic_prob=0.0).recipe().mosaic_prob == 0.0


def test_schedule_is_official_warm_cos() -> None:
    """Quadratic warm-up from 0, cosine to 0.05 x lr, flat for the last epochs."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.02)
    scheduler = yolox_warm_cos(optimizer, warmup_steps=10, total_steps=100, flat_steps=20)
    lrs = []
    for step in range(1, 101):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step_on_batch(step)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(0.02 * 0.25)  # (5 / 10) ** 2
    assert lrs[10] == pytest.approx(0.02)
    midpoint = 10 + (80 - 10) // 2  # halfway through the cosine
    assert lrs[midpoint] == pytest.approx(0.001 + 0.5 * 0.019)
    assert lrs[80:] == pytest.approx([0.001] * 20)


def test_lr_scales_with_the_batch(coco_folder: Path, tmp_path: Path) -> None:
    module = load_config("yolox_coco")
    params = apply_overrides(module.Params(), [*coco_sets(coco_folder)[1::2], *TINY])
    experiment = module.build(params, str(tmp_path))
    optimizer = experiment.optimizers[0]
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.9
    # Peak lr = 0.01 * 4 / 64; the first step runs at 0 (warm-up from 0).
    factor = experiment.lr_schedulers[0].configs[0].kwargs["lr_lambda"]
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.01 * 4 / 64)
    assert factor(0) == 0.0
    decays = sorted(group["weight_decay"] for group in optimizer.param_groups)
    assert decays == [0.0, 5e-4]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ([], "train_ann is not set"),
        (["size=huge"], "size='huge' is not a YOLOX size"),
        (["image_size=100"], "image_size=100 must be a positive multiple of 32"),
        (["no_aug_epochs=400"], "must be <= num_epochs=300"),
        (["mosaic_scale_min=3"], "mosaic_scale_min=3.0 and mosaic_scale_max=1.5"),
        (["init_weights=missing.pth"], "init_weights='missing.pth' is not a file"),
    ],
)
def test_bad_settings_are_one_line_errors(
    coco_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], sets, message
) -> None:
    paths = [] if not sets else coco_sets(coco_folder)
    if sets == ["mosaic_scale_min=3"]:
        sets = ["size=nano", *sets]
    code = main(["fit", "--config", "yolox_coco", *paths, *set_args(*sets),
                 "--output-dir", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("vistrain: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_mismatched_categories_are_refused(coco_folder: Path, tmp_path: Path) -> None:
    val = json.loads((coco_folder / "val" / "annotations.json").read_text())
    val["categories"] = val["categories"][:2]
    val["annotations"] = [
        a for a in val["annotations"] if a["category_id"] in {c["id"] for c in val["categories"]}
    ]
    other = tmp_path / "val.json"
    other.write_text(json.dumps(val))
    module = load_config("yolox_coco")
    sets = [*coco_sets(coco_folder)[1::2], f"val_ann={other}", *TINY]
    with pytest.raises(ValueError, match="both files need the same categories"):
        module.build(apply_overrides(module.Params(), sets), str(tmp_path))


def test_fine_tune_from_official_weights(coco_folder: Path, tmp_path: Path) -> None:
    """80-class official nano into a 3-class model: all but the class predictors load;
    with the backbone frozen, a short run leaves it exactly at the official weights."""
    official = YOLOX.from_official(OFFICIAL, "nano")
    out = tmp_path / "run"
    sets = [f"init_weights={OFFICIAL}", "freeze_backbone=true"]
    code = main(["fit", "--config", "yolox_coco", *coco_sets(coco_folder), *set_args(*TINY),
                 *set_args(*sets), "--output-dir", str(out)])  # fmt: skip
    assert code == 0
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for prefix in ("model.", "ema_model."):
        for key, value in official.backbone.state_dict().items():
            assert torch.equal(state[f"{prefix}backbone.{key}"], value), key
        assert bool(state[f"{prefix}bgr_input"])  # official >= 0.2 input convention kept
    assert state["model.head.cls_preds.0.weight"].shape[0] == 3
    # The neck trained (it started at the official weights).
    neck_key = next(k for k in official.neck.state_dict() if k.endswith("weight"))
    assert not torch.equal(state[f"model.neck.{neck_key}"], official.neck.state_dict()[neck_key])
    # Weights only: the run started at step 0.
    log = (out / "metrics.jsonl").read_text().splitlines()
    assert json.loads(log[0])["step"] <= 1
