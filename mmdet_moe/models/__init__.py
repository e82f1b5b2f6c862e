"""mmdet components built on :mod:`mmdet_moe.layers` (registered in mmdet's MODELS)."""
from .dense_heads import ExpertTaggingMixin, MoERetinaHead, TowerExpert
from .detectors import MoERetinaNet
from .insertion import LAYER_TYPES, MoEDetector, insert_moe_layers, match_module_paths
from .moe_losses import MoELossMixin, collect_moe_losses, merge_losses, with_moe_losses
from .necks import MoEFPN
from .upcycling import expand_dense_keys, freeze_all_but_moe, moe_parameters

__all__ = [
    'ExpertTaggingMixin', 'LAYER_TYPES', 'MoEDetector', 'MoEFPN', 'MoELossMixin',
    'MoERetinaHead', 'MoERetinaNet', 'TowerExpert', 'collect_moe_losses',
    'expand_dense_keys', 'freeze_all_but_moe', 'insert_moe_layers', 'match_module_paths',
    'merge_losses', 'moe_parameters', 'with_moe_losses'
]
