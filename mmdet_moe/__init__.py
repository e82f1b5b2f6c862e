"""mmdet-moe: sparsely-gated Mixture-of-Experts layers for MMDetection 3.x.

Importing the package registers its components into mmdet's registries (use
``custom_imports = dict(imports=['mmdet_moe'])`` in a config), lets mmengine resolve
the provided configs as ``_base_ = 'mmdet_moe::<path under configs/>'`` (see
:mod:`mmdet_moe.registry`) and lets mmengine's checkpoints load under torch >= 2.6
with the safe loader.
"""
import mmdet

from .compat import allow_mmengine_checkpoints, check_mmdet_version
from .registry import register_config_package
from .version import __version__

check_mmdet_version(mmdet.__version__)
allow_mmengine_checkpoints()
register_config_package()

from . import analysis, engine, layers, models  # noqa: E402  (registers the components)

__all__ = ['__version__']
