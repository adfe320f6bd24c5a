"""The default experiment's ``init_weights``, ``freeze_backbone`` and ``freeze_bn`` keys."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from vistrain.engine.checkpoint_io import CHECKPOINT_FORMAT
from vistrain.model.weights import FrozenBatchNorm2d
from vistrain.model.yolox import YOLOX
from vistrain.zoo import load_config

TINY = {
    "image_size": 64,
    "batch_size": 4,
    "num_train_images": 4,
    "num_val_images": 2,
    "num_workers": 0,
    "num_threads": 1,
}


def test_build_starts_from_weights_freezes_and_logs_the_summary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(3)
    source = YOLOX(5, "nano")
    ckpt = tmp_path / "five_classes.ckpt"
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": source.state_dict()}, ckpt)
    module = load_config("yolox_shapes")
    params = module.Params(
        **TINY,
        cache_dir=str(tmp_path / "cache"),
        init_weights=str(ckpt),
        freeze_backbone=True,
        freeze_bn=True,
    )
    params.validate()
    with caplog.at_level(logging.INFO, logger="vistrain"):
        experiment = module.build(params, str(tmp_path / "out"))
    net = experiment.model.model
    for key, value in net.state_dict().items():
        if not key.startswith("head.cls_preds."):
            assert torch.equal(value, source.state_dict()[key]), key
    assert all(not p.requires_grad for p in net.backbone.parameters())
    trained = (*net.neck.modules(), *net.head.modules())
    convs = [m for m in trained if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(p.requires_grad for m in convs for p in m.parameters())
    experiment.model.train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(isinstance(m, FrozenBatchNorm2d) and not m.training for m in bns)
    assert "left at initialisation: head.cls_preds.0.weight" in caplog.text
    assert "GFLOPs at 64x64" in caplog.text and "0.90M parameters" in caplog.text


def test_missing_init_weights_file_is_a_one_line_error(tmp_path: Path) -> None:
    module = load_config("yolox_shapes")
    with pytest.raises(ValueError, match=r"init_weights='nope\.ckpt' is not a file"):
        module.Params(init_weights="nope.ckpt").validate()
