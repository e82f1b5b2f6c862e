"""Configs for MoE models after pruning or merging their experts.

:func:`pruned_config`: the same detector with fewer experts in named MoE modules
(``MoEDetector(expert_counts=...)``). :func:`stock_config`: the dense detector that
merged MoEConv2d layers leave, written with mmdet's own types only, so that it runs
where ``mmdet_moe`` is not installed.
"""
import copy
from typing import Any, Dict, Union

from mmengine.config import Config

from .conv_types import LAYER_TYPES

# mmdet_moe's model types and the stock mmdet type each one extends
STOCK_TYPES = {'MoERetinaNet': 'RetinaNet', 'MoERetinaHead': 'RetinaHead', 'MoEFPN': 'FPN',
               'MoEDetTTAModel': 'DetTTAModel'}
# the arguments those types add to the stock ones
MOE_ARGS = {
    'MoERetinaNet': ('train_only_moe',),
    'MoERetinaHead': ('moe_branches', 'expert_type', 'num_experts', 'top_k', 'gate_cfg',
                      'balance_cfg', 'moe_convs', 'experts_include_output',
                      'upcycle_noise_std', 'fresh_expert_init', 'impl', 'capacity_factor',
                      'routing_supervision'),
    'MoEFPN': ('moe_parts', 'shared_gate', 'num_experts', 'top_k', 'gate_cfg', 'balance_cfg',
               'impl', 'upcycle_noise_std'),
    'MoEDetTTAModel': (),
}
MOE_DETECTOR_ARGS = ('moe_layers', 'train_only_moe', 'expert_counts')
PACKAGE = 'mmdet_moe'
# what mmengine's Runner and mmdet's tools read from a config; other top-level keys
# are the config file's own variables
RUNTIME_KEYS = ('model', 'tta_model', 'tta_pipeline', 'train_dataloader',
                'val_dataloader', 'test_dataloader', 'train_cfg', 'val_cfg', 'test_cfg',
                'val_evaluator', 'test_evaluator', 'optim_wrapper', 'param_scheduler',
                'default_hooks', 'custom_hooks', 'data_preprocessor', 'env_cfg',
                'log_processor', 'visualizer', 'auto_scale_lr', 'model_wrapper_cfg',
                'custom_imports', 'default_scope', 'randomness')


def pruned_config(cfg: Config, expert_counts: Dict[str, int]) -> Config:
    """``cfg`` whose model keeps the first ``expert_counts[path]`` experts of each named
    MoE module (the pruned checkpoint holds the kept experts in that order)."""
    cfg = copy.deepcopy(cfg)
    model = cfg.model
    if model.get('type') != 'MoEDetector':  # flat, so model.backbone etc. stay in place
        model = dict(model, type='MoEDetector', detector_type=model['type'])
    model['expert_counts'] = dict(model.get('expert_counts') or {}, **expert_counts)
    cfg.model = model
    return cfg


def stock_config(cfg: Config) -> Config:
    """``cfg`` with every mmdet_moe type replaced by the stock type it extends and
    every MoE argument dropped: MoEConv2d ``conv_cfg`` s become dense convs,
    ``MoEDetector`` the detector it wraps, mmdet_moe's hooks (custom and default) and
    its custom import go,
    and so do the config file's own variables that hold mmdet_moe types.
    For a model whose MoE layers are all single convs (merged into dense convs).

    Raises:
        ValueError: for a MoE part that no stock type expresses (e.g. whole-subnet
            experts, μMoE convs, ``moe_layers`` with ``expert='subnet'``), naming it.
    """
    cfg = copy.deepcopy(cfg)
    cfg.model = _stock_model(cfg.model, 'model')
    if cfg.get('tta_model') is not None:
        cfg.tta_model = _stock_model(cfg.tta_model, 'tta_model')
    cfg.custom_hooks = _without_our_hooks(cfg.get('custom_hooks') or [])
    if cfg.get('default_hooks') is not None:  # e.g. MemoryFormatHook: mmdet runs without
        cfg.default_hooks = _without_our_hooks(cfg.default_hooks)
    imports = cfg.get('custom_imports')
    if imports is not None:
        kept = [m for m in imports.get('imports', []) if m.split('.')[0] != PACKAGE]
        if kept:
            cfg.custom_imports = dict(imports, imports=kept)
        else:
            cfg.pop('custom_imports')
    for key, value in cfg._cfg_dict.to_dict().items():
        try:
            _check_stock(value, key)
        except ValueError:
            if key in RUNTIME_KEYS:
                raise
            cfg.pop(key)  # a variable of the config file (e.g. a shared conv_cfg)
    return cfg


def _stock_model(node: Any, where: str) -> Any:
    if isinstance(node, (list, tuple)):
        return type(node)(_stock_model(n, f'{where}[{i}]') for i, n in enumerate(node))
    if not isinstance(node, dict):
        return node
    node = dict(node)
    kind = node.get('type')
    if kind == 'MoEDetector':
        for spec in node.get('moe_layers') or []:
            if spec.get('expert') == 'subnet' or spec.get('type', 'MoEConv2d') != 'MoEConv2d':
                raise ValueError(f'{where}.moe_layers: {spec} makes layers that are not '
                                 'single MoEConv2d convs; no stock type expresses them')
        nested = node.pop('detector', None)
        node = nested if nested is not None else dict(node, type=node.pop('detector_type'))
        for key in MOE_DETECTOR_ARGS:
            node.pop(key, None)
        kind = node.get('type')
    if kind == 'MoERetinaHead' and node.get('expert_type', 'subnet') != 'conv':
        raise ValueError(f"{where}: MoERetinaHead with expert_type='subnet' (whole towers "
                         'as experts) has no stock form')
    if kind in STOCK_TYPES:
        for key in MOE_ARGS[kind]:
            node.pop(key, None)
        node['type'] = STOCK_TYPES[kind]
        if kind == 'MoERetinaHead':  # MoERetinaHead's default is RetinaHead's own
            node.setdefault('init_cfg', dict(type='Normal', layer='Conv2d', std=0.01))
    conv_cfg = node.get('conv_cfg')
    if isinstance(conv_cfg, dict) and conv_cfg.get('type') in LAYER_TYPES:
        if conv_cfg['type'] != 'MoEConv2d':
            raise ValueError(f'{where}.conv_cfg: {conv_cfg["type"]} convs have no stock form')
        node['conv_cfg'] = None
    return {key: value if key == 'conv_cfg' else _stock_model(value, f'{where}.{key}')
            for key, value in node.items()}


def _without_our_hooks(hooks: Union[list, dict]) -> Union[list, dict]:
    """``custom_hooks`` (a list) or ``default_hooks`` (a dict by name) without the
    hooks mmdet_moe registers."""
    def ours(hook: Any) -> bool:
        return isinstance(hook, dict) and _is_ours(hook.get('type'))

    if isinstance(hooks, dict):
        return {name: hook for name, hook in hooks.items() if not ours(hook)}
    return [hook for hook in hooks if not ours(hook)]


def _is_ours(type_name: Any) -> bool:
    """Whether ``type_name`` is registered by mmdet_moe (in mmdet's or mmengine's
    registries)."""
    if not isinstance(type_name, str):
        return False
    if type_name in LAYER_TYPES:
        return True
    import mmdet.registry
    from mmengine.registry import Registry
    for registry in vars(mmdet.registry).values():
        if isinstance(registry, Registry) and type_name in registry.module_dict:
            return getattr(registry.module_dict[type_name], '__module__',
                           '').split('.')[0] == PACKAGE
    return False


def _check_stock(node: Any, where: str) -> None:
    """Raise if a type of mmdet_moe is left anywhere in the config."""
    if isinstance(node, (list, tuple)):
        for i, item in enumerate(node):
            _check_stock(item, f'{where}[{i}]')
    elif isinstance(node, dict):
        if _is_ours(node.get('type')):
            raise ValueError(f'{where or "the config"}: type {node["type"]!r} belongs to '
                             'mmdet_moe and has no stock replacement')
        for key, value in node.items():
            _check_stock(value, f'{where}.{key}' if where else key)
