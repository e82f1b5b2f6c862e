"""Auxiliary (balance) losses of every MoE module in a detector, in its loss dict."""
from typing import Dict

import torch.nn as nn
from torch import Tensor

from ..layers import end_iteration, is_moe_module

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


def add_moe_losses(model: nn.Module, losses: dict) -> dict:
    """End a loss computation of ``model``: add the ``loss_moe_*`` of all its MoE
    modules to ``losses`` (in place) and, in training, end the iteration of its gates
    (hard constraints count their warm-up in iterations).

    ``forward(mode='loss')`` of every mmdet detector and tracker calls it once
    ``mmdet_moe`` is imported (see :mod:`.mmdet_patches`); call it yourself after a
    direct ``detector.loss(...)``.
    """
    merge_losses(losses, collect_moe_losses(model))
    if model.training:
        end_iteration(model)
    return losses
