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

``expert='subnet'`` (default ``'conv'``) makes whole towers the experts, the paper's
main variant: each matched ``nn.ModuleList`` / ``nn.Sequential`` that its owner runs
in order becomes a :class:`~mmdet_moe.models.tower_moe.TowerMoE` of N copies routed
per (image, level) by one gate, optionally with the output conv in each expert::

    dict(paths='bbox_head.cls_convs', expert='subnet', num_experts=4, top_k=2,
         output='retina_cls', balance_cfg=dict(importance=0.5))

(see :mod:`.subnet_insertion`; a stock checkpoint upcycles into every expert).
"""
import fnmatch
from typing import Dict, List, Optional, Sequence

import torch.nn as nn
from mmcv.cnn import ConvModule
from mmengine.logging import print_log

from mmdet.registry import MODELS

from ..layers import MoEConv2d, prune_model_experts
from ..layers._checks import has_zero_padding
from .conv_types import LAYER_TYPES, build_moe_conv, check_servable
from .subnet_insertion import insert_subnet_moe
from .upcycling import freeze_all_but_moe


def match_module_paths(model: nn.Module, pattern: str) -> List[str]:
    """Names of modules matching ``pattern`` component-wise (``*`` = one component);
    a module used at several paths (a shared conv) matches at each of them."""
    parts = pattern.split('.')
    return [name for name, _ in model.named_modules(remove_duplicate=False)
            if name and len(name.split('.')) == len(parts)
            and all(fnmatch.fnmatchcase(n, p) for n, p in zip(name.split('.'), parts, strict=True))]


def uses_of(model: nn.Module, module: nn.Module) -> List[str]:
    """Every path at which ``module`` sits in ``model`` (a module shared by several
    owners, e.g. a head conv shared across FPN levels, has several)."""
    return [name for name, m in model.named_modules(remove_duplicate=False)
            if m is module and name]


def _replace_conv(model: nn.Module, path: str, layer_type: str, kwargs: dict,
                  where: str) -> nn.Module:
    """Put a MoE layer with the geometry of the conv at ``path`` in its place, at every
    path where that conv object is used: one MoE module then serves all its uses (a
    head conv shared across levels is routed per level as the head calls it)."""
    conv = model.get_submodule(path)
    if type(conv) is not nn.Conv2d:
        raise ValueError(f'{where}: {path!r} is a {type(conv).__name__}, not an nn.Conv2d; '
                         f'name the conv inside it (e.g. {path}.conv)')
    if not has_zero_padding(conv):
        raise ValueError(f'{where}: {path!r} has padding={conv.padding!r}, padding_mode='
                         f'{conv.padding_mode!r}; MoE convs support numeric zero padding')
    uses = uses_of(model, conv)
    for use in uses:
        parts = use.split('.')
        for depth in range(len(parts)):  # every ancestor's forward must call the conv
            check_servable(model.get_submodule('.'.join(parts[:depth])), parts[depth],
                           f'{where} at {use!r}')
    parent = model.get_submodule(path.rpartition('.')[0])
    layer = build_moe_conv(
        layer_type, conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
        conv.padding, conv.dilation, conv.groups, conv.bias is not None,
        where=f'{where} at {path!r}',
        conv_module=parent if isinstance(parent, ConvModule) else None, **kwargs)
    for use in uses:
        owner, _, name = use.rpartition('.')
        setattr(model.get_submodule(owner), name, layer)
    if len(uses) > 1:
        print_log(f'{where}: the conv at {path!r} is also used at '
                  f'{[u for u in uses if u != path]}; one {layer_type} serves every use',
                  logger='current')
    return layer


def insert_moe_layers(model: nn.Module, moe_layers: Sequence[dict],
                      key: str = 'moe_layers') -> List[str]:
    """Replace the convs (``expert='subnet'``: the towers) named by each spec of
    ``moe_layers`` in place.

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
        expert = spec.pop('expert', 'conv')
        if expert not in ('conv', 'subnet'):
            raise ValueError(f"{where}.expert={expert!r} is unknown; choose 'conv' (MoE "
                             "convs in place of single convs) or 'subnet' (whole towers)")
        if expert == 'subnet':
            replaced += _insert_subnets(model, paths, spec, where)
            continue
        if 'output' in spec:
            raise ValueError(f"{where}.output needs expert='subnet'")
        layer_type = spec.pop('type', 'MoEConv2d')
        if layer_type not in LAYER_TYPES:
            raise ValueError(f'{where}.type={layer_type!r} is unknown; choose from '
                             f'{sorted(LAYER_TYPES)}')
        shared_gate = spec.pop('shared_gate', False)
        new_layers = []
        for pattern in paths:
            names = match_module_paths(model, pattern)
            if not names:
                convs = [n for n, m in model.named_modules(remove_duplicate=False)
                         if isinstance(m, nn.Conv2d)]
                raise ValueError(f'{where}.paths: {pattern!r} matches no module of '
                                 f'{type(model).__name__}; conv paths include '
                                 f'{convs[:8]}{" ..." if len(convs) > 8 else ""}')
            for name in names:
                if any(model.get_submodule(name) is layer for layer in new_layers):
                    continue  # a use of a shared conv this spec already replaced
                new_layers.append(_replace_conv(model, name, layer_type, spec, where))
                replaced.append(name)
        if shared_gate:
            _share_gate(new_layers, where)
    return replaced


def _insert_subnets(model: nn.Module, paths: List[str], spec: dict,
                    where: str) -> List[str]:
    """Replace each tower matched by ``paths`` by a subnet MoE (see .subnet_insertion)."""
    for key, why in (('type', "MoE conv types apply to expert='conv'"),
                     ('shared_gate', "one gate routing two towers is MoERetinaHead("
                      "moe_branches='shared'); expert='subnet' gives each tower its gate")):
        if key in spec:
            raise ValueError(f"{where}.{key} is not a setting of expert='subnet': {why}")
    names = []
    for pattern in paths:
        matched = match_module_paths(model, pattern)
        if not matched:
            towers = [n for n, m in model.named_modules()
                      if isinstance(m, (nn.ModuleList, nn.Sequential)) and n]
            near = [n for n in towers if n.split('.')[0] == pattern.split('.')[0]]
            towers = near or towers
            raise ValueError(f'{where}.paths: {pattern!r} matches no module of '
                             f'{type(model).__name__}; tower paths include '
                             f'{towers[:8]}{" ..." if len(towers) > 8 else ""}')
        names += matched
    if spec.get('output') is not None and len(names) > 1:
        raise ValueError(f'{where}.output={spec["output"]!r} names one conv but paths '
                         f'match {len(names)} towers {names}: give one spec per tower')
    for name in names:
        insert_subnet_moe(model, name, spec, where)
    return names


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
def MoEDetector(detector: Optional[dict] = None, moe_layers: Sequence[dict] = (),
                train_only_moe: bool = False, detector_type: Optional[str] = None,
                expert_counts: Optional[Dict[str, int]] = None,
                **detector_args) -> nn.Module:
    """Build a detector (any mmdet detector config) and insert ``moe_layers``.
    With ``train_only_moe`` every non-MoE parameter is frozen (fine-tuning MoE parts
    of a trained detector). ``expert_counts`` (``{MoE module path: n}``, written by
    ``tools/prune_experts.py``) keeps the first n experts of each named MoE module
    (wherever it came from: ``moe_layers``, a MoE head or neck, ``conv_cfg``), so
    that the checkpoint of a pruned model loads.

    The detector is given flat, its keys beside ``moe_layers`` and its class in
    ``detector_type``, so a config that inherits a stock one only changes ``type``
    and keeps ``model.backbone`` etc. where mmdet's tools look for them
    (``init_detector`` reads ``config.model.backbone``)::

        model = dict(type='MoEDetector', detector_type='FasterRCNN',
                     moe_layers=[dict(paths='rpn_head.rpn_conv', num_experts=4)])

    or nested as ``detector=dict(type='FasterRCNN', ...)``.

    The result is the detector itself, of its own class, with the same state-dict
    keys; like every detector once ``mmdet_moe`` is imported, its loss dict has the
    ``loss_moe_*`` of its MoE layers.
    """
    if (detector is None) == (detector_type is None):
        raise ValueError(
            'MoEDetector needs the detector either flat, detector_type="<class>" beside '
            'its keys (backbone=..., ...), or nested, detector=dict(type=...); got '
            + ('both' if detector is not None else 'neither'))
    if detector is None:
        detector = dict(detector_args, type=detector_type)
    elif detector_args:
        raise ValueError(f'MoEDetector: {sorted(detector_args)} given beside detector=; '
                         'put them inside detector=dict(...)')
    model = MODELS.build(detector)
    insert_moe_layers(model, moe_layers)
    if expert_counts:
        for path, count in expert_counts.items():
            if isinstance(count, bool) or not isinstance(count, int):
                raise ValueError(f'MoEDetector: expert_counts[{path!r}] must be an int '
                                 f'(experts kept), got {count!r}')
        prune_model_experts(model, {path: list(range(count))
                                    for path, count in expert_counts.items()})
    if train_only_moe:
        freeze_all_but_moe(model)
    return model
