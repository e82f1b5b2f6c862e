"""Auxiliary (balance) losses of every MoE module in a detector, in its loss dict."""
import functools
import threading
from typing import Callable, Dict

import torch.nn as nn
from mmdet.models.detectors import BaseDetector
from torch import Tensor

from ..layers import assign_moe_names, end_iteration, is_moe_module

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


_calls = threading.local()  # depth of nested loss() calls in this thread


def _collecting(loss: Callable) -> Callable:
    """``loss`` that adds the MoE losses of its detector when it is the outermost
    detector ``loss()`` call (a detector calling its parent's or a sub-detector's
    ``loss()`` collects once, at the top)."""

    @functools.wraps(loss)
    def loss_with_moe_losses(self, *args, **kwargs):
        depth = getattr(_calls, 'depth', 0)
        _calls.depth = depth + 1
        try:
            losses = loss(self, *args, **kwargs)
        finally:
            _calls.depth = depth
        if depth == 0:
            merge_losses(losses, collect_moe_losses(self))
            if self.training:
                end_iteration(self)
        return losses

    loss_with_moe_losses.collects_moe_losses = True
    return loss_with_moe_losses


def _naming(predict: Callable) -> Callable:
    """``predict`` that first names the detector's MoE modules after their paths (so
    that ``expert_layers`` of tagged detections name layers as the statistics do)."""

    @functools.wraps(predict)
    def predict_with_moe_names(self, *args, **kwargs):
        if not self.__dict__.get('_moe_named', False):
            assign_moe_names(self)
            self.__dict__['_moe_named'] = True
        return predict(self, *args, **kwargs)

    predict_with_moe_names.names_moe_modules = True
    return predict_with_moe_names


def _wrap_loss(cls: type) -> None:
    loss = cls.__dict__.get('loss')
    if loss is not None and not getattr(loss, '__isabstractmethod__', False) \
            and not getattr(loss, 'collects_moe_losses', False):
        cls.loss = _collecting(loss)
    predict = cls.__dict__.get('predict')
    if predict is not None and not getattr(predict, '__isabstractmethod__', False) \
            and not getattr(predict, 'names_moe_modules', False):
        cls.predict = _naming(predict)


def install_detector_loss_collection() -> None:
    """Make every mmdet detector return its MoE balance losses (idempotent).

    The ``loss()`` of every ``BaseDetector`` subclass, those defined so far and those
    defined later, adds the ``loss_moe_*`` of all MoE modules in the detector to its
    loss dict, so MoE layers from ``conv_cfg``, :func:`MoEDetector` paths or the
    provided components are balanced in any detector, single- or two-stage, called
    through ``forward(mode='loss')`` (the runner's ``train_step``) or ``loss()``
    directly (e.g. by a tracker wrapping a detector). Only the outermost call
    collects, and ends the training iteration of the detector's gates (hard
    constraints count their warm-up in iterations). A detector without MoE modules
    returns the same dict as before. Their ``predict()`` first names the detector's
    MoE modules after their paths (once), as the detections' ``expert_layers`` say.
    """
    classes = [BaseDetector]
    while classes:
        cls = classes.pop()
        _wrap_loss(cls)
        classes.extend(cls.__subclasses__())
    if getattr(BaseDetector.__init_subclass__, 'wraps_moe_losses', False):
        return

    def init_subclass(cls, **kwargs):
        super(BaseDetector, cls).__init_subclass__(**kwargs)
        _wrap_loss(cls)

    init_subclass.wraps_moe_losses = True
    BaseDetector.__init_subclass__ = classmethod(init_subclass)


install_detector_loss_collection()
