"""MoE conv types for mmcv's ``conv_cfg``, as mmcv registers ``DCNv2``.

Any mmdet module that builds its convs with ``ConvModule`` / ``build_conv_layer``
(FPN, dense heads, RoI heads, backbones) gets MoE convs from one config line::

    neck=dict(type='FPN', ..., conv_cfg=dict(type='MoEConv2d', num_experts=4, top_k=2,
                                             balance_cfg=dict(importance=0.5)))

The types are registered in mmengine's root ``MODELS`` (where mmcv's conv types
live), so every scope finds them. Each expert starts from the distribution of the
conv it stands for: inside a ``ConvModule``, ``ConvModule``'s own initialisation is
applied to every expert; the owners' ``init_cfg`` reach every expert later (see
:meth:`MoEConv2d.apply`).

A conv built from ``conv_cfg`` does not know the module it is built for, and nothing
here inspects its callers. What depends on the owner happens when the layer is put
into it, through PyTorch's global module-registration hook
(:func:`_on_module_registration`): the owner and the attribute are then named by
PyTorch itself. Errors at the build name the layer's type and geometry; errors on
placement name the owner and attribute; one refusal can only run at the first
forward (see :func:`_refuse_efficient_conv_bn_eval`) and says so.
"""
import inspect
import weakref
from types import SimpleNamespace
from typing import List, Optional, Tuple

import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.logging import print_log
from mmengine.registry import MODELS
from mmdet.models.detectors import BaseDetector
from mmdet.registry import MODELS as MMDET_MODELS
from torch.nn.modules.module import register_module_module_registration_hook

from ..layers import CPMuMoEConv2d, MoEConv2d, TRMuMoEConv2d

LAYER_TYPES = {cls.__name__: cls for cls in (MoEConv2d, CPMuMoEConv2d, TRMuMoEConv2d)}
MOE_CONVS: Tuple[type, ...] = tuple(LAYER_TYPES.values())

# Modules whose forward reads a child conv's weight instead of calling the conv, so a
# MoE layer there would never route: {owner class: (child attribute, why)}.
UNSERVABLE = {
    'TaskDecomposition': ('reduction_conv', "TOOD's TaskDecomposition multiplies "
                          'reduction_conv.conv.weight by its layer attention instead of '
                          'calling the conv'),
}

# Arguments that build_upsample_layer passes to upsampling layers and no plain conv takes.
UPSAMPLE_ARGS = ('output_padding', 'scale_factor')

# MoEConv2d layers built from conv_cfg and not yet put into a module: the first module
# they are put into decides their initialisation (a ConvModule's, or their own).
_AWAITING_OWNER: 'weakref.WeakSet[MoEConv2d]' = weakref.WeakSet()
# MoE convs built from conv_cfg → their dense_convs policy (see check_coverage).
_FROM_CONV_CFG: 'weakref.WeakKeyDictionary[nn.Module, str]' = weakref.WeakKeyDictionary()
DENSE_CONVS = ('log', 'error')
# ConvModules holding a MoE conv that run _refuse_efficient_conv_bn_eval before forward.
_GUARDED: 'weakref.WeakSet[ConvModule]' = weakref.WeakSet()


def check_servable(owner: nn.Module, child: str, where: str) -> None:
    """Raise if ``owner``'s forward cannot run a MoE layer in its child ``child``."""
    entry = UNSERVABLE.get(type(owner).__name__)
    if entry is not None and entry[0] == child:
        raise ValueError(f'{where}: a MoE conv cannot serve {type(owner).__name__}.'
                         f'{child}: {entry[1]}; choose another conv (for TOOD: '
                         'bbox_head.inter_convs.*.conv)')


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

    def build(*args, dense_convs: str = 'log', **kwargs) -> nn.Module:
        where = f'conv_cfg type {type_name}'
        if dense_convs not in DENSE_CONVS:
            raise ValueError(f'{where}: dense_convs={dense_convs!r} is unknown; choose '
                             f"{DENSE_CONVS} (what to do with the plain convs of a "
                             'component that conv_cfg does not reach)')
        for name in UPSAMPLE_ARGS:
            if name in kwargs:
                raise ValueError(
                    f'{where}: got {name}={kwargs[name]!r}, which only upsampling layers '
                    'take: build_upsample_layer expects an upsampling (transposed) conv '
                    "there; MoE convs are plain convs: choose an upsampling type (e.g. "
                    "'deconv', 'nearest')")
        layer = build_moe_conv(type_name, *args, where=where, **kwargs)
        if isinstance(layer, MoEConv2d):
            _AWAITING_OWNER.add(layer)
        _FROM_CONV_CFG[layer] = dense_convs
        return layer

    build.__name__ = build.__qualname__ = type_name
    build.__doc__ = f'Build a :class:`{type_name}` from ``conv_cfg`` (see build_moe_conv).'
    return build


def init_like_conv_module(layer: MoEConv2d, conv_module: ConvModule) -> None:
    """Initialise every expert as ``conv_module`` initialises a dense conv (mmcv's own
    ``ConvModule.init_weights``, which picks kaiming for its activation)."""
    for conv in layer.expert_convs():
        ConvModule.init_weights(SimpleNamespace(
            conv=conv, with_activation=conv_module.with_activation,
            act_cfg=conv_module.act_cfg, with_norm=False))


def _refuse_efficient_conv_bn_eval(conv_module: ConvModule, args: tuple) -> None:
    """Forward pre-hook of a ``ConvModule`` that holds (or held) a MoE conv.

    ``ConvModule`` turns ``efficient_conv_bn_eval`` on after its conv is placed (and
    ``turn_on_efficient_conv_bn_eval`` may do so any time later), so this can only be
    checked when the module runs. Its eval path would call the fused dense weight
    instead of the MoE layer's forward.
    """
    if isinstance(conv_module.conv, MOE_CONVS) and \
            getattr(conv_module, 'efficient_conv_bn_eval_forward', None) is not None:
        raise ValueError(
            f'{type(conv_module.conv).__name__} in ConvModule.conv, refused at the '
            'forward (ConvModule turns this on after building its conv, so the build '
            'cannot check it): ConvModule(efficient_conv_bn_eval=True) folds its BN into its '
            "conv's weight and calls the conv with it; a MoE conv has one weight per "
            'expert: set efficient_conv_bn_eval=False')


def _place_in_conv_module(conv_module: ConvModule, layer: nn.Module, init: bool) -> None:
    """Checks and initialisation for a MoE conv put into ``conv_module.conv``."""
    if conv_module.with_spectral_norm:
        raise ValueError(f'{type(layer).__name__} in ConvModule.conv: ConvModule('
                         "with_spectral_norm=True) reads and rewrites its conv's weight; "
                         'a MoE conv has one weight per expert: set with_spectral_norm=False')
    if init:
        init_like_conv_module(layer, conv_module)
    if conv_module not in _GUARDED:
        conv_module.register_forward_pre_hook(_refuse_efficient_conv_bn_eval)
        _GUARDED.add(conv_module)


def _on_module_registration(owner: nn.Module, name: str,
                            child: Optional[nn.Module]) -> None:
    """PyTorch's global module-registration hook: runs whenever any module is put into
    another (``owner.name = child``, ``add_module``), before it is stored, so an error
    leaves ``owner`` as it was. Any other module costs a type test and a look-up."""
    if isinstance(child, MOE_CONVS):
        awaiting = child in _AWAITING_OWNER
        _AWAITING_OWNER.discard(child)
        if isinstance(owner, ConvModule) and name == 'conv':
            _place_in_conv_module(owner, child, init=awaiting)
    if isinstance(owner, BaseDetector) and child is not None:
        check_coverage(child, name)
    entry = UNSERVABLE.get(type(owner).__name__)
    if entry is not None and entry[0] == name and child is not None:
        moe = next((m for m in child.modules() if isinstance(m, MOE_CONVS)), None)
        if moe is not None:
            check_servable(owner, name, f'{type(moe).__name__} placed in '
                           f'{type(owner).__name__}')


def dense_conv_paths(component: nn.Module) -> List[str]:
    """Paths of the plain ``nn.Conv2d`` of ``component`` outside MoE layers."""
    inside = {id(m) for moe in component.modules() if isinstance(moe, MOE_CONVS)
              for m in moe.modules()}
    return [n for n, m in component.named_modules()
            if type(m) is nn.Conv2d and id(m) not in inside]


def check_coverage(component: nn.Module, name: str) -> None:
    """A detector's component (``name``: neck, bbox_head, ...) got MoE convs from
    ``conv_cfg`` and also holds plain ``nn.Conv2d`` that its code builds without it:
    say how many stayed dense in one line, or refuse with ``dense_convs='error'``."""
    policies = {_FROM_CONV_CFG[m] for m in component.modules() if m in _FROM_CONV_CFG}
    if not policies:
        return
    dense = dense_conv_paths(component)
    if not dense:
        return
    moe = sum(1 for m in component.modules() if m in _FROM_CONV_CFG)
    text = (f'{name} ({type(component).__name__}): conv_cfg made {moe} MoE conv(s); '
            f'{len(dense)} nn.Conv2d its code builds without conv_cfg stay dense '
            f'({", ".join(f"{name}.{p}" for p in dense[:4])}{" ..." if len(dense) > 4 else ""}); '
            "make them MoE by path with model=dict(type='MoEDetector', moe_layers=["
            f"dict(paths='{name}.{dense[0]}', ...)])")
    if 'error' in policies:
        raise ValueError(text + " (refused: conv_cfg has dense_convs='error'; set "
                         "dense_convs='log' to keep them dense)")
    print_log(text, logger='current')


def conv_cfg_hint(cfg: dict, error: TypeError) -> Optional[str]:
    """For a component whose class takes no ``conv_cfg`` but whose config gives it a
    MoE conv type, what to write instead (else None)."""
    conv_cfg = cfg.get('conv_cfg') if isinstance(cfg, dict) else None
    if not (isinstance(conv_cfg, dict) and conv_cfg.get('type') in LAYER_TYPES and
            "unexpected keyword argument 'conv_cfg'" in str(error)):
        return None
    kind = cfg.get('type')
    cls = MMDET_MODELS.get(kind) if isinstance(kind, str) else kind
    try:  # the class itself, not a module it builds, must lack conv_cfg
        if cls is None or 'conv_cfg' in inspect.signature(cls).parameters:
            return None
    except (TypeError, ValueError):  # no signature to read
        return None
    try:
        plain = MMDET_MODELS.build({k: v for k, v in cfg.items() if k != 'conv_cfg'})
        paths = dense_conv_paths(plain)
    except Exception:  # noqa: BLE001  (the hint must not hide the error it explains)
        paths = []
    listed = f': its convs are {paths[:6]}{" ..." if len(paths) > 6 else ""}' if paths else ''
    return (f'{kind} takes no conv_cfg, so conv_cfg={conv_cfg.get("type")} cannot reach its '
            f"convs; drop its conv_cfg and insert MoE convs by path: model=dict(type='MoEDetector', "
            f"detector_type=<the detector>, moe_layers=[dict(paths='<component>."
            f"{paths[0] if paths else '<conv>'}', num_experts=...)]) with the component's "
            f'attribute (e.g. neck){listed}')


def register_conv_types(registry=MODELS) -> None:
    """Register the MoE conv types for ``conv_cfg`` (idempotent)."""
    for name in LAYER_TYPES:
        if name not in registry.module_dict:
            registry.register_module(name=name, module=_conv_cfg_builder(name))


register_conv_types()
register_module_module_registration_hook(_on_module_registration)  # once: at import
