"""RetinaNet that can train only its MoE parts (the paper's fine-tuning)."""
from mmdet.models.detectors import RetinaNet
from mmdet.registry import MODELS

from ..upcycling import freeze_all_but_moe


@MODELS.register_module()
class MoERetinaNet(RetinaNet):
    """RetinaNet for MoE parts. Like every detector once ``mmdet_moe`` is imported,
    its loss dict has the ``loss_moe_*`` of every MoE module (neck, head, inserted
    layers).

    Args:
        train_only_moe: freeze every non-MoE parameter, as the paper does when it
            fine-tunes MoE parts of a trained (upcycled) RetinaNet.
        Other arguments: as :class:`mmdet.models.detectors.RetinaNet`.
    """

    def __init__(self, *args, train_only_moe: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if train_only_moe:
            freeze_all_but_moe(self)
