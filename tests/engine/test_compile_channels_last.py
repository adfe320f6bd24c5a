"""``compile`` and ``channels_last`` on both engines; batch copies to a device.

Compilation uses the ``eager`` backend here (graph capture through dynamo, then the same
kernels): inductor on a CPU needs a C compiler and about a minute per model, too slow for
the suite; tests/cuda runs inductor on a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch._dynamo
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vistrain.data.loader import build_test_dataloader, build_train_dataloader
from vistrain.engine.callbacks import Callback
from vistrain.engine.callbacks.checkpoint import CheckpointCallback
from vistrain.engine.callbacks.ema import EMACallback
from vistrain.engine.checkpoint_io import load_checkpoint
from vistrain.engine.connectors import DataConnector, LossConnector, data_key, pred_key
from vistrain.engine.device_setup import move_to_device
from vistrain.engine.loss_module import LossModule
from vistrain.engine.trainer import Trainer
from vistrain.model.adapter import ModelEMAAdapter

CHANNELS_LAST = torch.channels_last


class Images(Dataset[dict[str, Any]]):
    """Seeded 3x8x8 images with one of 3 labels."""

    def __init__(self, num: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(num, 3, 8, 8, generator=gen)
        self.labels = torch.randint(0, 3, (num,), generator=gen)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"images": self.images[idx], "labels": self.labels[idx]}


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.norm(self.conv(images)).relu().mean(dim=(2, 3)))}


class LayoutProbe(Callback):
    """Records whether each training / test batch and the conv weight were channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.train: list[tuple[bool, bool]] = []
        self.test: list[bool] = []

    def on_train_batch_start(self, trainer_state, model, loss_module, batch, batch_idx) -> None:
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        self.train.append(
            (
                batch["images"].is_contiguous(memory_format=CHANNELS_LAST),
                conv.weight.is_contiguous(memory_format=CHANNELS_LAST),
            )
        )

    def on_test_batch_end(self, trainer_state, model, outputs, batch, batch_idx, **kw) -> None:
        self.test.append(batch["images"].is_contiguous(memory_format=CHANNELS_LAST))


def _loss() -> LossModule:
    return LossModule(
        {
            "loss": nn.CrossEntropyLoss(),
            "connector": LossConnector({"input": pred_key("logits"), "target": data_key("labels")}),
            "name": "ce",
        }
    )


def _fit(
    out: str,
    engine: str = "native",
    num_epochs: int = 2,
    ckpt_path: str | None = None,
    callbacks: list[Callback] | None = None,
    **options: Any,
) -> ModelEMAAdapter:
    torch.manual_seed(0)
    model = ModelEMAAdapter(TinyConvNet(), decay=0.8)
    optimizer = torch.optim.SGD(model.model.parameters(), lr=0.1, momentum=0.9)
    train = DataLoader(Images(16, 0), batch_size=4, shuffle=True)
    test = DataLoader(Images(8, 1), batch_size=4)
    connector = DataConnector({"images": "images"})
    all_callbacks: list[Callback] = [
        EMACallback(),
        CheckpointCallback(save_prefix=out, async_save=False),
        *(callbacks or []),
    ]
    if engine == "native":
        trainer = Trainer(
            "cpu", out, train, test, connector, connector, all_callbacks,
            num_epochs=num_epochs, tensorboard=False, **options,
        )  # fmt: skip
        trainer.fit(model, optimizer, None, _loss(), ckpt_path=ckpt_path)
        return model
    from vistrain.pl import CallbackWrapper, TrainingModule
    from vistrain.pl.fit import build_lightning_trainer

    module = TrainingModule(
        model, _loss(), optimizer, None, connector, connector,
        train_dataloader=train, test_dataloader=test, output_dir=out, tensorboard=False,
        resume_from=ckpt_path, **options,
    )  # fmt: skip
    build_lightning_trainer(
        out, num_epochs=num_epochs, callbacks=[CallbackWrapper(cb) for cb in all_callbacks]
    ).fit(module)
    return model


def _assert_close(a: nn.Module, b: nn.Module, exact: bool) -> None:
    state_a, state_b = a.state_dict(), b.state_dict()
    assert list(state_a) == list(state_b)
    for key, value in state_a.items():
        if exact:
            assert torch.equal(value, state_b[key]), key
        else:
            torch.testing.assert_close(value, state_b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_channels_last_trains_like_the_default_layout(tmp_path, engine: str) -> None:
    if engine == "lightning":
        pytest.importorskip("lightning")
    plain = _fit(str(tmp_path / "plain"), engine)
    probe = LayoutProbe()
    nhwc = _fit(str(tmp_path / "nhwc"), engine, callbacks=[probe], channels_last=True)
    # Every training batch and the weights were channels-last, and so were test batches.
    assert probe.train == [(True, True)] * 8
    assert probe.test and all(probe.test)
    assert nhwc.model.conv.weight.is_contiguous(memory_format=CHANNELS_LAST)
    assert not nhwc.model.conv.weight.is_contiguous()  # really another layout
    _assert_close(plain, nhwc, exact=False)
    # The default leaves the layout alone.
    default_probe = LayoutProbe()
    _fit(str(tmp_path / "again"), engine, num_epochs=1, callbacks=[default_probe])
    assert default_probe.train == [(False, False)] * 4


COMPILED_RUNS = {"calls": 0}


def _counting_backend(graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
    """A ``torch.compile`` backend that runs the captured graph eagerly and counts the runs."""

    def run(*args: Any) -> Any:
        COMPILED_RUNS["calls"] += 1
        return graph.forward(*args)

    return run


if "vistrain_counting" not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(_counting_backend, name="vistrain_counting")


@pytest.mark.parametrize("engine", ["native", "lightning"])
def test_compiled_runs_keep_plain_names_and_resume_uncompiled_checkpoints_both_ways(
    tmp_path, engine: str
) -> None:
    if engine == "lightning":
        pytest.importorskip("lightning")
    straight = _fit(str(tmp_path / "straight"), engine)

    # Epoch 1 uncompiled, epoch 2 compiled from its checkpoint.
    first = str(tmp_path / "first")
    _fit(first, engine, num_epochs=1)
    before = COMPILED_RUNS["calls"]
    resumed = _fit(
        first,
        engine,
        ckpt_path=os.path.join(first, "checkpoints", "last.ckpt"),
        compile="vistrain_counting",
    )
    # Every training step of epoch 2 (4) and every validation batch (2) ran compiled.
    assert COMPILED_RUNS["calls"] - before >= 6, "the model did not run compiled"
    assert resumed._compiled_call_impl is not None
    _assert_close(straight, resumed, exact=True)

    # Epoch 1 compiled, epoch 2 uncompiled from its checkpoint.
    second = str(tmp_path / "second")
    _fit(second, engine, num_epochs=1, compile="eager")
    ckpt = load_checkpoint(os.path.join(second, "checkpoints", "last.ckpt"))
    names = list(ckpt["state_dict"])
    assert names == list(straight.state_dict())
    assert not any("_orig_mod" in name for name in names)
    back = _fit(second, engine, ckpt_path=os.path.join(second, "checkpoints", "last.ckpt"))
    _assert_close(straight, back, exact=True)


def test_compiled_test_evaluates_a_plain_checkpoint(tmp_path) -> None:
    out = str(tmp_path / "run")
    _fit(out, compile="eager", num_epochs=1)
    state = load_checkpoint(os.path.join(out, "checkpoints", "last.ckpt"))["state_dict"]
    outputs: dict[str, list[torch.Tensor]] = {}
    for mode in ("plain", "compiled"):
        model = ModelEMAAdapter(TinyConvNet(), decay=0.8)
        model.load_state_dict(state)  # strict: the names are the plain model's

        class Keep(Callback):
            def __init__(self, kept: list[torch.Tensor]) -> None:
                super().__init__()
                self.kept = kept

            def on_test_batch_end(self, trainer_state, model, outputs_, batch, idx, **kw):
                self.kept.append(outputs_["logits"])

        connector = DataConnector({"images": "images"})
        tester = Trainer(
            "cpu", str(tmp_path / mode), None, DataLoader(Images(8, 1), batch_size=4),
            None, connector, [Keep(outputs.setdefault(mode, []))], tensorboard=False,
            compile=False if mode == "plain" else "eager", channels_last=mode == "compiled",
        )  # fmt: skip
        tester.test(model)
    for a, b in zip(outputs["plain"], outputs["compiled"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("option", "value", "error", "message"),
    [
        ("compile", "nope", ValueError, "compile='nope' is not True, False or a torch.compile"),
        ("compile", 1, TypeError, "compile=1 must be True, False"),
        ("channels_last", "yes", TypeError, "channels_last='yes' must be True or False"),
    ],
)
def test_bad_values_are_refused_before_training(
    tmp_path, option: str, value: Any, error: type[Exception], message: str
) -> None:
    connector = DataConnector({"images": "images"})
    with pytest.raises(error, match=message.replace("(", r"\(")):
        Trainer("cpu", str(tmp_path), None, None, None, connector, [], **{option: value})
    pytest.importorskip("lightning")
    from vistrain.pl import TrainingModule

    model = TinyConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(error, match=message.replace("(", r"\(")):
        TrainingModule(model, _loss(), optimizer, None, connector, connector, **{option: value})
    assert not os.listdir(tmp_path)


def test_batches_go_to_an_accelerator_non_blocking_and_to_the_cpu_blocking(monkeypatch) -> None:
    calls: list[tuple[str, bool]] = []
    original = torch.Tensor.to

    def recording_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append((str(args[0]), kwargs.get("non_blocking", False)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    batch = {"images": torch.zeros(2, 3, 4, 4), "boxes": [torch.zeros(1, 4)], "name": ["a"]}
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["images"].device.type == "meta" and moved["name"] == ["a"]
    assert calls == [("meta", True), ("meta", True)]
    calls.clear()
    move_to_device(batch, torch.device("cpu"))
    assert calls == [("cpu", False), ("cpu", False)]


def test_loaders_pin_memory_by_default_exactly_when_cuda_is_available() -> None:
    data = Images(8, 0)
    cuda = torch.cuda.is_available()
    assert build_train_dataloader(data, 4).pin_memory is cuda
    assert build_test_dataloader(data, 4).pin_memory is cuda
    assert build_train_dataloader(data, 4, pin_memory=True).pin_memory is True
    assert build_test_dataloader(data, 4, pin_memory=False).pin_memory is False
