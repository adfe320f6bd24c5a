"""Small models, data, a recording callback and real engine runs shared by the tests.

Tests of callbacks drive them through ``run_toy`` (the native Trainer or the Lightning
engine) rather than replaying the hook order by hand, so a change of loop order or state
contents fails them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from vistrain.engine.callbacks import Callback
from vistrain.engine.connectors import DataConnector, LossConnector, data_key, pred_key
from vistrain.engine.loss_module import LossModule


class ToyDataset(Dataset[dict[str, Any]]):
    """Seeded regression samples: x (8,), y (2,)."""

    def __init__(self, num: int = 24, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(num, 8, generator=gen)
        self.y = self.x[:, :2] * 2.0 - self.x[:, 2:4] + 0.1 * torch.randn(num, 2, generator=gen)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        return {"x": self.x[idx], "y": self.y[idx], "idx": idx}


class ToyModel(nn.Module):
    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pred": self.net(x)}


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((pred - target) ** 2).mean()


def toy_loss_module() -> LossModule:
    return LossModule(
        [
            {
                "loss": mse,
                "connector": LossConnector({"pred": pred_key("pred"), "target": data_key("y")}),
                "name": "mse",
            }
        ]
    )


def toy_connectors() -> tuple[DataConnector, DataConnector]:
    return DataConnector({"x": "x"}), DataConnector({"x": "x"})


def toy_loader(
    num: int = 24, batch_size: int = 4, shuffle: bool = True, num_workers: int = 0
) -> DataLoader[Any]:
    return DataLoader(
        ToyDataset(num), batch_size=batch_size, shuffle=shuffle, num_workers=num_workers
    )


class RecordingCallback(Callback):
    """Records every hook call as (hook, epoch, global_step, extra)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.calls: list[tuple[Any, ...]] = []

    def setup(self) -> None:
        self.calls.append(("setup",))

    def on_train_epoch_start(self, trainer_state, model, loss_module) -> None:
        self.calls.append(
            ("train_epoch_start", trainer_state["current_epoch"], trainer_state["global_step"])
        )
        assert "optimizers" in trainer_state and "lr_schedulers" in trainer_state

    def on_train_batch_start(self, trainer_state, model, loss_module, batch, batch_idx) -> None:
        self.calls.append(
            (
                "train_batch_start",
                trainer_state["current_epoch"],
                trainer_state["global_step"],
                batch_idx,
            )
        )
        assert model.training

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        self.calls.append(
            (
                "train_batch_end",
                trainer_state["current_epoch"],
                trainer_state["global_step"],
                batch_idx,
            )
        )
        assert "optimizers" in trainer_state and "metrics" in trainer_state
        return {"seen": float(batch_idx)}

    def on_train_epoch_end(self, trainer_state, model, loss_module) -> None:
        self.calls.append(
            ("train_epoch_end", trainer_state["current_epoch"], trainer_state["global_step"])
        )
        assert "optimizers" in trainer_state and "lr_schedulers" in trainer_state

    def on_test_epoch_start(self, trainer_state, model) -> None:
        self.calls.append(
            ("test_epoch_start", trainer_state["current_epoch"], trainer_state["global_step"])
        )
        assert not model.training

    def on_test_batch_end(
        self, trainer_state, model, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        self.calls.append(("test_batch_end", batch_idx, dataloader_idx))

    def on_test_epoch_end(self, trainer_state, model):
        self.calls.append(
            ("test_epoch_end", trainer_state["current_epoch"], trainer_state["global_step"])
        )
        return {"score": 1.0}

    def on_validation_end(self, trainer_state, model) -> None:
        self.calls.append(
            (
                "validation_end",
                trainer_state["global_step"],
                dict(trainer_state["val_logs"]),
            )
        )
        assert not model.training

    def on_fit_end(self, trainer_state, model) -> None:
        self.calls.append(("fit_end", trainer_state["global_step"]))

    def hooks(self) -> list[str]:
        return [c[0] for c in self.calls]


STEP_OPTIONS = (
    "precision",
    "accumulate_grad_batches",
    "gradient_clip_val",
    "gradient_clip_algorithm",
)
"""Step arguments: the native ``Trainer``'s, the ``TrainingModule``'s under Lightning."""

ENGINES = ("native", "lightning")
"""The two engines a callback test can run under (``run_toy``'s ``engine``)."""


def run_toy(
    engine: str,
    output_dir: str,
    callbacks: list[Callback],
    *,
    num_train: int = 24,
    batch_size: int = 4,
    num_epochs: int = 2,
    model: nn.Module | None = None,
    ckpt_path: str | None = None,
    train_loader: DataLoader[Any] | None = None,
    connectors: tuple[DataConnector, DataConnector] | None = None,
    **loop: Any,
) -> nn.Module:
    """Train the seeded toy regression under a real engine with ``callbacks``; return the model.

    ``engine`` is ``"native"`` (``Trainer``) or ``"lightning"`` (``TrainingModule`` under
    ``lightning.pytorch.Trainer``); ``loop`` holds the loop arguments both take
    (``num_steps``, ``check_val_every_n_epoch``, ``val_check_interval``, the
    ``STEP_OPTIONS``, ...). Validation runs
    on 8 unshuffled samples; scalars go to ``output_dir``. ``train_loader`` and
    ``connectors`` (train, test) replace the toy ones (the loss still reads ``pred``, ``y``).
    """
    from vistrain.engine.trainer import Trainer

    torch.manual_seed(0)
    model = ToyModel() if model is None else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train = toy_loader(num_train, batch_size) if train_loader is None else train_loader
    test = toy_loader(8, 4, shuffle=False)
    train_conn, test_conn = toy_connectors() if connectors is None else connectors
    loop.setdefault("log_every_n_steps", 4)
    loop.setdefault("tensorboard", False)
    if engine == "native":
        trainer = Trainer(
            "cpu", output_dir, train, test, train_conn, test_conn, callbacks,
            num_epochs=num_epochs, **loop,
        )  # fmt: skip
        trainer.fit(model, optimizer, None, toy_loss_module(), ckpt_path)
        return model
    if engine != "lightning":
        raise ValueError(f"engine={engine!r}; use one of {ENGINES}.")
    from vistrain.pl import CallbackWrapper, TrainingModule
    from vistrain.pl.fit import build_lightning_trainer

    step_options = {key: loop.pop(key) for key in STEP_OPTIONS if key in loop}
    module = TrainingModule(
        model,
        toy_loss_module(),
        optimizer,
        None,
        train_conn,
        test_conn,
        train_dataloader=train,
        test_dataloader=test,
        output_dir=output_dir,
        log_every_n_steps=loop.pop("log_every_n_steps"),
        tensorboard=loop.pop("tensorboard"),
        resume_from=ckpt_path,
        max_time=loop.pop("max_time", None),
        loggers=loop.pop("loggers", None),
        **step_options,
    )
    pl_trainer = build_lightning_trainer(
        output_dir,
        num_epochs=num_epochs,
        callbacks=[CallbackWrapper(callback) for callback in callbacks],
        **loop,
    )
    pl_trainer.fit(module)
    return model


def read_metrics(output_dir: str) -> list[dict[str, Any]]:
    """The records of ``<output_dir>/metrics.jsonl`` in order."""
    import json
    import os

    with open(os.path.join(output_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


class ScriptedValidation(Callback):
    """An evaluator whose n-th validation returns ``results[n]``.

    A float becomes ``{key: value}``; a dict is returned as it is. Records the global step
    of every validation in ``steps``.
    """

    def __init__(self, results: Sequence[float | dict[str, float]], key: str = "score") -> None:
        super().__init__()
        self.results = list(results)
        self.key = key
        self.steps: list[int] = []

    def on_test_epoch_end(self, trainer_state: Any, model: nn.Module) -> dict[str, float]:
        self.steps.append(trainer_state["global_step"])
        result = self.results[len(self.steps) - 1]
        return dict(result) if isinstance(result, dict) else {self.key: result}
