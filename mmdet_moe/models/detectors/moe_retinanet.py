"""RetinaNet that can train only its MoE parts (the paper's fine-tuning)."""
from typing import Optional, Sequence

from mmdet.models.detectors import RetinaNet
from mmdet.registry import MODELS

from ..upcycling import freeze_all_but, freeze_all_but_moe


@MODELS.register_module()
class MoERetinaNet(RetinaNet):
    """RetinaNet for MoE parts. Like every detector once ``mmdet_moe`` is imported,
    its loss dict has the ``loss_moe_*`` of every MoE module (neck, head, inserted
    layers).

    Args:
        train_only_moe: freeze every non-MoE parameter, as the paper does when it
            fine-tunes MoE parts of a trained (upcycled) RetinaNet.
        train_only: module paths (e.g. ``['bbox_head.cls_convs',
            'bbox_head.retina_cls']``) whose parameters alone are trained, every other
            one frozen: a dense RetinaNet fine-tuned as ``train_only_moe`` fine-tunes
            its MoE counterpart (the control of the paper's protocol).
        Other arguments: as :class:`mmdet.models.detectors.RetinaNet`.
    """

    def __init__(self, *args, train_only_moe: bool = False,
                 train_only: Optional[Sequence[str]] = None, **kwargs):
        if train_only_moe and train_only is not None:
            raise ValueError('MoERetinaNet: give train_only_moe=True (train the MoE parts) '
                             f'or train_only={train_only!r} (train these modules), not both')
        super().__init__(*args, **kwargs)
        if train_only_moe:
            freeze_all_but_moe(self)
        elif train_only is not None:
            freeze_all_but(self, train_only)
