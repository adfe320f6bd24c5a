"""Every Trainer step and device option on a CUDA GPU (skipped without one; CI has none).

Run on a GPU machine with ``pytest -m cuda tests/cuda`` (``benchmarks/gpu_check.sh`` does).
GPU kernels may pick other algorithms from run to run, so results are compared with a
tolerance where the CPU tests compare bit for bit.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from vistrain.data.loader import build_test_dataloader, build_train_dataloader
from vistrain.engine.callbacks import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.callbacks.ema import EMACallback
from vistrain.engine.checkpoint_io import load_checkpoint
from vistrain.engine.connectors import DataConnector, LossConnector, data_key, pred_key
from vistrain.engine.loss_module import LossModule
from vistrain.engine.trainer import Trainer
from vistrain.model.adapter import ModelEMAAdapter

pytestmark = pytest.mark.cuda

DEVICE = torch.device("cuda")
LR = 0.1


class Images(Dataset[dict[str, Any]]):
    """Seeded 3x16x16 images with one of 4 labels."""

    def __init__(self, num: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(num, 3, 16, 16, generator=gen)
        self.labels = torch.randint(0, 4, (num,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"images": self.images[idx], "labels": self.labels[idx]}


class ConvNet(nn.Module):
    """Two convolutions with GroupNorm: a step does not depend on how a batch is split."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.conv2(self.norm(self.conv1(images)).relu()).relu()
        return {"logits": self.head(features.mean(dim=(2, 3)))}


def _loss() -> LossModule:
    return LossModule(
        {
            "loss": nn.CrossEntropyLoss(),
            "connector": LossConnector({"input": pred_key("logits"), "target": data_key("labels")}),
            "name": "ce",
        }
    )


class Probe(Callback):
    """Records each step's logits dtype, batch device/layout and the global step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict[str, Any]] = []

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        self.steps.append(
            {
                "dtype": outputs["logits"].dtype,
                "device": batch["images"].device.type,
                "nhwc": batch["images"].is_contiguous(memory_format=torch.channels_last),
                "weight_nhwc": conv.weight.is_contiguous(memory_format=torch.channels_last),
                "step": trainer_state["global_step"],
            }
        )
        return None


def _fit(
    out: str,
    batch_size: int = 8,
    num_epochs: int = 2,
    ckpt_path: str | None = None,
    momentum: float = 0.9,
    probe: Probe | None = None,
    **options: Any,
) -> ModelEMAAdapter:
    """Train ConvNet (in an EMA adapter) on 32 images on the GPU; checkpoints every epoch."""
    torch.manual_seed(0)
    model = ModelEMAAdapter(ConvNet(), decay=0.8)
    optimizer = torch.optim.SGD(model.model.parameters(), lr=LR, momentum=momentum)
    train = build_train_dataloader(Images(32, 0), batch_size, seed=0, drop_last=False)
    test = build_test_dataloader(Images(16, 1), 8)
    connector = DataConnector({"images": "images"})
    callbacks: list[Callback] = [EMACallback(), CheckpointCallback(save_prefix=out)]
    if probe is not None:
        callbacks.append(probe)
    trainer = Trainer(
        DEVICE, out, train, test, connector, connector, callbacks,
        num_epochs=num_epochs, tensorboard=False, **options,
    )  # fmt: skip
    trainer.fit(model, optimizer, None, _loss(), ckpt_path=ckpt_path)
    return model


def _hand_written(dtype: torch.dtype | None, accumulate: int = 1) -> nn.Module:
    """The same training written out: autocast, divide, backward, step, zero."""
    torch.manual_seed(0)
    model = ModelEMAAdapter(ConvNet(), decay=0.8).model.to(DEVICE)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    loader = build_train_dataloader(Images(32, 0), 8, seed=0, drop_last=False)
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
        for idx, batch in enumerate(loader):
            images, labels = batch["images"].to(DEVICE), batch["labels"].to(DEVICE)
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = loss_fn(model(images)["logits"], labels)
            (loss / accumulate).backward()
            if (idx + 1) % accumulate == 0 or idx == len(loader) - 1:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return model


def _assert_close(a: nn.Module, b: nn.Module, tol: float) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol, msg=name)


def test_bf16_mixed_runs_the_forward_in_bf16_and_matches_a_hand_written_loop(tmp_path) -> None:
    probe = Probe()
    model = _fit(str(tmp_path), probe=probe, precision="bf16-mixed")
    assert {s["dtype"] for s in probe.steps} == {torch.bfloat16}
    _assert_close(model.model, _hand_written(torch.bfloat16), tol=1e-3)


def test_fp16_mixed_trains_and_resumes_with_its_scaler(tmp_path) -> None:
    probe = Probe()
    straight = _fit(str(tmp_path / "straight"), probe=probe, precision="16-mixed")
    assert {s["dtype"] for s in probe.steps} == {torch.float16}
    assert all(torch.isfinite(p).all() for p in straight.parameters())
    part = str(tmp_path / "part")
    _fit(part, num_epochs=1, precision="16-mixed")
    resumed = _fit(
        part, ckpt_path=os.path.join(part, "checkpoints", "last.ckpt"), precision="16-mixed"
    )
    _assert_close(straight, resumed, tol=1e-3)


def test_accumulating_two_batches_of_4_steps_like_one_batch_of_8(tmp_path) -> None:
    probe = Probe()
    accumulated = _fit(str(tmp_path / "acc"), batch_size=4, probe=probe, accumulate_grad_batches=2)
    assert probe.steps[-1]["step"] == 8  # 2 epochs of 8 batches, one step per 2 batches
    _assert_close(accumulated.model, _fit(str(tmp_path / "full")).model, tol=1e-4)
    _assert_close(accumulated.model, _hand_written(None, accumulate=1), tol=1e-4)


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_clipping_bounds_every_step(tmp_path, algorithm: str) -> None:
    clip = 1e-3
    torch.manual_seed(0)
    start = ConvNet().state_dict()
    model = _fit(
        str(tmp_path),
        num_epochs=1,
        momentum=0.0,
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
    ).model
    steps = 4  # 32 images, batch 8
    deltas = [(p.detach().cpu() - start[n]).flatten() for n, p in model.named_parameters()]
    total = torch.cat(deltas)
    if algorithm == "norm":  # plain SGD: each step moves the weights by lr * clipped gradient
        assert total.norm() <= steps * LR * clip * (1 + 1e-3)
    else:
        assert total.abs().max() <= steps * LR * clip * (1 + 1e-3)
    assert total.abs().max() > 0


def test_compile_with_inductor_keeps_plain_names_and_matches_eager(tmp_path) -> None:
    compiled = _fit(str(tmp_path / "compiled"), compile=True)
    assert compiled._compiled_call_impl is not None
    ckpt = load_checkpoint(os.path.join(tmp_path, "compiled", "checkpoints", "last.ckpt"))
    assert list(ckpt["state_dict"]) == list(ModelEMAAdapter(ConvNet()).state_dict())
    _assert_close(compiled, _fit(str(tmp_path / "eager")), tol=1e-3)


def test_channels_last_on_the_gpu(tmp_path) -> None:
    probe = Probe()
    model = _fit(str(tmp_path / "nhwc"), probe=probe, channels_last=True)
    assert all(s["nhwc"] and s["weight_nhwc"] and s["device"] == "cuda" for s in probe.steps)
    _assert_close(model, _fit(str(tmp_path / "nchw")), tol=1e-3)


def test_batches_come_from_pinned_memory_and_arrive_on_the_gpu(tmp_path) -> None:
    loader = build_train_dataloader(Images(8, 0), 4)
    assert loader.pin_memory
    assert next(iter(loader))["images"].is_pinned()
    probe = Probe()
    _fit(str(tmp_path), num_epochs=1, probe=probe)
    assert {s["device"] for s in probe.steps} == {"cuda"}


def test_lightning_engine_with_compile_and_channels_last(tmp_path) -> None:
    pytest.importorskip("lightning")
    from vistrain.pl import CallbackWrapper, TrainingModule
    from vistrain.pl.fit import build_lightning_trainer

    torch.manual_seed(0)
    model = ModelEMAAdapter(ConvNet(), decay=0.8)
    optimizer = torch.optim.SGD(model.model.parameters(), lr=LR, momentum=0.9)
    connector = DataConnector({"images": "images"})
    probe = Probe()
    module = TrainingModule(
        model, _loss(), optimizer, None, connector, connector,
        train_dataloader=build_train_dataloader(Images(32, 0), 8, seed=0, drop_last=False),
        test_dataloader=build_test_dataloader(Images(16, 1), 8),
        output_dir=str(tmp_path), tensorboard=False, compile=True, channels_last=True,
    )  # fmt: skip
    callbacks = [EMACallback(), probe]
    build_lightning_trainer(
        str(tmp_path), num_epochs=2, callbacks=[CallbackWrapper(cb) for cb in callbacks]
    ).fit(module)
    assert all(s["nhwc"] and s["device"] == "cuda" for s in probe.steps)
    _assert_close(model, _fit(str(tmp_path / "native")), tol=1e-3)
