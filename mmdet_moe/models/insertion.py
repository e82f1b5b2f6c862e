"""MoE anywhere by config: replace convs of any mmdet model by MoE layers at build.

A spec names module paths, with ``*`` matching one path component::

    moe_layers = [
        dict(paths='bbox_head.cls_convs.3.conv', num_experts=8, top_k=2,
             balance_cfg=dict(importance=0.5)),
        dict(paths=['neck.fpn_convs.*.conv'], type='MoEConv2d', shared_gate=True),
        dict(paths='rpn_head.rpn_conv', type='CPMuMoEConv2d', num_experts=64),
    ]

Each matched ``nn.Conv2d`` is replaced by a layer of ``type`` with its geometry; all
other keys of the spec go to that layer. State-dict keys stay where they were
(``...conv.weight`` keeps its name), so a stock checkpoint loads with only the new
MoE keys missing, and ``MoEConv2d`` upcycles the dense weights into its experts.
"""
import fnmatch
from typing import List, Sequence

import torch.nn as nn

from mmdet.registry import MODELS

from ..layers import CPMuMoEConv2d, MoEConv2d, TRMuMoEConv2d
from .moe_losses import with_moe_losses
from .upcycling import freeze_all_but_moe

LAYER_TYPES = {cls.__name__: cls for cls in (MoEConv2d, CPMuMoEConv2d, TRMuMoEConv2d)}


def match_module_paths(model: nn.Module, pattern: str) -> List[str]:
    """Names of modules matching ``pattern`` component-wise (``*`` = one component)."""
    parts = pattern.split('.')
    return [name for name, _ in model.named_modules()
            if name and len(name.split('.')) == len(parts)
            and all(fnmatch.fnmatchcase(n, p) for n, p in zip(name.split('.'), parts, strict=True))]


def _set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _moe_from_conv(layer_type: str, conv: nn.Conv2d, kwargs: dict) -> nn.Module:
    if layer_type == 'MoEConv2d':
        return MoEConv2d.like(conv, **kwargs)
    if conv.groups != 1:
        raise ValueError(f'{layer_type} supports groups=1 only, got groups={conv.groups}')
    return LAYER_TYPES[layer_type](
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, bias=conv.bias is not None, **kwargs)


def insert_moe_layers(model: nn.Module, moe_layers: Sequence[dict],
                      key: str = 'moe_layers') -> List[str]:
    """Replace the convs named by each spec of ``moe_layers`` in place.

    Returns:
        The replaced module paths. Errors name ``key[i]`` and the module path.
    """
    replaced = []
    for i, spec in enumerate(moe_layers):
        where = f'{key}[{i}]'
        spec = dict(spec)
        if 'paths' not in spec:
            raise ValueError(f'{where} needs "paths" (module paths or patterns)')
        paths = spec.pop('paths')
        paths = [paths] if isinstance(paths, str) else list(paths)
        layer_type = spec.pop('type', 'MoEConv2d')
        if layer_type not in LAYER_TYPES:
            raise ValueError(f'{where}.type={layer_type!r} is unknown; choose from '
                             f'{sorted(LAYER_TYPES)}')
        shared_gate = spec.pop('shared_gate', False)
        new_layers = []
        for pattern in paths:
            names = match_module_paths(model, pattern)
            if not names:
                convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
                raise ValueError(f'{where}.paths: {pattern!r} matches no module of '
                                 f'{type(model).__name__}; conv paths include '
                                 f'{convs[:8]}{" ..." if len(convs) > 8 else ""}')
            for name in names:
                module = model.get_submodule(name)
                if type(module) is not nn.Conv2d:
                    raise ValueError(f'{where}.paths: {name!r} is a {type(module).__name__}, '
                                     'not an nn.Conv2d; name the conv inside it (e.g. '
                                     f'{name}.conv)')
                try:
                    new = _moe_from_conv(layer_type, module, spec)
                except (TypeError, ValueError) as err:
                    raise ValueError(f'{where} at {name!r}: {err}') from err
                _set_module(model, name, new)
                new_layers.append(new)
                replaced.append(name)
        if shared_gate:
            _share_gate(new_layers, where)
    return replaced


def _share_gate(layers: list, where: str) -> None:
    first = layers[0]
    if not isinstance(first, MoEConv2d):
        raise ValueError(f'{where}.shared_gate needs type MoEConv2d')
    for layer in layers[1:]:
        if layer.in_channels != first.in_channels:
            raise ValueError(f'{where}.shared_gate: layers see {first.in_channels} and '
                             f'{layer.in_channels} input channels; a shared gate needs one')
        layer.gate = first.gate


@MODELS.register_module()
def MoEDetector(detector: dict, moe_layers: Sequence[dict] = (),
                train_only_moe: bool = False) -> nn.Module:
    """Build ``detector`` (any mmdet detector config), insert ``moe_layers`` and add
    the MoE balance losses to its loss dict. With ``train_only_moe`` every non-MoE
    parameter is frozen (fine-tuning MoE parts of a trained detector).

    The result is the detector itself (same state-dict keys), of a subclass whose
    ``loss()`` also returns ``loss_moe_*``.
    """
    model = MODELS.build(detector)
    insert_moe_layers(model, moe_layers)
    model.__class__ = with_moe_losses(type(model))
    if train_only_moe:
        freeze_all_but_moe(model)
    return model
