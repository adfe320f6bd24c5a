from __future__ import annotations

import json
import os

import pytest
import torch

from trainer_fixtures import (
    RecordingCallback,
    ToyModel,
    toy_connectors,
    toy_loader,
    toy_loss_module,
)
from vistrain.engine.callbacks.base import Callback, callbacks_overriding
from vistrain.engine.optim import warmup_cosine
from vistrain.engine.trainer import Trainer


def make_trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    train_conn, test_conn = toy_connectors()
    kwargs.setdefault("num_epochs", 2)
    return Trainer(
        device=kwargs.pop("device", "cpu"),
        output_dir=str(tmp_path),
        train_dataloader=kwargs.pop("train_loader", toy_loader(12, 4)),
        test_dataloader=kwargs.pop("test_loader", toy_loader(8, 4, shuffle=False)),
        train_data_connector=train_conn,
        test_data_connector=test_conn,
        callbacks=callbacks,
        **kwargs,
    )


def test_epoch_based_hook_order_with_validation(tmp_path) -> None:
    rec = RecordingCallback()
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make_trainer(tmp_path, [rec], num_epochs=2).fit(model, [opt], None, toy_loss_module())
    epoch = (
        ["train_epoch_start"]
        + ["train_batch_start", "train_batch_end"] * 3
        + [
            "train_epoch_end",
            "test_epoch_start",
            "test_batch_end",
            "test_batch_end",
            "test_epoch_end",
            "validation_end",
        ]
    )
    assert rec.hooks() == ["setup"] + epoch * 2 + ["fit_end"]
    # global_step counts optimizer steps; on_train_batch_end sees the step just taken
    ends = [c for c in rec.calls if c[0] == "train_batch_end"]
    assert [c[2] for c in ends] == [1, 2, 3, 4, 5, 6]
    starts = [c for c in rec.calls if c[0] == "train_batch_start"]
    assert [c[2] for c in starts] == [0, 1, 2, 3, 4, 5]
    assert [c[3] for c in ends] == [0, 1, 2, 0, 1, 2]
    assert ("train_epoch_end", 1, 6) in rec.calls


def test_step_based_validation_and_step_limit(tmp_path) -> None:
    rec = RecordingCallback(epoch_based=False)
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = make_trainer(
        tmp_path,
        [rec],
        num_epochs=-1,
        num_steps=5,
        val_check_interval=2,
        check_val_every_n_epoch=None,
    )
    trainer.fit(model, opt, None, toy_loss_module())
    assert trainer.global_step == 5
    val_steps = [c[2] for c in rec.calls if c[0] == "test_epoch_start"]
    assert val_steps == [2, 4]
    # 3 batches per epoch: epoch 0 ends normally, epoch 1 is cut at step 5 without epoch-end hooks
    assert [c[1:] for c in rec.calls if c[0] == "train_epoch_end"] == [(0, 3)]
    # after step-based validation, training continues in train mode
    idx = rec.hooks().index("test_epoch_end")
    assert rec.hooks()[idx + 1 : idx + 3] == ["validation_end", "train_batch_start"]
    # on_validation_end sees the validation's own logs at its step
    assert [c[1:] for c in rec.calls if c[0] == "validation_end"] == [
        (2, {"score": 1.0}),
        (4, {"score": 1.0}),
    ]


def test_two_optimizers_count_one_step(tmp_path) -> None:
    rec = RecordingCallback()
    model = ToyModel()
    opt_a = torch.optim.SGD(model.net[0].parameters(), lr=0.1)
    opt_b = torch.optim.Adam(model.net[3].parameters(), lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = make_trainer(tmp_path, [rec], num_epochs=1, test_loader=None)
    trainer.fit(model, [opt_a, opt_b], None, toy_loss_module())
    assert trainer.global_step == 3
    after = list(model.parameters())
    assert all(not torch.equal(b, a) for b, a in zip(before, after))
    assert "test_epoch_start" not in rec.hooks()


def test_scalar_logs_jsonl_and_tensorboard(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = warmup_cosine(opt, warmup_steps=2, num_epochs=2)
    make_trainer(tmp_path, [RecordingCallback()], num_epochs=2, log_every_n_steps=2).fit(
        model, [opt], [sched], toy_loss_module()
    )
    with open(os.path.join(tmp_path, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    tags = {r["tag"] for r in records}
    assert {"train/seen", "val/score", "lr", "epoch"} <= tags
    for record in records:
        assert set(record) >= {"tag", "value", "step", "epoch"}
    val = [r for r in records if r["tag"] == "val/score"]
    assert [(r["step"], r["epoch"]) for r in val] == [(3, 0), (6, 1)]
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "val/score" in acc.Tags()["scalars"]
    events = acc.Scalars("train/seen")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in events] == [0.0, 1.0, 2.0, 0.0, 1.0, 2.0]


def test_validation_does_not_change_training_randomness(tmp_path) -> None:
    def run(val: bool, out: str) -> torch.Tensor:
        torch.manual_seed(0)
        model = ToyModel(dropout=0.5)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        make_trainer(out, [], num_epochs=3, check_val_every_n_epoch=1 if val else None).fit(
            model, [opt], None, toy_loss_module()
        )
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(True, str(tmp_path / "a")), run(False, str(tmp_path / "b")))


def test_invalid_arguments(tmp_path) -> None:
    with pytest.raises(ValueError, match="num_epochs"):
        make_trainer(tmp_path, [], num_epochs=0)
    with pytest.raises(ValueError, match="val_check_interval"):
        make_trainer(tmp_path, [], val_check_interval=0)
    with pytest.raises(TypeError, match="callbacks\\[0\\]"):
        make_trainer(tmp_path, [object()])
    trainer = make_trainer(tmp_path, [])
    with pytest.raises(ValueError, match="at least one optimizer"):
        trainer.fit(ToyModel(), [], None, toy_loss_module())


def test_loader_handed_over_at_epoch_start_serves_and_describes_that_epoch(tmp_path) -> None:
    from vistrain.engine.callbacks import Callback

    short = toy_loader(8, 4)  # 2 batches instead of 3

    class SwitchLoader(Callback):
        def __init__(self) -> None:
            super().__init__()
            self.seen: list[tuple[int, int]] = []

        def on_train_epoch_start(self, trainer_state, model, loss_module) -> None:
            if trainer_state["current_epoch"] == 1:
                trainer_state["train_module"].set_train_dataloader(short)

        def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
            assert trainer_state["train_dataloader"] is not None
            self.seen.append((trainer_state["current_epoch"], trainer_state["num_train_batches"]))
            return None

    switch = SwitchLoader()
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = make_trainer(tmp_path, [switch], num_epochs=2, test_loader=None)
    trainer.fit(model, [opt], None, toy_loss_module())
    assert switch.seen == [(0, 3)] * 3 + [(1, 2)] * 2
    assert trainer.global_step == 5 and trainer.train_dataloader is short


def test_bad_device_output_folder_and_optimizer_are_refused_up_front(tmp_path) -> None:
    with pytest.raises(ValueError, match="is not a device"):
        make_trainer(tmp_path, [], device="gpu0")
    a_file = tmp_path / "runfile"
    a_file.write_text("")
    train_conn, _ = toy_connectors()
    with pytest.raises(NotADirectoryError, match="is a file"):
        Trainer("cpu", str(a_file), toy_loader(), None, train_conn, None, [])
    model, other = ToyModel(), ToyModel()
    trainer = make_trainer(tmp_path / "run", [], num_epochs=1)
    wrong = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"optimizers\[0\] \(SGD\) holds none of the parameters"):
        trainer.fit(model, [wrong], None, toy_loss_module())
    assert trainer.global_step == 0 and not (tmp_path / "run" / "metrics.jsonl").exists()
    frozen_head = torch.optim.SGD(model.net[0].parameters(), lr=0.1)  # a subset is fine
    trainer.fit(model, [frozen_head], None, toy_loss_module())
    assert trainer.global_step == 3


class _OnlyBatchEnd(Callback):
    """Overrides one batch hook; the others are the base no-ops."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[dict] = []

    def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.states.append(trainer_state)


def test_batch_hooks_reach_overriding_and_instance_set_hooks_in_list_order(tmp_path) -> None:
    rec = RecordingCallback()
    plain = Callback()  # no override: skipped, which nothing can observe
    only_end = _OnlyBatchEnd()
    set_on_instance = Callback()
    set_on_instance.on_train_batch_start = (  # type: ignore[method-assign]
        lambda state, model, loss_module, batch, batch_idx: rec.calls.append(("set", batch_idx))
    )
    callbacks = [plain, only_end, set_on_instance, rec]
    assert callbacks_overriding(callbacks, "on_train_batch_start") == [set_on_instance, rec]
    assert callbacks_overriding(callbacks, "on_train_batch_end") == [only_end, rec]
    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make_trainer(tmp_path, callbacks, num_epochs=1, test_loader=None).fit(
        model, [opt], None, toy_loss_module()
    )
    batch_calls = [c[0] if c[0] != "set" else f"set {c[1]}" for c in rec.calls]
    assert batch_calls[1:8] == [
        "train_epoch_start",
        "set 0",
        "train_batch_start",
        "train_batch_end",
        "set 1",
        "train_batch_start",
        "train_batch_end",
    ]
    # every hook call built its own TrainerState, holding that call's step and metrics
    assert [state["global_step"] for state in only_end.states] == [1, 2, 3]
    assert len({id(state) for state in only_end.states}) == 3
    assert all("metrics" in state and state["step_end"] for state in only_end.states)


def test_every_batch_end_state_equals_a_fresh_state_and_is_its_own_dict(tmp_path) -> None:
    """on_train_batch_end's states come from a per-epoch snapshot; they must not go stale.

    Step-based validation changes ``val_logs`` mid-epoch, a loader handed over at an epoch
    start changes the loader fields, accumulation leaves ``step_end`` False between steps.
    """
    short = toy_loader(8, 4)
    seen: list[dict] = []

    class Compare(Callback):
        def on_train_epoch_start(self, trainer_state, model, loss_module) -> None:
            if trainer_state["current_epoch"] == 1:
                trainer_state["train_module"].set_train_dataloader(short)

        def on_train_batch_end(self, trainer_state, model, loss_module, outputs, batch, batch_idx):
            fresh = trainer.loop.state(metrics=True)
            assert list(trainer_state) == list(fresh)
            assert all(trainer_state[key] is fresh[key] for key in fresh), batch_idx
            seen.append(dict(trainer_state))
            trainer_state["global_step"] = -1  # a hook's own copy: no later state sees this
            return None

    class Validation(Callback):
        def on_test_epoch_end(self, trainer_state, model):
            return {"score": float(trainer_state["global_step"])}

    model = ToyModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = make_trainer(
        tmp_path,
        [Compare(), Validation()],
        num_epochs=2,
        accumulate_grad_batches=2,
        val_check_interval=1,
        check_val_every_n_epoch=None,
    )
    trainer.fit(model, [opt], None, toy_loss_module())
    assert [s["step_end"] for s in seen] == [False, True, True, False, True]
    assert [s["num_train_batches"] for s in seen] == [3, 3, 3, 2, 2]
    assert [s["val_logs"].get("score") for s in seen] == [None, None, 1.0, 2.0, 2.0]
