"""mmdet-moe: sparsely-gated Mixture-of-Experts layers for MMDetection 3.x.

Importing the package (``custom_imports = dict(imports=['mmdet_moe'])`` in a config)
changes, process-wide, exactly:

- mmdet's and mmcv's registries: its components are registered (``MODELS``,
  ``HOOKS``, ..., the MoE ``conv_cfg`` types);
- mmengine's config resolution: ``_base_ = 'mmdet_moe::<path under configs/>'``
  (see :mod:`mmdet_moe.registry`);
- eight functions of mmdet's classes, wrapped so that MoE layers are balanced
  and their detections tagged, and models without MoE layers run mmdet's code
  unchanged, and the build function of mmdet's model registry, so that a MoE
  ``conv_cfg`` given to a component without ``conv_cfg`` says what to write instead
  (see :mod:`mmdet_moe.models.mmdet_patches`);
- torch's safe-loader allow-list, so that mmengine's checkpoints load under
  torch >= 2.6 (see :mod:`mmdet_moe.compat`).
"""
import mmdet

from .compat import allow_mmengine_checkpoints, check_mmdet_version
from .registry import register_config_package
from .version import __version__

check_mmdet_version(mmdet.__version__)
allow_mmengine_checkpoints()
register_config_package()

from . import analysis, engine, layers, models  # noqa: E402  (registers the components)

models.install_mmdet_patches()

__all__ = ['__version__']
