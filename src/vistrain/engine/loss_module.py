"""LossModule: weighted loss terms fed by connectors.

Each entry is a dict::

    {"loss": callable, "connector": LossConnector({...}), "weight": 1.0, "name": "det"}

Calling the module with ``(outputs, batch)`` evaluates every loss on the arguments its
connector extracts, flattens tensor / dict / namedtuple returns to dotted names
(``det.loss_iou``), weights them and sums them. Metrics stay detached tensors: nothing
here synchronises with the device, so the per-step cost is a few additions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

from torch import Tensor, nn
from typing_extensions import NotRequired

from vistrain.engine.connectors import LossConnector


class LossDefinition(TypedDict):
    """One loss term of a ``LossModule``."""

    loss: Any
    connector: LossConnector
    weight: NotRequired[float | dict[str, float]]
    name: NotRequired[str]


def _flatten(value: Any, prefix: str, owner: str) -> dict[str, Tensor]:
    """Flatten a loss return value into ``{dotted_name: tensor}``."""
    if isinstance(value, Tensor):
        return {prefix: value}
    items: Any
    if isinstance(value, Mapping):
        items = value.items()
    elif hasattr(value, "_asdict"):
        items = value._asdict().items()
    else:
        raise TypeError(
            f"Loss {owner!r} returned {type(value).__name__}; a loss must return a Tensor, "
            "a dict of Tensors or a namedtuple of Tensors."
        )
    out: dict[str, Tensor] = {}
    for key, sub in items:
        if sub is None:
            continue
        out.update(_flatten(sub, f"{prefix}.{key}", owner))
    return out


def _is_number(value: Any) -> bool:
    """A plain number, a NumPy scalar or a one-element tensor; not a bool, string or None."""
    if value is None or isinstance(value, (bool, str, bytes)):
        return False
    try:
        float(value)
    except (TypeError, ValueError, RuntimeError):
        return False
    return True


def _check_scalar(term_name: str, value: Tensor) -> None:
    """Refuse a term that is not one number: backward and the logs need scalars."""
    if value.numel() != 1:
        raise ValueError(
            f"Loss term {term_name!r} has shape {tuple(value.shape)}; every loss term must be "
            "a single number (reduce it, e.g. reduction='mean' or .mean())."
        )


def _default_name(loss: Any) -> str:
    """A function's own name (``cross_entropy``), else the class name (``YOLOXLoss``)."""
    name = getattr(loss, "__name__", None) if not isinstance(loss, nn.Module) else None
    return name if isinstance(name, str) and name.isidentifier() else type(loss).__name__


class LossModule(nn.Module):
    """Weighted sum of loss terms.

    Args:
        losses: A loss definition or a list of them (see ``LossDefinition``).
        exclude_attributes: Flattened names (or their last component) that are logged
            but not added to the total loss.
    """

    def __init__(
        self,
        losses: LossDefinition | Sequence[LossDefinition],
        exclude_attributes: list[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(losses, Mapping):
            losses = [losses]  # type: ignore[list-item]
        if not isinstance(losses, Sequence) or len(losses) == 0:
            raise ValueError("LossModule needs at least one loss definition.")
        self.losses: list[LossDefinition] = []
        modules: list[nn.Module] = []
        names: set[str] = set()
        for idx, entry in enumerate(losses):
            if not isinstance(entry, Mapping) or "loss" not in entry or "connector" not in entry:
                raise ValueError(
                    f"Loss entry {idx} is {entry!r}; each entry needs 'loss' and 'connector' keys."
                )
            if not callable(entry["loss"]):
                raise TypeError(
                    f"Loss entry {idx}: 'loss' must be callable, got {entry['loss']!r}."
                )
            if not isinstance(entry["connector"], LossConnector):
                raise TypeError(
                    f"Loss entry {idx}: 'connector' must be a LossConnector, "
                    f"got {type(entry['connector']).__name__}."
                )
            weight = entry.get("weight", 1.0)
            weights = weight.values() if isinstance(weight, Mapping) else [weight]
            if not all(_is_number(w) for w in weights):
                raise TypeError(
                    f"Loss entry {idx}: 'weight' must be a number or a dict of term name to "
                    f"number, got {weight!r}."
                )
            definition = LossDefinition(**entry)  # type: ignore[typeddict-item]
            name = definition.get("name") or _default_name(definition["loss"])
            if name in names:
                name = f"{name}_{idx}"
            definition["name"] = name
            names.add(name)
            self.losses.append(definition)
            if isinstance(definition["loss"], nn.Module):
                modules.append(definition["loss"])
        self._loss_modules = nn.ModuleList(modules)
        self.exclude_attributes = set(exclude_attributes or [])
        self._term_plan: dict[str, tuple[float, bool]] = {}
        # What every step needs, read once: a term that returns a bare tensor is named
        # after its entry, so its weight and exclusion are known now.
        self._calls = [
            (d["name"], d["connector"], d["loss"], d.get("weight", 1.0)) for d in self.losses
        ]
        self._tensor_plans = [self._plan(name, name, weight) for name, _, _, weight in self._calls]
        # A one-entry module (most are) skips the term loop once the first step checked
        # that its terms are scalars.
        self._single: tuple[str, LossConnector, Any, Any, tuple[float, bool]] | None = None
        if len(self._calls) == 1:
            self._single = (*self._calls[0], self._tensor_plans[0])
        self._checked_first_step = False

    def _excluded(self, name: str) -> bool:
        return name in self.exclude_attributes or name.rsplit(".", 1)[-1] in self.exclude_attributes

    def _plan(self, name: str, term_name: str, weight: Any) -> tuple[float, bool]:
        """Weight and exclusion of one flattened term, worked out once and cached."""
        if isinstance(weight, Mapping):
            short = term_name[len(name) + 1 :] if term_name != name else name
            w = float(weight.get(short, weight.get(term_name, 1.0)))
        else:
            w = float(weight)
        plan = (w, self._excluded(term_name))
        self._term_plan[term_name] = plan
        return plan

    def _dict_terms(
        self, returned: Any, name: str, weight: Any
    ) -> list[tuple[str, Tensor, tuple[float, bool]]]:
        """The flattened terms of a dict or namedtuple return, with their weight plans."""
        plans = self._term_plan
        terms = []
        for term_name, value in _flatten(returned, name, name).items():
            plan = plans.get(term_name)
            if plan is None:  # a term seen for the first time (the YOLOX L1 term, say)
                _check_scalar(term_name, value)
                plan = self._plan(name, term_name, weight)
            terms.append((term_name, value, plan))
        return terms

    def forward(self, outputs: Any, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Evaluate every term.

        Returns:
            ``(total_loss, metrics)``: the weighted sum with its graph, and detached
            per-term tensors plus ``"loss"``, the total detached (the training loop hands
            that one to the non-finite guard rather than detaching the total again).

        Raises:
            ValueError: If no term contributes to the total.
        """
        single = self._single
        if single is not None and self._checked_first_step:
            # One entry (the common case, run every micro-batch): no term loop.
            name, connector, loss, _, (w, excluded) = single
            returned = loss(**connector(outputs, batch))
            if isinstance(returned, Tensor) and not excluded:
                weighted = returned * w if w != 1.0 else returned
                detached = weighted.detach()
                return weighted, {name: detached, "loss": detached}
            return self._sum_terms((returned,))
        return self._sum_terms(
            [loss(**connector(outputs, batch)) for _, connector, loss, _ in self._calls]
        )

    def _sum_terms(self, returns: Sequence[Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``forward``'s result from each entry's return value, in definition order."""
        total: Tensor | None = None
        summed = 0
        metrics: dict[str, Tensor] = {}
        detached: Tensor | None = None  # the latest term's, the total when it is the only one
        for (name, _, _, weight), plan, returned in zip(self._calls, self._tensor_plans, returns):
            if isinstance(returned, Tensor):
                terms: Any = ((name, returned, plan),)
            else:
                terms = self._dict_terms(returned, name, weight)
            for term_name, value, (w, excluded) in terms:
                weighted = value * w if w != 1.0 else value
                detached = metrics[term_name] = weighted.detach()
                if excluded:
                    continue
                total = weighted if total is None else total + weighted
                summed += 1
        if not self._checked_first_step:
            for term_name, value in metrics.items():
                _check_scalar(term_name, value)
            self._checked_first_step = True
        if total is None:
            raise ValueError(
                "LossModule produced no loss to optimise: every term was excluded "
                f"(exclude_attributes={sorted(self.exclude_attributes)}) or returned nothing."
            )
        if summed == 1 and len(metrics) == 1 and detached is not None:
            metrics["loss"] = detached  # one term: the total is that term
        else:
            metrics["loss"] = total.detach()
        return total, metrics

    def find_loss(self, loss_type: type[Any]) -> list[Any]:
        """Every loss object that is a ``loss_type``, each once, in definition order.

        Looks at each entry's ``loss`` and at the modules nested inside it, so a loss wrapped
        in another module is found too. ``loss_type`` may be a runtime-checkable protocol;
        the YOLOX mode switch finds the losses it turns the L1 term on for this way.
        """
        found: dict[int, Any] = {}
        for entry in self.losses:
            loss = entry["loss"]
            candidates = loss.modules() if isinstance(loss, nn.Module) else (loss,)
            for candidate in candidates:
                if isinstance(candidate, loss_type):
                    found.setdefault(id(candidate), candidate)
        return list(found.values())
