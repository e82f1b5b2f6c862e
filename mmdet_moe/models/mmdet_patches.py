"""Every change ``import mmdet_moe`` makes to mmdet's classes, and why.

MoE layers reach a stock detector from one ``conv_cfg`` line, a ``moe_layers`` path
or a provided component, and the stock mmdet code around them neither adds their
balance losses to the loss dict nor keeps the gates behind each detection. Eight
functions of mmdet's classes are therefore wrapped, once, at import
(:func:`install_mmdet_patches`, called by ``mmdet_moe/__init__.py``):

- ``BaseDetector.forward`` and ``BaseMOTModel.forward``: every caller of a
  detector (the runner's ``train_step`` / ``val_step`` / ``test_step``, the TTA
  model, ``init_detector`` / ``inference_detector``, a tracker's runner) goes
  through ``forward(mode=...)``, and no mmdet 3.3 detector or tracker overrides it.
  For a model with MoE modules it first names them after their paths (as the
  detections' ``expert_layers``, the gate records and the statistics say), and
  ``mode='loss'`` adds the ``loss_moe_*`` of every MoE module and ends the gates'
  training iteration (:func:`~.moe_losses.add_moe_losses`), so that balancing works
  in any detector, single- or two-stage, and the per-level joint losses are summed
  once per step; ``mode='predict'`` records the gates of a MoE FPN neck for the
  heads' tagging (:func:`~.necks.neck_tagging.recording_neck_gates`; predict only,
  so training pays nothing).
- ``BaseDenseHead.predict``: a head that decodes per level, with MoE modules or under
  a MoE FPN neck, tags its detections with their level and gate weights
  (:func:`~.dense_heads.expert_tagging.tagged_predict`).
- ``CascadeRPNHead.predict``: the Cascade RPN runs its stages and decodes in its own
  ``predict``, not through ``BaseDenseHead.predict``; with MoE modules in a stage or
  under a MoE FPN neck, its proposals are tagged with their level and gate weights
  (:func:`~.dense_heads.expert_tagging.tagged_cascade_rpn_predict`).
- ``StandardRoIHead.predict_bbox`` and ``CascadeRoIHead.predict_bbox`` (Cascade
  R-CNN, HTC, SCNet: their own, not StandardRoIHead's): a two-stage detector's
  detections get the gates of their proposal and of their RoI in each stage
  (:func:`~.roi_heads.expert_tagging.tagged_predict_bbox`).
- ``SparseRoIHead.predict_bbox`` (Sparse R-CNN, QueryInst): under a MoE FPN neck,
  each detection gets the neck's gates of the level its query's last RoI was pooled
  from (:func:`~.roi_heads.query_tagging.tagged_sparse_predict_bbox`).
- ``TridentRoIHead.merge_trident_bboxes``: the NMS over TridentNet's branches keeps
  the tags of the branch detections it keeps
  (:func:`~.roi_heads.trident_tagging.tagged_merge_trident_bboxes`).

One more wrapper is not a class function but the build function of mmdet's model
registry (``mmdet.registry.MODELS.build_func``, an attribute of that registry
object): a component built with ``conv_cfg=dict(type='MoEConv2d', ...)`` whose class
takes no ``conv_cfg`` (CTResNetNeck, NASFPN, FPG, FPN_CARAFE, ...) fails in its
``__init__`` with Python's bare ``TypeError``, before any code of the plugin runs;
the wrapper re-raises it with what to write instead (``MoEDetector`` paths to the
component's convs, :func:`~.conv_types.conv_cfg_hint`). Any other build, and any other
error, passes through untouched.

Each wrapper calls mmdet's own function (kept as ``__wrapped__``), and for a model
or head without MoE modules calls nothing else, with the arguments as given, so
such models give exactly mmdet's losses and predictions. Nothing else of mmdet is
assigned: no ``__init_subclass__``, no subclass methods, no module globals (the
decode-time recording is bound to the decoding head only, see :mod:`.rebinding`).
A direct ``detector.loss(...)`` or ``detector.predict(...)`` call is mmdet's own (the
heads still tag their own modules, not the neck's): add
:func:`~.moe_losses.add_moe_losses` after ``loss``, and call
``assign_moe_names(detector)`` once before ``predict`` for path names in
``expert_layers``, inside ``recording_neck_gates(detector)`` for the neck's tags.

The other process-wide changes of the import are registrations (mmdet's and mmcv's
registries, mmengine's ``MODULE2PACKAGE``, see :mod:`mmdet_moe.registry`) and torch's
safe-loader allow-list (:mod:`mmdet_moe.compat`).
"""
import functools
import inspect
from typing import Any, Callable, Optional, Tuple

import torch.nn as nn
from mmdet.models.dense_heads import CascadeRPNHead
from mmdet.models.dense_heads.base_dense_head import BaseDenseHead
from mmdet.models.detectors import BaseDetector
from mmdet.models.mot import BaseMOTModel
from mmdet.models.roi_heads import TridentRoIHead

from mmdet.registry import MODELS as MMDET_MODELS

from ..layers import assign_moe_names
from .conv_types import conv_cfg_hint
from .dense_heads.expert_tagging import (tagged_cascade_rpn_predict, tagged_predict,
                                         tags_detections)
from .moe_losses import add_moe_losses
from .necks.neck_tagging import recording_neck_gates
from .roi_heads.expert_tagging import TAGGED_ROI_HEADS, tagged_predict_bbox
from .roi_heads.query_tagging import QUERY_ROI_HEADS, tagged_sparse_predict_bbox
from .roi_heads.trident_tagging import tagged_merge_trident_bboxes

#: marks a function as one of these wrappers (installing twice wraps once)
MARK = 'mmdet_moe_patch'


def has_moe_modules(model: nn.Module) -> bool:
    """Whether any module of ``model`` is a MoE module (a class attribute lookup per
    module: no ``nn.Module.__getattr__`` fallback on the dense modules)."""
    return any(getattr(type(m), 'is_moe_module', False) for m in model.modules())


def moe_forward(stock: Callable) -> Callable:
    """``forward`` of a detector or tracker that, when the model has MoE modules,
    names them after their paths and, for ``mode='loss'``, adds their losses; for
    ``mode='predict'``, records the gates of its MoE FPN neck for the heads."""
    signature = inspect.signature(stock)

    @functools.wraps(stock)
    def forward(self, *args, **kwargs):
        if not has_moe_modules(self):
            return stock(self, *args, **kwargs)
        call = signature.bind(self, *args, **kwargs)
        call.apply_defaults()
        assign_moe_names(self)  # what gate records and expert_layers call the layers
        mode = call.arguments['mode']
        if mode == 'predict':
            with recording_neck_gates(self):
                return stock(self, *args, **kwargs)
        outputs = stock(self, *args, **kwargs)
        return add_moe_losses(self, outputs) if mode == 'loss' else outputs

    return forward


def tagging_dense_predict(stock: Callable) -> Callable:
    """``BaseDenseHead.predict`` that tags the detections of a head with MoE modules
    that decodes per level."""

    @functools.wraps(stock)
    def predict(self, *args, **kwargs):
        if not tags_detections(self):
            return stock(self, *args, **kwargs)
        return tagged_predict(self, *args, **kwargs)

    return predict


def calling(tagged: Callable[..., Any],
            when: Optional[Callable[[Any], bool]] = None) -> Callable[[Callable], Callable]:
    """A wrapper of a stock method that runs ``tagged(stock, self, *args, **kwargs)``
    (for an object where ``when(self)`` holds, when given; else the stock method)."""
    def wrap(stock: Callable) -> Callable:
        @functools.wraps(stock)
        def method(self, *args, **kwargs):
            if when is not None and not when(self):
                return stock(self, *args, **kwargs)
            return tagged(stock, self, *args, **kwargs)

        return method

    return wrap


#: (class, attribute, wrapper): every attribute of mmdet the plugin assigns
PATCHES: Tuple[Tuple[type, str, Callable[[Callable], Callable]], ...] = (
    (BaseDetector, 'forward', moe_forward),
    (BaseMOTModel, 'forward', moe_forward),
    (BaseDenseHead, 'predict', tagging_dense_predict),
    (CascadeRPNHead, 'predict', calling(tagged_cascade_rpn_predict, when=tags_detections)),
    *((cls, 'predict_bbox', calling(tagged_predict_bbox)) for cls in TAGGED_ROI_HEADS),
    *((cls, 'predict_bbox', calling(tagged_sparse_predict_bbox)) for cls in QUERY_ROI_HEADS),
    (TridentRoIHead, 'merge_trident_bboxes', calling(tagged_merge_trident_bboxes)),
)


def hinting_build(stock: Callable) -> Callable:
    """mmdet's model build function that explains a ``conv_cfg`` MoE type given to a
    component without ``conv_cfg``."""

    @functools.wraps(stock)
    def build(cfg, *args, **kwargs):
        try:
            return stock(cfg, *args, **kwargs)
        except TypeError as err:
            hint = conv_cfg_hint(cfg, err)
            if hint is None:
                raise
            raise TypeError(f'{err}; {hint}') from err

    return build


def install_mmdet_patches() -> None:
    """Wrap each function of :data:`PATCHES` in its class, and mmdet's model build
    function (idempotent)."""
    for cls, name, wrap in PATCHES:
        stock = cls.__dict__[name]
        if getattr(stock, MARK, False):
            continue
        patched = wrap(stock)
        setattr(patched, MARK, True)
        setattr(cls, name, patched)
    if not getattr(MMDET_MODELS.build_func, MARK, False):
        build = hinting_build(MMDET_MODELS.build_func)
        setattr(build, MARK, True)
        MMDET_MODELS.build_func = build
