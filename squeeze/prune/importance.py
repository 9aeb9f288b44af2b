"""Channel importance criteria, registered by name: scoring only, never surgery.

A criterion scores every output channel of a pruning group's root, aggregated over the whole group
(torch-pruning's group importance: the mean over the coupled layers' output rows, BatchNorm scales
and consumers' input columns of that channel). Higher = more important = kept.

Add a criterion by subclassing `Criterion` and decorating it with `@register_importance`; the
engine and plans pick it up by name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from squeeze.prune.plan import PruneError
from squeeze.registry import Registry

__all__ = ["Criterion", "get_importance", "importance_registry", "list_importances",
           "register_importance"]


class Criterion(ABC):
    name: ClassVar[str]
    summary: ClassVar[str]
    needs_data: ClassVar[bool] = False

    def prepare(self, module: nn.Module, data: Any) -> None:  # noqa: B027 (optional hook, no-op by default)
        """Run once on the traced copy before scoring (e.g. compute gradients)."""

    @abstractmethod
    def score(self, group) -> torch.Tensor | None:
        """(width,) importance of the root's output channels; None where the group has nothing to score."""


def _unknown_criterion(name: str, names: list[str]) -> PruneError:
    return PruneError(f"Unknown importance criterion {name!r}.",
                      f"Valid criteria: {', '.join(names)} (see `squeeze list importances`).")


# Third-party criteria come from the `squeeze.importances` entry-point group.
importance_registry: Registry[type[Criterion]] = Registry("importance criterion", plural="criteria",
                                                          group="squeeze.importances", unknown=_unknown_criterion)


def register_importance(cls: type[Criterion]) -> type[Criterion]:
    return importance_registry.register(cls.name, cls)


def list_importances() -> list[type[Criterion]]:
    return list(importance_registry)


def get_importance(name: str) -> Criterion:
    return importance_registry.get(name)()


class _TorchPruningCriterion(Criterion):
    """Delegates to one of torch-pruning's group importance classes."""

    @abstractmethod
    def _importance(self) -> tp.importance.Importance: ...

    def score(self, group) -> torch.Tensor | None:
        # normalizer=None: raw scores (ranking within a group is what matters; raw values stay readable)
        imp = self._importance()(group)
        return None if imp is None else imp.detach().float().cpu()


@register_importance
class L1Magnitude(_TorchPruningCriterion):
    name = "l1"
    summary = "sum of |w| over the channel's weights in every coupled layer (group mean)"

    def _importance(self):
        return tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer=None)


@register_importance
class L2Magnitude(_TorchPruningCriterion):
    name = "l2"
    summary = "sum of w^2 over the channel's weights in every coupled layer (group mean)"

    def _importance(self):
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer=None)


@register_importance
class BNScale(_TorchPruningCriterion):
    name = "bn_scale"
    summary = "|gamma| of the BatchNorms in the group (network slimming)"

    def _importance(self):
        return tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)


@register_importance
class Taylor(_TorchPruningCriterion):
    name = "taylor"
    summary = "|w * dL/dw| summed per channel over the group (first-order Taylor; needs labelled data)"
    needs_data = True

    def _importance(self):
        return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer=None)

    def prepare(self, module: nn.Module, data: Any) -> None:
        """Accumulate cross-entropy gradients over the batches; `data` is one (x, y) batch or an
        iterable of them, y holding class indices. Eval mode: BN statistics stay frozen."""
        training = module.training
        module.eval()
        module.zero_grad(set_to_none=True)
        try:
            with torch.enable_grad():
                for x, y in _batches(data):
                    F.cross_entropy(module(x), y.long()).backward()
        finally:
            module.train(training)

    def score(self, group) -> torch.Tensor | None:
        try:
            return super().score(group)
        except (AttributeError, TypeError) as exc:  # a layer of the group got no gradient (.grad is None)
            raise PruneError("Taylor importance: a layer in this group got no gradient from the loss.",
                             "Every pruned layer must influence the loss; use l1 or l2 instead.") from exc


def _is_batch(b: Any) -> bool:
    return isinstance(b, (tuple, list)) and len(b) == 2 and all(torch.is_tensor(t) for t in b)


def _batches(data: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One (x, y) batch, or the batches of an iterable (e.g. a DataLoader), checked as they come."""
    if _is_batch(data):
        yield data[0], data[1]
        return
    n = 0
    for batch in data if isinstance(data, Iterable) else ():
        if not _is_batch(batch):
            break
        n += 1
        yield batch[0], batch[1]
    else:
        if n:
            return
    raise PruneError("Taylor importance needs labelled data: an (x, y) batch or an iterable of them.",
                     "Pass data=(inputs, labels) to make_plan, or choose l1, l2 or bn_scale.")
