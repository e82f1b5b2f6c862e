"""mmdet components built on :mod:`mmdet_moe.layers` (registered in mmdet's MODELS)."""
from .dense_heads import MoERetinaHead, install_dense_head_tagging, tags_detections
from .conv_types import LAYER_TYPES, build_moe_conv, register_conv_types
from .detectors import MoERetinaNet
from .insertion import MoEDetector, insert_moe_layers, match_module_paths
from .moe_losses import collect_moe_losses, install_detector_loss_collection, merge_losses
from .necks import MoEFPN
from .roi_heads import install_roi_head_tagging
from .subnet_insertion import insert_subnet_moe
from .test_time_augs import MoEDetTTAModel
from .tower_moe import OutputInExperts, TowerMoE, UpcycleDenseKeys
from .upcycling import expand_dense_keys, freeze_all_but_moe, moe_parameters

__all__ = [
    'LAYER_TYPES', 'MoEDetTTAModel', 'MoEDetector', 'MoEFPN', 'MoERetinaHead',
    'MoERetinaNet', 'OutputInExperts', 'TowerMoE', 'UpcycleDenseKeys',
    'build_moe_conv',
    'collect_moe_losses', 'expand_dense_keys', 'freeze_all_but_moe', 'insert_moe_layers',
    'insert_subnet_moe',
    'install_dense_head_tagging', 'install_detector_loss_collection',
    'install_roi_head_tagging',
    'match_module_paths', 'merge_losses', 'moe_parameters', 'register_conv_types',
    'tags_detections'
]
