"""Auxiliary (balance) losses of every MoE module in a detector, in its loss dict."""
import functools
from typing import Dict

import torch.nn as nn
from mmdet.models.detectors import BaseDetector
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


def install_detector_loss_collection() -> None:
    """Make every mmdet detector return its MoE balance losses (idempotent).

    mmdet's ``BaseDetector.forward`` is the one entry of every detector class (the
    runner's ``train_step`` calls it with ``mode='loss'``; no mmdet 3.3 detector
    overrides it). After its ``loss()`` the ``loss_moe_*`` of all MoE modules in the
    detector are added, so MoE layers from ``conv_cfg``, :func:`MoEDetector` paths
    or the provided components are balanced in any detector, single- or two-stage.
    A detector without MoE modules returns the same dict as before.
    """
    forward = BaseDetector.forward
    if getattr(forward, 'collects_moe_losses', False):
        return

    @functools.wraps(forward)
    def forward_with_moe_losses(self, inputs, data_samples=None, mode='tensor'):
        results = forward(self, inputs, data_samples, mode)
        if mode == 'loss':
            merge_losses(results, collect_moe_losses(self))
        return results

    forward_with_moe_losses.collects_moe_losses = True
    BaseDetector.forward = forward_with_moe_losses


install_detector_loss_collection()
