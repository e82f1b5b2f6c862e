"""Auxiliary (balance) losses of every MoE module in a detector, in its loss dict."""
from functools import lru_cache
from typing import Dict

import torch.nn as nn
from torch import Tensor

from ..layers import is_moe_module

LOSS_PREFIX = 'loss_moe_'


def collect_moe_losses(model: nn.Module) -> Dict[str, Tensor]:
    """Pop the balance losses of all MoE modules in ``model``, summed by name.

    Keys are ``loss_moe_<name>`` (e.g. ``loss_moe_importance``), so mmengine adds
    them to the total loss and logs them. Each module's losses are collected once.
    """
    losses: Dict[str, Tensor] = {}
    for module in model.modules():
        if is_moe_module(module):
            merge_losses(losses, {LOSS_PREFIX + name: value
                                  for name, value in module.pop_aux_losses().items()})
    return losses


def merge_losses(losses: dict, extra: Dict[str, Tensor]) -> dict:
    """Add ``extra`` into ``losses`` in place, summing values under the same key."""
    for key, value in extra.items():
        losses[key] = losses[key] + value if key in losses else value
    return losses


class MoELossMixin:
    """Adds the balance losses of all MoE modules to a detector's ``loss()``."""

    def loss(self, batch_inputs, batch_data_samples):
        losses = super().loss(batch_inputs, batch_data_samples)
        return merge_losses(losses, collect_moe_losses(self))


@lru_cache(maxsize=None)
def with_moe_losses(detector_cls: type) -> type:
    """Subclass of ``detector_cls`` whose ``loss()`` includes the MoE losses.

    State-dict keys and behaviour are otherwise those of ``detector_cls``; used to
    give any mmdet detector MoE losses without per-detector code.
    """
    if issubclass(detector_cls, MoELossMixin):
        return detector_cls
    return type(detector_cls.__name__, (MoELossMixin, detector_cls),
                {'__module__': __name__, '__qualname__': detector_cls.__qualname__})
