"""Starting from weights (vistrain or official checkpoints) and freezing parts of a YOLOX."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch

from vistrain.engine.checkpoint_io import CHECKPOINT_FORMAT
from vistrain.model.adapter import ModelEMAAdapter
from vistrain.model.weights import (
    FrozenBatchNorm2d,
    freeze_backbone,
    freeze_batchnorm,
    load_init_weights,
)
from vistrain.model.yolox import YOLOX
from vistrain.model.yolox_official import convert_official_state_dict, official_key


def _vistrain_checkpoint(path: Path, num_classes: int = 3) -> ModelEMAAdapter:
    """A checkpoint file as training writes it: EMA adapter state, optimizer, loop position."""
    torch.manual_seed(1)
    adapter = ModelEMAAdapter(YOLOX(num_classes, "nano"), decay=0.5)
    with torch.no_grad():
        for param in adapter.model.parameters():
            param.add_(torch.randn_like(param))  # the plain weights differ from the EMA's
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "epoch": 7,
            "state_dict": adapter.state_dict(),
            "optimizers": [{"state": {}, "param_groups": []}],
        },
        path,
    )
    return adapter


def test_vistrain_checkpoint_loads_the_plain_model_weights(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = _vistrain_checkpoint(tmp_path / "last.ckpt")
    model = YOLOX(3, "nano")
    with caplog.at_level(logging.INFO, logger="vistrain"):
        skipped = load_init_weights(model, tmp_path / "last.ckpt")
    assert skipped == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, adapter.model.state_dict()[key]), key
    assert not torch.equal(
        model.head.reg_preds[0].weight, adapter.ema_model.head.reg_preds[0].weight
    )
    assert "plain model weights" in caplog.text and "vistrain checkpoint" in caplog.text


def test_other_class_count_keeps_the_class_predictors_and_logs_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = _vistrain_checkpoint(tmp_path / "last.ckpt", num_classes=3)
    torch.manual_seed(0)
    model = YOLOX(5, "nano")
    initial = copy.deepcopy(model.state_dict())
    with caplog.at_level(logging.INFO, logger="vistrain"):
        skipped = load_init_weights(model, str(tmp_path / "last.ckpt"))
    predictors = [f"head.cls_preds.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    assert sorted(skipped) == sorted(predictors)
    for key, value in model.state_dict().items():
        source = initial if key in predictors else adapter.model.state_dict()
        assert torch.equal(value, source[key]), key
    assert "left at initialisation: head.cls_preds.0.weight" in caplog.text


def test_official_checkpoint_is_told_apart_by_content(tmp_path: Path) -> None:
    torch.manual_seed(2)
    official_model = YOLOX(80, "nano")
    official = {official_key(official_model, k): v for k, v in official_model.state_dict().items()}
    del official["bgr_input"]
    torch.save({"model": official, "start_epoch": 300}, tmp_path / "yolox_nano.pth")
    model = YOLOX(3, "nano")
    skipped = load_init_weights(model, tmp_path / "yolox_nano.pth")
    assert len(skipped) == 6
    assert bool(model.bgr_input)  # official >= 0.2 weights take BGR 0..255
    assert torch.equal(
        model.backbone.stem.conv[0].weight, official_model.backbone.stem.conv[0].weight
    )
    load_init_weights(model, official, legacy=True)  # a bare state dict works too
    assert not bool(model.bgr_input)
    # The input convention travels with vistrain checkpoints of the fine-tuned model.
    model.bgr_input.fill_(True)
    torch.save({"format": CHECKPOINT_FORMAT, "state_dict": model.state_dict()}, tmp_path / "a.ckpt")
    again = YOLOX(3, "nano")
    load_init_weights(again, tmp_path / "a.ckpt")
    assert bool(again.bgr_input)


def test_checkpoints_that_do_not_fit_are_errors_listing_the_tensors(tmp_path: Path) -> None:
    _vistrain_checkpoint(tmp_path / "nano.ckpt")
    with pytest.raises(
        ValueError, match=r"YOLOX-tiny .*wrong shape .*backbone\.stem\.conv\.0\.weight"
    ):
        load_init_weights(YOLOX(3, "tiny"), tmp_path / "nano.ckpt")
    state = YOLOX(3, "nano").state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["head.reg_preds.2.bias"]
    with pytest.raises(ValueError, match=r"missing: head\.reg_preds\.2\.bias; unexpected: extra"):
        load_init_weights(YOLOX(3, "nano"), {"format": CHECKPOINT_FORMAT, "state_dict": state})
    with pytest.raises(ValueError, match=r"is neither a vistrain checkpoint .* nor an official"):
        load_init_weights(YOLOX(3, "nano"), {"weights": {}})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_init_weights(YOLOX(3, "nano"), tmp_path / "nope.ckpt")
    model = YOLOX(3, "nano")
    unexpected = convert_official_state_dict(model, {"head.foo": torch.zeros(1)})[1]
    assert unexpected == ["head.foo"]


def _train_step(model: YOLOX) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    out = model(torch.rand(2, 3, 64, 64) * 255)
    loss = sum(t.float().pow(2).mean() for maps in out for t in maps)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_freeze_batchnorm_keeps_statistics_and_affine_fixed_through_train() -> None:
    torch.manual_seed(0)
    model = YOLOX(3, "nano")
    count = freeze_batchnorm(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert count == len(bns) > 50
    before = copy.deepcopy(model.state_dict())
    _train_step(model)
    model.train()
    assert all(isinstance(m, FrozenBatchNorm2d) and not m.training for m in bns)
    assert all(not p.requires_grad for m in bns for p in m.parameters())
    after = model.state_dict()
    bn_keys = [
        f"{name}.{k}" for name, m in model.named_modules() if m in bns for k in m.state_dict()
    ]
    assert len(bn_keys) == 5 * len(bns)
    for key in bn_keys:
        assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["head.obj_preds.0.bias"], before["head.obj_preds.0.bias"])
    # An EMA copy (a deep copy) and a reloaded state dict keep the same names and behaviour.
    clone = copy.deepcopy(model).train()
    assert all(not m.training for m in clone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    YOLOX(3, "nano").load_state_dict(model.state_dict())


def test_freeze_backbone_trains_only_the_neck_and_head() -> None:
    torch.manual_seed(0)
    model = YOLOX(3, "nano")
    frozen = freeze_backbone(model)
    assert frozen == sum(p.numel() for p in model.backbone.parameters())
    before = copy.deepcopy(model.state_dict())
    _train_step(model)
    after = model.state_dict()
    for key in after:
        if key.startswith("backbone."):
            assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["neck.td4.fuse.0.weight"], before["neck.td4.fuse.0.weight"])
    neck_bn = model.neck.td4.fuse[1]
    assert neck_bn.training and not isinstance(neck_bn, FrozenBatchNorm2d)
