"""EMA adapters: a model wrapper that keeps an exponential moving average of its weights.

Wrap the model once, before building the optimizer and before DDP::

    model = ModelExpEMAAdapter(MyNet(), decay=0.9998, warmup_steps=2000)
    model = DistributedDataParallel(model)      # optional
    # after every optimizer step (EMACallback does this):
    find_ema_adapters(model)[0].update(global_step)

After optimizer step ``k`` every floating tensor ``e`` of the EMA copy becomes
``e <- d_k * e + (1 - d_k) * m`` where ``m`` is the same-named tensor of the trained model;
integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are copied, never averaged.

Why it is fast: the tensor pairs are collected by name (so reordered or shared modules
cannot mismatch them), grouped by device and dtype, and averaged with one fused
multi-tensor ``torch._foreach_lerp_`` per group. The update reads and writes each tensor
once, like a copy, and needs no device sync.

When the pairs are collected again (the one staleness rule): at the first update after the
adapter was converted (``adapter.to()``, ``.cuda()``, ``.double()``, also as part of a
parent module) or loaded (``adapter.load_state_dict``), and after ``refresh()``. Replacing
the trained model's tensors any other way (``adapter.model.load_state_dict(...,
assign=True)``, assigning a new submodule or buffer) needs a ``refresh()`` call; without it
the update keeps averaging the old tensors. Why not detect replacements: collecting the
pairs costs about 0.1x of a whole update of a ResNet-18 on one CPU thread (more on a GPU,
where the update itself is short), and every engine path that replaces tensors goes
through the adapter.

Why it resumes exactly: the EMA copy and the update counter are registered in the
adapter, so they travel in ``adapter.state_dict()`` and thus in every checkpoint.
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from typing_extensions import Self

from vistrain.common.distributed import unwrap_model

_WRAPPER_TYPES = (nn.parallel.DistributedDataParallel, nn.DataParallel)


@dataclass
class _Pairs:
    """The EMA copy's tensors paired with the model's, grouped for fused updates.

    Attributes:
        lerp_groups: ``(ema_tensors, model_tensors)`` per (device, dtype) of the EMA copy.
        copy_ema: Non-floating EMA buffers, overwritten from ``copy_src`` each update.
        copy_src: The model's matching non-floating buffers.
        cross_device: True when the EMA copy is pinned to its own device; the model's
            tensors are then moved (and cast) to the EMA tensor's device at each update.
    """

    lerp_groups: list[tuple[list[Tensor], list[Tensor]]]
    copy_ema: list[Tensor]
    copy_src: list[Tensor]
    cross_device: bool


def _named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters and buffers by name (shared tensors listed once)."""
    named: dict[str, Tensor] = dict(module.named_parameters())
    named.update(module.named_buffers())
    return named


def _pair_tensors(source: nn.Module, ema_model: nn.Module, cross_device: bool) -> _Pairs:
    """Pair ``ema_model``'s tensors with ``source``'s by name and group them by device/dtype.

    Raises:
        RuntimeError: If the two modules differ in names or shapes, or (unless
            ``cross_device``) in device or dtype.
    """
    model_named = _named_tensors(source)
    ema_named = _named_tensors(ema_model)
    if model_named.keys() != ema_named.keys():
        only_model = sorted(model_named.keys() - ema_named.keys())
        only_ema = sorted(ema_named.keys() - model_named.keys())
        raise RuntimeError(
            "The model and its EMA copy no longer have the same tensors (only in model: "
            f"{only_model[:5]}, only in EMA copy: {only_ema[:5]}); build a new adapter "
            "after changing the model's structure."
        )
    groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
    pairs = _Pairs([], [], [], cross_device)
    for name, ema_tensor in ema_named.items():
        model_tensor = model_named[name]
        if ema_tensor.shape != model_tensor.shape:
            raise RuntimeError(
                f"Tensor {name!r} has shape {tuple(model_tensor.shape)} in the model but "
                f"{tuple(ema_tensor.shape)} in the EMA copy; build a new adapter after "
                "reshaping the model."
            )
        if not cross_device and (
            ema_tensor.device != model_tensor.device or ema_tensor.dtype != model_tensor.dtype
        ):
            raise RuntimeError(
                f"Tensor {name!r} is {model_tensor.dtype} on {model_tensor.device} in the "
                f"model but {ema_tensor.dtype} on {ema_tensor.device} in the EMA copy; move "
                "or cast the adapter (adapter.to(...)), not adapter.model alone, or pass "
                "device= to keep the EMA copy elsewhere on purpose."
            )
        if ema_tensor.is_floating_point() or ema_tensor.is_complex():
            key = (ema_tensor.device, ema_tensor.dtype)
            ema_list, model_list = groups.setdefault(key, ([], []))
            ema_list.append(ema_tensor)
            model_list.append(model_tensor)
        else:
            pairs.copy_ema.append(ema_tensor)
            pairs.copy_src.append(model_tensor)
    pairs.lerp_groups = list(groups.values())
    return pairs


def _check_decay(decay: Any) -> float:
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"decay must be a float in (0, 1), got {type(decay).__name__} {decay!r}.")
    if not 0.0 < float(decay) < 1.0:
        raise ValueError(
            f"decay={decay!r} is outside (0, 1); use e.g. 0.9998 (closer to 1 = slower average)."
        )
    return float(decay)


class ModelEMAAdapter(nn.Module):
    """Wraps a model and keeps an exponential moving average (EMA) copy of its weights.

    The wrapped model trains as usual; ``update`` (called after each optimizer step,
    normally by ``EMACallback``) moves the frozen copy towards it with a constant decay
    ``d``: ``ema <- d * ema + (1 - d) * model``. ``forward`` runs ``model`` in training
    mode and, in eval mode, the EMA copy (or ``model`` when ``use_ema_during_test`` is
    False). The copy never trains: its parameters do not require grad and it stays in
    eval mode whatever ``train()`` is called with.

    State: ``state_dict()`` holds ``model.*``, ``ema_model.*`` and the ``num_updates``
    counter (updates applied), so a checkpoint of the adapter restores the EMA exactly.

    Use: build the optimizer from ``adapter.model.parameters()`` (the EMA parameters never
    get gradients). Under DDP with ``broadcast_buffers`` (the default) rank 0's buffers,
    the EMA copy's BatchNorm statistics included, overwrite the other ranks' at every
    forward; rank 0's EMA is the one checkpoints hold. After replacing the model's tensors
    other than through the adapter, call ``refresh()`` (see the module docstring).

    Args:
        model: The model to train. Wrap the bare model, then DDP the adapter.
        decay: EMA decay in (0, 1).
        use_ema_during_test: Evaluate with the EMA weights in eval mode.
        device: Keep the EMA copy on this device (e.g. ``"cpu"`` to save GPU memory).
            The copy is then pinned there: ``adapter.to(...)`` moves only the model,
            and each update moves the model's tensors to ``device`` (a synchronising
            transfer when the devices differ). None keeps it beside the model.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module``, is already wrapped (DDP,
            DataParallel, an EMA adapter) or cannot be deep-copied; if ``decay`` is
            not a number.
        ValueError: If ``decay`` is outside (0, 1) or ``device`` is not a device.
    """

    num_updates: Tensor

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,
        use_ema_during_test: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"model must be a torch.nn.Module, got {type(model).__name__}; "
                "pass the network itself."
            )
        if isinstance(model, (*_WRAPPER_TYPES, ModelEMAAdapter)):
            raise TypeError(
                f"model is already wrapped ({type(model).__name__}); wrap the bare model "
                "in the EMA adapter first and apply DDP/DataParallel to the adapter."
            )
        self.decay = _check_decay(decay)
        self.use_ema_during_test = bool(use_ema_during_test)
        try:
            self._ema_device = None if device is None else torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(
                f"device={device!r} is not a torch device; use e.g. 'cpu' or 'cuda:0'."
            ) from err

        try:
            ema_model = copy.deepcopy(model)
        except Exception as err:
            raise TypeError(
                f"Cannot deep-copy {type(model).__name__} to build its EMA copy ({err}); "
                "remove non-copyable attributes (open files, locks) from the model."
            ) from err
        for param in ema_model.parameters():
            param.grad = None
        ema_model.requires_grad_(False)
        ema_model.eval()
        if self._ema_device is not None:
            ema_model.to(self._ema_device)

        self.model = model
        self.ema_model = ema_model
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._pairs: _Pairs | None = None
        self.train(model.training)

    def decay_at(self, step: int) -> float:
        """Decay used for the update after optimizer step ``step`` (constant here)."""
        return self.decay

    def update(self, step: int | None = None) -> None:
        """Move the EMA copy towards the model after optimizer step ``step``.

        Args:
            step: The optimizer step just taken (1, 2, ...), e.g. the trainer's
                ``global_step``. None uses ``num_updates + 1`` (reading the counter, a
                device sync when it lives on an accelerator).

        Raises:
            ValueError: If ``step`` is not an integer >= 1.
        """
        if step is None:
            step = int(self.num_updates) + 1
        elif isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
            raise ValueError(
                f"step={step!r} must be the optimizer step just taken, an integer >= 1."
            )
        weight = 1.0 - self.decay_at(int(step))
        with torch.no_grad():
            pairs = self._model_pairs()
            for ema_tensors, model_tensors in pairs.lerp_groups:
                if pairs.cross_device:
                    target = ema_tensors[0]
                    model_tensors = [t.to(target.device, target.dtype) for t in model_tensors]
                torch._foreach_lerp_(ema_tensors, model_tensors, weight)
            if pairs.copy_ema:
                torch._foreach_copy_(pairs.copy_ema, pairs.copy_src)
            self.num_updates += 1

    def set(self, model: nn.Module | None = None) -> None:
        """Copy the weights of ``model`` into the EMA copy (as vis4d's ``set``).

        Every parameter and buffer of the EMA copy is overwritten by the same-named tensor
        of ``model``, converted to the EMA tensor's device and dtype. The update counter is
        left as it is.

        Args:
            model: A module with the same tensor names and shapes as the EMA copy; DDP or
                compile wrappers are looked through. None copies the trained model.

        Raises:
            RuntimeError: If ``model``'s tensors differ in names or shapes.
        """
        if model is None or model is self.model:
            pairs = self._model_pairs()
        else:
            pairs = _pair_tensors(unwrap_model(model), self.ema_model, cross_device=True)
        ema_tensors = [t for group in pairs.lerp_groups for t in group[0]] + pairs.copy_ema
        sources = [t for group in pairs.lerp_groups for t in group[1]] + pairs.copy_src
        with torch.no_grad():
            torch._foreach_copy_(ema_tensors, sources)

    def refresh(self) -> None:
        """Pair the tensors again at the next update.

        Call it after replacing the trained model's tensors other than through the adapter
        (``adapter.model.load_state_dict(..., assign=True)``, a new submodule or buffer).
        """
        self._pairs = None

    def _model_pairs(self) -> _Pairs:
        """The cached tensor pairs of ``model`` and ``ema_model``, collected when missing."""
        if self._pairs is None:
            self._pairs = _pair_tensors(
                self.model, self.ema_model, cross_device=self._ema_device is not None
            )
        return self._pairs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``model`` in training mode; in eval mode the EMA copy if enabled."""
        if self.training or not self.use_ema_during_test:
            return self.model(*args, **kwargs)
        return self.ema_model(*args, **kwargs)

    @property
    def eval_weights(self) -> str:
        """Which weights eval-mode forward uses: ``"ema"`` or ``"model"`` (for messages)."""
        return "ema" if self.use_ema_during_test else "model"

    def train(self, mode: bool = True) -> Self:
        """Set the training mode of the model; the EMA copy always stays in eval mode."""
        super().train(mode)
        self.ema_model.eval()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> Self:
        """Set ``requires_grad`` of the model's parameters; the EMA copy stays frozen."""
        super().requires_grad_(requires_grad)
        self.ema_model.requires_grad_(False)
        return self

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        """``to``/``cuda``/``double``...: re-pair later; keep a pinned EMA copy in place."""
        self.refresh()
        if self._ema_device is None or not recurse:
            return super()._apply(fn, recurse)
        for name, child in self.named_children():
            if name != "ema_model":
                child._apply(fn)
        return super()._apply(fn, recurse=False)

    def _load_from_state_dict(self, state_dict: dict[str, Any], *args: Any) -> None:
        """Load the counter; re-pair later (``assign=True`` loads replace tensors)."""
        self.refresh()
        super()._load_from_state_dict(state_dict, *args)

    def __getstate__(self) -> dict[str, Any]:
        """Pickle/deepcopy without the cached pairs (the copy pairs its own tensors)."""
        state = super().__getstate__()
        state["_pairs"] = None
        return state

    def extra_repr(self) -> str:
        """Decay settings shown in ``repr``."""
        return (
            f"decay={self.decay}, use_ema_during_test={self.use_ema_during_test}, "
            f"device={self._ema_device}"
        )


class ModelExpEMAAdapter(ModelEMAAdapter):
    """EMA adapter whose decay ramps up: ``d_k = decay * (1 - exp(-k / warmup_steps))``.

    ``k`` is the optimizer step the update follows (1, 2, ...). Early on ``d_k`` is near 0,
    so the EMA copy tracks the fast-changing model closely instead of remembering its
    random initialisation; after a few ``warmup_steps`` it approaches ``decay``. This is
    the schedule YOLOX-style detectors train with.

    Args:
        model: The model to train.
        decay: Final EMA decay in (0, 1).
        warmup_steps: Time constant of the ramp, in optimizer steps (>= 1).
        use_ema_during_test: Evaluate with the EMA weights in eval mode.
        device: Keep the EMA copy on this device (see ``ModelEMAAdapter``).

    Raises:
        TypeError: As ``ModelEMAAdapter``; also if ``warmup_steps`` is not a number.
        ValueError: As ``ModelEMAAdapter``; also if ``warmup_steps`` < 1.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float = 0.9998,
        warmup_steps: int = 2000,
        use_ema_during_test: bool = True,
        device: torch.device | str | None = None,
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, numbers.Real):
            raise TypeError(
                f"warmup_steps must be a number >= 1, got {type(warmup_steps).__name__} "
                f"{warmup_steps!r}."
            )
        if not 1 <= warmup_steps < math.inf:
            raise ValueError(
                f"warmup_steps={warmup_steps!r} must be a finite number >= 1 (optimizer steps "
                "over which the decay ramps up), e.g. 2000."
            )
        super().__init__(model, decay, use_ema_during_test, device)
        self.warmup_steps: float = warmup_steps

    def decay_at(self, step: int) -> float:
        """``decay * (1 - exp(-step / warmup_steps))``, computed without cancellation."""
        return self.decay * -math.expm1(-step / self.warmup_steps)

    def extra_repr(self) -> str:
        """Decay settings shown in ``repr``."""
        return f"{super().extra_repr()}, warmup_steps={self.warmup_steps}"


def find_ema_adapters(model: nn.Module) -> list[ModelEMAAdapter]:
    """The outermost EMA adapters in ``model``, in module order.

    Looks through DDP, DataParallel, ``torch.compile`` and any other wrapper modules at
    any depth. Adapters nested inside another adapter (e.g. inside its EMA copy) are not
    listed: the outer adapter owns them.
    """
    found: list[ModelEMAAdapter] = []
    seen: set[int] = set()
    stack = [unwrap_model(model)]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        if isinstance(module, ModelEMAAdapter):
            found.append(module)
            continue
        stack.extend(reversed(list(module.children())))
    return found
