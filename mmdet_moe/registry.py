"""``mmdet_moe::`` config paths and the ``mmdet_moe`` registry scope.

mmdet ships its configs as package data (``mmdet/.mim/configs``), so any config can
say ``_base_ = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'``. This package ships
the repository's ``configs/`` the same way, as ``mmdet_moe/.mim/configs`` (setup.py
copies them into the wheel; an editable install links the checkout's ``configs/``
there, git-ignored), and importing it lets a config anywhere inherit one::

    _base_ = 'mmdet_moe::toy/retinanet_r18_fpn_moe-head_4e_toy-coco.py'

Two things in mmengine (0.10.7) make that work only once ``mmdet_moe`` is imported,
and both are set up here (:func:`register_config_package`, called by
``mmdet_moe/__init__.py``):

- ``<scope>::`` is resolved only for scopes in ``mmengine.config.utils.MODULE2PACKAGE``,
  looked up when the ``_base_`` line is parsed, before the config's ``custom_imports``
  run. The value registered is this module's dotted name: it is no installed
  distribution, so mmengine's ``is_installed`` and ``get_installed_path`` fall back to
  ``importlib.util.find_spec`` and take the directory of this file, i.e. the
  ``mmdet_moe`` package that is imported, wheel or editable install alike. (With the
  distribution name ``mmdet_moe``, mmengine takes the distribution's location plus
  ``mmdet_moe``, which for a PEP 660 editable install is ``site-packages/mmdet_moe``,
  a directory that does not exist.)
- every dict with a ``type`` that a config inherits through ``mmdet_moe::`` gets
  ``_scope_='mmdet_moe'`` and is built in that scope: mmengine imports
  ``mmdet_moe.registry`` (this module) and looks for registries of scope
  ``mmdet_moe``. The registries below are children of mmdet's, empty: our components
  are registered in mmdet's own registries, and a lookup from a child goes on to its
  parent, so the scope ``mmdet_moe`` finds exactly what the scope ``mmdet`` finds
  (without them, e.g. a provided config's ``custom_hooks`` fail to build in the
  Runner: ``ExpertSizeStatsHook is not in the mmengine::hook registry``).

mmengine's pure-Python ("lazy") configs cannot help here: ``with read_base(): from
mmdet_moe.x import *`` maps the module path under ``get_installed_path('mmdet_moe')``,
``.mim`` is no importable name, and a lazy config cannot inherit a ``_base_`` config.
"""
from mmengine.registry import Registry

#: the scope of configs inherited through ``mmdet_moe::`` (and the ``::`` prefix)
SCOPE = 'mmdet_moe'
#: what ``MODULE2PACKAGE[SCOPE]`` says: see the module's docstring
CONFIG_PACKAGE = __name__


def _module2package() -> dict:
    try:
        from mmengine.config.utils import MODULE2PACKAGE
    except ImportError:  # pragma: no cover - mmengine before the rename
        from mmengine.config.utils import PKG2PROJECT as MODULE2PACKAGE
    return MODULE2PACKAGE


def register_config_package() -> None:
    """Let mmengine resolve ``mmdet_moe::<path>`` to ``mmdet_moe/.mim/configs/<path>``
    (idempotent)."""
    _module2package()[SCOPE] = CONFIG_PACKAGE


def _scope_registries() -> dict:
    """For each registry of mmdet, its child of scope ``mmdet_moe`` (made once)."""
    import mmdet.registry
    children = {}
    for name, parent in vars(mmdet.registry).items():
        if not isinstance(parent, Registry) or parent.scope != 'mmdet':
            continue
        child = parent._children.get(SCOPE)
        if child is None:
            child = Registry(parent.name, parent=parent, scope=SCOPE,
                             locations=list(parent._locations))
        children[name] = child
    return children


_REGISTRIES = _scope_registries()
globals().update(_REGISTRIES)
__all__ = ['SCOPE', 'CONFIG_PACKAGE', 'register_config_package', *sorted(_REGISTRIES)]
