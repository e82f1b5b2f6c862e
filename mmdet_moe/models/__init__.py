"""mmdet components built on :mod:`mmdet_moe.layers` (registered in mmdet's MODELS)."""
from .dense_heads import MoERetinaHead, tags_detections, untagged_reason
from .conv_types import LAYER_TYPES, build_moe_conv, register_conv_types
from .detectors import MoERetinaNet
from .insertion import MoEDetector, insert_moe_layers, match_module_paths
from .mmdet_patches import install_mmdet_patches
from .moe_losses import add_moe_losses, collect_moe_losses, merge_losses
from .necks import MoEFPN
from .reference_sizes import (NoReferenceSizes, detector_reference_sizes,
                              level_reference_sizes)
from .subnet_insertion import insert_subnet_moe
from .tag_coverage import untagged_layers_reason
from .test_time_augs import MoEDetTTAModel
from .tower_moe import OutputInExperts, TowerMoE, UpcycleDenseKeys
from .upcycling import expand_dense_keys, freeze_all_but_moe, moe_parameters

__all__ = [
    'LAYER_TYPES', 'MoEDetTTAModel', 'MoEDetector', 'MoEFPN', 'MoERetinaHead',
    'MoERetinaNet', 'NoReferenceSizes', 'OutputInExperts', 'TowerMoE', 'UpcycleDenseKeys',
    'add_moe_losses', 'build_moe_conv', 'collect_moe_losses', 'detector_reference_sizes',
    'expand_dense_keys', 'freeze_all_but_moe', 'insert_moe_layers', 'insert_subnet_moe',
    'install_mmdet_patches', 'level_reference_sizes', 'match_module_paths', 'merge_losses',
    'moe_parameters', 'register_conv_types', 'tags_detections', 'untagged_layers_reason',
    'untagged_reason'
]
