"""Precision, accumulation and clipping in both engines: a hand-written loop's numbers.

Every test runs a real engine (``run_toy``); the reference is a plain PyTorch loop written
out here (autocast, divide, backward, clip, step, zero).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer_fixtures import (
    ENGINES,
    RecordingCallback,
    ToyModel,
    mse,
    read_metrics,
    run_toy,
    toy_loader,
)
from vistrain.engine.callbacks import Callback
from vistrain.engine.callbacks.ema import EMACallback
from vistrain.engine.optim import LRSchedulerConfig, LRSchedulerWrapper
from vistrain.engine.trainer import Trainer
from vistrain.model.adapter import ModelEMAAdapter

NUM_TRAIN = 20  # 5 batches of 4: windows of 2 are [0, 1], [2, 3] and the partial [4]
EPOCHS = 2


def _hand_written(accumulate: int, clip: float | None, precision: str) -> nn.Module:
    """The loop the engines must reproduce bit for bit, written without vistrain."""
    torch.manual_seed(0)
    model = ToyModel()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = toy_loader(NUM_TRAIN, 4)
    dtype = {"bf16-mixed": torch.bfloat16, "32": None}[precision]
    for _ in range(EPOCHS):
        batches = list(loader)
        for idx, batch in enumerate(batches):
            with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = mse(model(batch["x"])["pred"], batch["y"])
            (loss / accumulate).backward()
            if (idx + 1) % accumulate == 0 or idx == len(batches) - 1:
                if clip is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.parametrize("engine", ENGINES)
def test_bf16_accumulated_clipped_training_equals_a_hand_written_loop(tmp_path, engine) -> None:
    options = {"precision": "bf16-mixed", "accumulate_grad_batches": 2, "gradient_clip_val": 1.0}
    recorder = RecordingCallback()
    got = run_toy(
        engine, str(tmp_path), [recorder], num_train=NUM_TRAIN, num_epochs=EPOCHS, **options
    )
    expected = _hand_written(2, 1.0, "bf16-mixed")
    for (name, want), have in zip(expected.state_dict().items(), got.state_dict().values()):
        assert torch.equal(want, have), name
    # The options matter: the full-precision, unclipped, unaccumulated loop differs.
    plain = _hand_written(1, None, "32")
    assert not torch.equal(plain.net[0].weight, got.net[0].weight)
    # Hooks run per micro-batch; global_step counts optimizer steps (3 per epoch).
    ends = [c for c in recorder.calls if c[0] == "train_batch_end"]
    assert [c[2] for c in ends] == [0, 1, 1, 2, 3, 3, 4, 4, 5, 6]
    assert [c[1] for c in recorder.calls if c[0] == "fit_end"] == [6]
    # train/grad_norm is written on log steps (log_every_n_steps=4: steps 1 and 4), once each.
    norms = [r["step"] for r in read_metrics(str(tmp_path)) if r["tag"] == "train/grad_norm"]
    assert norms == [1, 4]


class GradProbe(Callback):
    """Records the gradient norm and global step seen by on_before_optimizer_step."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, float, bool]] = []

    def on_before_optimizer_step(self, trainer_state, model, optimizer) -> None:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]]
        norm = float(torch.nn.utils.get_total_norm([g for g in grads if g is not None]))
        self.seen.append(
            (trainer_state["global_step"], norm, isinstance(optimizer, torch.optim.SGD))
        )


@pytest.mark.parametrize("engine", ENGINES)
def test_before_optimizer_step_sees_unscaled_unclipped_window_gradients(tmp_path, engine) -> None:
    probe = GradProbe()
    run_toy(
        engine,
        str(tmp_path),
        [probe],
        num_train=NUM_TRAIN,
        num_epochs=1,
        precision="16-mixed",
        accumulate_grad_batches=2,
        gradient_clip_val=1e-3,
    )
    assert [step for step, _, _ in probe.seen] == [0, 1, 2]  # once per step, before it
    assert all(is_plain for _, _, is_plain in probe.seen)  # the run's own optimizer
    # The first window's true gradient (fp32 reference): unscaled (the scale is 2**16) and
    # not yet clipped to 1e-3.
    torch.manual_seed(0)
    model = ToyModel()
    batches = list(toy_loader(NUM_TRAIN, 4))
    for batch in batches[:2]:
        (mse(model(batch["x"])["pred"], batch["y"]) / 2).backward()
    want = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    assert want > 0.1
    assert probe.seen[0][1] == pytest.approx(want, rel=1e-2)


class Overflow(Callback):
    """Makes the gradients of the step after ``at_step`` infinite, before unscaling."""

    def __init__(self, at_step: int) -> None:
        super().__init__()
        self.at_step = at_step
        self.skipped_seen: list[tuple[int, bool, bool]] = []

    def on_train_batch_start(self, trainer_state, model, loss_module, batch, batch_idx) -> None:
        if trainer_state["global_step"] == self.at_step:
            batch["x"][0, 0] = float("inf")

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        self.skipped_seen.append(
            (trainer_state["global_step"], trainer_state["step_end"], trainer_state["step_skipped"])
        )


class Snapshot(Callback):
    """Keeps weights, EMA weights and learning rate after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.after: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
        inner = model.module if hasattr(model, "module") else model
        self.after[trainer_state["global_step"]] = (
            inner.model.net[0].weight.detach().clone(),
            inner.ema_model.net[0].weight.detach().clone(),
            trainer_state["optimizers"][0].param_groups[0]["lr"],
        )


@pytest.mark.parametrize("engine", ENGINES)
def test_fp16_overflow_skips_the_step_and_moves_neither_schedule_nor_ema(tmp_path, engine) -> None:
    torch.manual_seed(0)
    model = ModelEMAAdapter(ToyModel(), decay=0.5)
    overflow, snap = Overflow(at_step=2), Snapshot()
    callbacks = [overflow, EMACallback(), snap]
    if engine == "native":
        optimizer = torch.optim.SGD(model.model.parameters(), lr=0.05)
        sched = LRSchedulerWrapper(
            optimizer, [LRSchedulerConfig(torch.optim.lr_scheduler.StepLR, {"step_size": 1,
                                                                            "gamma": 0.5},
                                          epoch_based=False)]
        )  # fmt: skip
        trainer = Trainer(
            "cpu", str(tmp_path), toy_loader(NUM_TRAIN, 4), None, *_connectors(), callbacks,
            num_epochs=2, num_steps=4, precision="16-mixed", log_every_n_steps=1,
            tensorboard=False,
        )  # fmt: skip
        trainer.fit(model, optimizer, sched, _loss())
    else:
        run_toy(
            engine, str(tmp_path), callbacks, model=model, num_train=NUM_TRAIN, num_epochs=2,
            num_steps=4,
            precision="16-mixed", log_every_n_steps=1,
        )  # fmt: skip
    # Step 3 (the batch after step 2) overflowed; so did step 1, as fp16 runs do at the
    # scaler's initial scale of 2**16. Both were skipped and counted, and neither moved the
    # weights, the EMA or the schedule.
    assert [s[0] for s in overflow.skipped_seen if s[2]] == [1, 3]
    assert all(step_end for _, step_end, _ in overflow.skipped_seen)  # no accumulation
    weights2, ema2, lr2 = snap.after[2]
    weights3, ema3, lr3 = snap.after[3]
    assert torch.equal(weights2, weights3) and torch.equal(ema2, ema3)
    weights4, ema4, _ = snap.after[4]
    assert not torch.equal(weights3, weights4) and not torch.equal(ema3, ema4)
    assert torch.equal(snap.after[1][1], ModelEMAAdapter(_seeded_toy()).ema_model.net[0].weight)
    if engine == "native":
        # Steps 2 and 4 advanced the schedule (0.05 -> 0.025 -> 0.0125); 1 and 3 did not.
        assert snap.after[1][2] == 0.05 and lr2 == lr3 == 0.025 and snap.after[4][2] == 0.0125
    records = read_metrics(str(tmp_path))
    skipped = {r["step"]: r["value"] for r in records if r["tag"] == "train/skipped_steps"}
    # num_steps counts skipped steps too, in both engines (Lightning's own count does not).
    assert skipped == {1: 1, 2: 1, 3: 2, 4: 2} and max(snap.after) == 4


def _seeded_toy() -> ToyModel:
    torch.manual_seed(0)
    return ToyModel()


def _connectors():
    from trainer_fixtures import toy_connectors

    return toy_connectors()


def _loss():
    from trainer_fixtures import toy_loss_module

    return toy_loss_module()


def test_scaler_backs_off_after_the_overflow(tmp_path) -> None:
    trainer = Trainer(
        "cpu", str(tmp_path), toy_loader(NUM_TRAIN, 4), None, *_connectors(), [Overflow(2)],
        num_epochs=1, precision="16-mixed", tensorboard=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = ToyModel()
    trainer.fit(model, torch.optim.SGD(model.parameters(), lr=0.05), None, _loss())
    stepper = trainer.loop.stepper
    assert stepper.skipped_steps == 2  # the first step (scale 2**16 overflows) and step 3
    assert stepper.scaler.get_scale() == 2.0**16 * stepper.scaler.get_backoff_factor() ** 2


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("precision", "fp16", "precision='fp16' is not one of 32, bf16-mixed, 16-mixed"),
        ("accumulate_grad_batches", 0, "accumulate_grad_batches=0 must be an integer >= 1"),
        ("gradient_clip_val", math.inf, "gradient_clip_val=inf must be a finite number > 0"),
        ("gradient_clip_algorithm", "l1", "gradient_clip_algorithm='l1' is not one of norm"),
    ],
)
def test_bad_step_options_are_refused_before_training(tmp_path, option, value, message) -> None:
    from vistrain.pl import TrainingModule

    with pytest.raises(ValueError, match=message):
        Trainer("cpu", str(tmp_path), None, None, None, None, [], **{option: value})
    model = ToyModel()
    with pytest.raises(ValueError, match=message):
        TrainingModule(
            model, _loss(), torch.optim.SGD(model.parameters(), lr=0.1), None, None, None,
            **{option: value},
        )  # fmt: skip
