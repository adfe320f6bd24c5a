from __future__ import annotations

import logging
import os
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dist_utils import run_distributed
from vistrain.engine.callbacks.base import Callback
from vistrain.engine.callbacks.yolox_callbacks import YOLOXSyncNormCallback
from vistrain.engine.connectors import DataConnector, LossConnector, data_key, pred_key
from vistrain.engine.loss_module import LossModule
from vistrain.engine.trainer import Trainer
from vistrain.op.norm import norm_float_tensors


def norm_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4),
        nn.GroupNorm(2, 4),
        nn.Flatten(),
        nn.LayerNorm(4 * 2 * 2),
        nn.BatchNorm1d(16).double(),
        nn.LayerNorm(16, elementwise_affine=False),
    )


def perturb(model: nn.Module, rank: int) -> None:
    """Give every parameter and floating buffer rank-specific values, and the counters too."""
    gen = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=gen, dtype=tensor.dtype) + 0.5)
            else:
                tensor.fill_(10 * rank + 3)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _sync_hooks(rank: int, world_size: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(norm_model())  # the hook must unwrap it
    inner = model.module
    out: dict[str, Any] = {}
    for hook in ("on_test_epoch_start", "on_save_checkpoint"):
        perturb(inner, rank)
        before = snapshot(inner)
        ptrs = [t.data_ptr() for t in norm_float_tensors(inner)]
        getattr(YOLOXSyncNormCallback(), hook)({}, model)
        out[hook] = {
            "before": before,
            "after": snapshot(inner),
            "same_storage": ptrs == [t.data_ptr() for t in norm_float_tensors(inner)],
        }
    return out


def _both(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    """One 2-process run for both distributed tests (each spawn costs seconds)."""
    return {
        "hooks": _sync_hooks(rank, world_size),
        "trainer": _trainer_checkpoint(rank, world_size, out_dir),
    }


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict[str, Any]]:
    return run_distributed(_both, 2, str(tmp_path_factory.mktemp("sync_norm")))


def test_sync_norm_averages_norm_state_across_two_ranks(two_rank_results) -> None:
    results = [r["hooks"] for r in two_rank_results]
    for hook in ("on_test_epoch_start", "on_save_checkpoint"):
        r0, r1 = results[0][hook], results[1][hook]
        assert r0["same_storage"] and r1["same_storage"]
        synced = 0
        for key, before0 in r0["before"].items():
            before1 = r1["before"][key]
            after0, after1 = r0["after"][key], r1["after"][key]
            assert after0.dtype == before0.dtype and after1.dtype == before1.dtype, key
            is_norm = not key.startswith("0.")  # module 0 is the conv
            if not before0.is_floating_point():  # num_batches_tracked: untouched integers
                assert torch.equal(after0, before0) and torch.equal(after1, before1), key
                assert not torch.equal(before0, before1)
            elif is_norm:
                expected = (before0.double() + before1.double()) / 2
                assert not torch.equal(before0, before1), key
                torch.testing.assert_close(after0.double(), expected, rtol=1e-6, atol=1e-6)
                assert torch.equal(after0, after1), key
                synced += 1
            else:  # a conv weight is not a norm layer's state
                assert torch.equal(after0, before0) and torch.equal(after1, before1), key
        # BN2d: w, b, mean, var; GN: w, b; LN: w, b; BN1d (float64): w, b, mean, var.
        assert synced == 12
        assert r0["after"]["5.running_mean"].dtype == torch.float64


def test_single_process_is_a_silent_no_op(caplog) -> None:
    model = norm_model()
    perturb(model, 0)
    before = snapshot(model)
    cb = YOLOXSyncNormCallback()
    with caplog.at_level(logging.DEBUG):
        cb.on_test_epoch_start({}, model)  # type: ignore[arg-type]
        cb.on_save_checkpoint({}, model)  # type: ignore[arg-type]
    after = snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert caplog.records == []


# ---------------------------------------------------- with the native Trainer's checkpoints


class RankData(Dataset[dict[str, torch.Tensor]]):
    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 6, generator=gen) * torch.arange(1, 9).unsqueeze(1)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[idx], "y": self.x[idx, :2]}


class BNModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pred": self.out(self.bn(self.lin(x)))}


class SaveAtEnd(Callback):
    """Collects the checkpoint state at the end of the epoch (every rank, as the engine wants)."""

    def __init__(self) -> None:
        super().__init__()
        self.local_before: dict[str, torch.Tensor] = {}
        self.saved: dict[str, torch.Tensor] = {}

    def on_train_epoch_end(self, trainer_state, model, loss_module) -> None:
        bn = model.module.bn if hasattr(model, "module") else model.bn
        self.local_before = {k: v.clone() for k, v in bn.state_dict().items()}
        ckpt = trainer_state["train_module"].checkpoint_state()
        self.saved = {
            k[3:]: v.clone() for k, v in ckpt["state_dict"].items() if k.startswith("bn.")
        }


def _trainer_checkpoint(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    from torch.utils.data.distributed import DistributedSampler

    torch.manual_seed(0)
    data = RankData()
    loader = DataLoader(data, batch_size=2, sampler=DistributedSampler(data, shuffle=False))
    conn = DataConnector({"x": "x"})
    saver = SaveAtEnd()
    trainer = Trainer(
        device="cpu",
        output_dir=os.path.join(out_dir, str(rank)),
        train_dataloader=loader,
        test_dataloader=None,
        train_data_connector=conn,
        test_data_connector=conn,
        callbacks=[YOLOXSyncNormCallback(), saver],
        num_epochs=1,
        tensorboard=False,
    )
    model = BNModel()
    losses = LossModule(
        [
            {
                "loss": lambda pred, target: ((pred - target) ** 2).mean(),
                "connector": LossConnector({"pred": pred_key("pred"), "target": data_key("y")}),
            }
        ]
    )
    trainer.fit(model, [torch.optim.SGD(model.parameters(), lr=0.01)], None, losses)
    return {"before": saver.local_before, "saved": saver.saved}


def test_checkpoint_holds_synced_statistics_two_ranks(two_rank_results) -> None:
    r0, r1 = (r["trainer"] for r in two_rank_results)
    for key in ("running_mean", "running_var"):
        assert not torch.equal(r0["before"][key], r1["before"][key])  # ranks saw other data
        expected = (r0["before"][key] + r1["before"][key]) / 2
        torch.testing.assert_close(r0["saved"][key], expected)
        assert torch.equal(r0["saved"][key], r1["saved"][key])
    assert int(r0["saved"]["num_batches_tracked"]) == int(r0["before"]["num_batches_tracked"])
