"""MoE conv types for mmcv's ``conv_cfg``, as mmcv registers ``DCNv2``.

Any mmdet module that builds its convs with ``ConvModule`` / ``build_conv_layer``
(FPN, dense heads, RoI heads, backbones) gets MoE convs from one config line::

    neck=dict(type='FPN', ..., conv_cfg=dict(type='MoEConv2d', num_experts=4, top_k=2,
                                             balance_cfg=dict(importance=0.5)))

The types are registered in mmengine's root ``MODELS`` (where mmcv's conv types
live), so every scope finds them. Each expert starts from the distribution of the
conv it stands for: inside a ``ConvModule``, ``ConvModule``'s own initialisation is
applied to every expert; the owners' ``init_cfg`` reach every expert later (see
:meth:`MoEConv2d.apply`). Errors name the modules being built and the wrong value.
"""
import sys
from types import SimpleNamespace
from typing import List, Optional, Tuple

import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.registry import MODELS

from ..layers import CPMuMoEConv2d, MoEConv2d, TRMuMoEConv2d

LAYER_TYPES = {cls.__name__: cls for cls in (MoEConv2d, CPMuMoEConv2d, TRMuMoEConv2d)}

# Modules whose forward reads a child conv's weight instead of calling the conv, so a
# MoE layer there would never route: {owner class: (child attribute, why)}.
UNSERVABLE = {
    'TaskDecomposition': ('reduction_conv', "TOOD's TaskDecomposition multiplies "
                          'reduction_conv.conv.weight by its layer attention instead of '
                          'calling the conv'),
}


def check_servable(owner: nn.Module, child: str, where: str) -> None:
    """Raise if ``owner``'s forward cannot run a MoE layer in its child ``child``."""
    entry = UNSERVABLE.get(type(owner).__name__)
    if entry is not None and entry[0] == child:
        raise ValueError(f'{where}: a MoE conv cannot serve {type(owner).__name__}.'
                         f'{child}: {entry[1]}; choose another conv (for TOOD: '
                         'bbox_head.inter_convs.*.conv)')


def construction_frames() -> List[Tuple[str, dict]]:
    """The calls building this conv: (function name, its local variables), innermost
    first. ``__init__`` frames hold the ``nn.Module`` being built as ``self``.

    While a conv is built from ``conv_cfg`` it is not yet attached to its parent, so
    its module path does not exist; the chain of modules being built (e.g.
    FPN > ConvModule) is the closest a build-time error can name.
    """
    frames = []
    frame = sys._getframe(1)
    while frame is not None:
        frames.append((frame.f_code.co_name, frame.f_locals))
        frame = frame.f_back
    return frames


def modules_under_construction(frames: List[Tuple[str, dict]]) -> List[nn.Module]:
    """The ``nn.Module`` s whose ``__init__`` is running in ``frames``, innermost first."""
    owners: List[nn.Module] = []
    for name, local_vars in frames:
        owner = local_vars.get('self') if name == '__init__' else None
        if isinstance(owner, nn.Module) and not any(owner is o for o in owners):
            owners.append(owner)
    return owners


def _check_conv_cfg_context(frames: List[Tuple[str, dict]], where: str) -> None:
    """Refuse the places where ``conv_cfg`` builds something a MoE conv cannot be."""
    for name, local_vars in frames:
        if name == 'build_upsample_layer':
            raise ValueError(f'{where}: built by build_upsample_layer, which expects an '
                             'upsampling (transposed) conv; MoE convs are plain convs')
        if name == '__init__' and isinstance(local_vars.get('self'), ConvModule):
            for flag in ('with_spectral_norm', 'efficient_conv_bn_eval'):
                if local_vars.get(flag):
                    raise ValueError(f'{where}: ConvModule({flag}=True) reads and '
                                     "rewrites its conv's weight; a MoE conv has one "
                                     f'weight per expert: set {flag}=False')
            return  # the innermost ConvModule decides


def build_moe_conv(type_name: str, in_channels: int, out_channels: int, kernel_size,
                   stride=1, padding=0, dilation=1, groups: int = 1, bias: bool = True, *,
                   where: str, conv_module: Optional[ConvModule] = None,
                   **moe_kwargs) -> nn.Module:
    """A MoE conv of type ``type_name`` with a dense conv's geometry.

    ``where`` starts every error message; with ``conv_module`` (the ``ConvModule``
    the layer sits in), every expert is initialised as that ``ConvModule``
    initialises its dense conv.
    """
    if type_name not in LAYER_TYPES:
        raise ValueError(f'{where}: type={type_name!r} is unknown; choose from '
                         f'{sorted(LAYER_TYPES)}')
    layer_cls = LAYER_TYPES[type_name]
    geometry = (f'{in_channels}→{out_channels} channels, kernel_size={kernel_size}, '
                f'stride={stride}, padding={padding}, dilation={dilation}, groups={groups}')
    try:
        if layer_cls is MoEConv2d:
            layer = MoEConv2d(in_channels, out_channels, kernel_size, stride, padding,
                              dilation, groups, bias, **moe_kwargs)
        elif groups != 1:
            raise ValueError(f'{type_name} supports groups=1 only, got groups={groups}')
        else:
            layer = layer_cls(in_channels, out_channels, kernel_size, stride, padding,
                              dilation, bias=bias, **moe_kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f'{where} ({geometry}): {err}') from err
    if conv_module is not None and isinstance(layer, MoEConv2d):
        init_like_conv_module(layer, conv_module)
    return layer


def _conv_cfg_builder(type_name: str):

    def build(*args, **kwargs) -> nn.Module:
        frames = construction_frames()
        owners = modules_under_construction(frames)
        chain = ' > '.join(type(o).__name__ for o in reversed(owners)) or 'no module'
        where = f'conv_cfg type {type_name} built in {chain}'
        _check_conv_cfg_context(frames, where)
        for owner in owners:  # in those modules, conv_cfg builds only that child
            check_servable(owner, UNSERVABLE.get(type(owner).__name__, ('',))[0], where)
        inner = owners[0] if owners else None
        return build_moe_conv(type_name, *args, where=where, **kwargs,
                              conv_module=inner if isinstance(inner, ConvModule) else None)

    build.__name__ = build.__qualname__ = type_name
    build.__doc__ = f'Build a :class:`{type_name}` from ``conv_cfg`` (see build_moe_conv).'
    return build


def init_like_conv_module(layer: MoEConv2d, conv_module) -> None:
    """Initialise every expert as ``conv_module`` initialises a dense conv (mmcv's own
    ``ConvModule.init_weights``, which picks kaiming for its activation)."""
    for conv in layer.expert_convs():
        ConvModule.init_weights(SimpleNamespace(
            conv=conv, with_activation=conv_module.with_activation,
            act_cfg=conv_module.act_cfg, with_norm=False))


def register_conv_types(registry=MODELS) -> None:
    """Register the MoE conv types for ``conv_cfg`` (idempotent)."""
    for name in LAYER_TYPES:
        if name not in registry.module_dict:
            registry.register_module(name=name, module=_conv_cfg_builder(name))


register_conv_types()
