"""Insertion of whole-subnet experts by path (``expert='subnet'``).

``MoEDetector`` / :func:`~mmdet_moe.models.insert_moe_layers` with ``expert='subnet'``::

    moe_layers = [dict(paths='bbox_head.cls_convs', expert='subnet', num_experts=4,
                       top_k=2, balance_cfg=dict(importance=0.5)),
                  dict(paths='bbox_head.reg_convs', expert='subnet',
                       output='retina_reg')]  # the output conv joins each expert

A *tower* is an ``nn.ModuleList`` or ``nn.Sequential`` that its owner (e.g. a dense
head) runs in order, ``for layer in self.cls_convs: x = layer(x)`` or
``x = self.tower(x)``. The tower is replaced by a
:class:`~mmdet_moe.models.TowerMoE` at the same path, whose experts are copies of the
whole tower; it iterates as a one-layer tower, so the owner's own loop calls it once
per call of its forward: a dense head routes each (image, FPN level) in level order
with one gate, as the paper's RetinaNet does. With ``output``, the owner's output conv
joins every expert and its place holds an
:class:`~mmdet_moe.models.OutputInExperts` (an identity). A dense checkpoint's keys
(``bbox_head.cls_convs.<i>.…``, ``bbox_head.retina_cls.…``) load into every expert
(``bbox_head.cls_convs.experts.<n>.<i>.…``, ``….experts.<n>.retina_cls.…``) through the
owner's :class:`~mmdet_moe.models.UpcycleDenseKeys`.

What the module structure shows is checked here, before anything changes; how the
owner's code runs the tower is checked at its first forward
(:class:`~mmdet_moe.models.tower_call_check.TowerCallCheck`): no source is read.
"""
import copy
from collections import defaultdict
from typing import List, Optional, Sequence, Tuple

import torch.nn as nn
from mmengine.model import BaseModule

from ..layers import is_moe_module
from .conv_types import check_servable
from .tower_call_check import TowerCallCheck
from .tower_moe import OutputInExperts, TowerMoE, UpcycleDenseKeys

# spec keys of expert='subnet' (besides paths and expert)
SUBNET_KEYS = ('num_experts', 'top_k', 'gate_cfg', 'balance_cfg', 'impl', 'capacity_factor',
               'in_channels', 'output', 'upcycle_noise_std')


def _output_init_cfgs(owner: nn.Module, output: str) -> List[dict]:
    """The owner's ``init_cfg`` overrides naming ``output``, as mmengine applies them."""
    init_cfg = getattr(owner, 'init_cfg', None) or []
    cfgs = []
    for cfg in [init_cfg] if isinstance(init_cfg, dict) else list(init_cfg):
        cfg = copy.deepcopy(dict(cfg))
        if cfg.get('type') == 'Pretrained':
            continue
        override = cfg.pop('override', None) or []
        for entry in [override] if isinstance(override, dict) else list(override):
            entry = copy.deepcopy(dict(entry))
            if entry.pop('name', None) == output:
                cfgs.append(entry if entry else cfg)
    return cfgs


def _in_channels(modules: Sequence[nn.Module]) -> Optional[int]:
    for layer in modules:
        for module in layer.modules():
            channels = getattr(module, 'in_channels', None)
            if isinstance(channels, int):
                return channels
    return None


def _check_not_shared(model: nn.Module, module: nn.Module, path: str, where: str) -> None:
    paths = defaultdict(list)
    for name, m in model.named_modules(remove_duplicate=False):
        paths[id(m)].append(name)
    for sub_name, sub in module.named_modules(prefix=path):
        others = [p for p in paths[id(sub)] if p != sub_name]
        if others:
            conv = next((f'{sub_name}.{n}'.rstrip('.') for n, m in sub.named_modules()
                         if type(m) is nn.Conv2d), None)
            alternative = ('. Make the shared conv a MoE conv instead (expert=' + repr('conv')
                           + f' with paths={conv!r}: one MoE layer serves every use)'
                           if conv else '')
            raise ValueError(f'{where} at {path!r}: {sub_name!r} is also at {others}; '
                             f'its copies in the experts would no longer be shared'
                             f'{alternative}')


def _checked_tower(model: nn.Module, path: str, where: str
                   ) -> Tuple[nn.Module, str, List[Tuple[str, nn.Module]]]:
    """(owner, tower name, tower children) of the tower at ``path``, or a ValueError if
    its structure cannot make a subnet MoE."""
    tower = model.get_submodule(path)
    parts = path.split('.')
    owner_path, name = '.'.join(parts[:-1]), parts[-1]
    owner = model.get_submodule(owner_path)
    parent_hint = (f'; name the tower {owner_path!r}' if isinstance(
        owner, (nn.ModuleList, nn.Sequential)) else '')
    if not isinstance(tower, (nn.ModuleList, nn.Sequential)):
        conv_hint = (f"; for one conv use expert='conv' on {path}" if isinstance(
            tower, nn.Conv2d) else f"; for its conv use expert='conv' on {path}.conv"
            if isinstance(getattr(tower, 'conv', None), nn.Conv2d) else '')
        raise ValueError(f"{where} at {path!r}: expert='subnet' needs a tower (an "
                         'nn.ModuleList or nn.Sequential its owner runs in order), got a '
                         f'{type(tower).__name__}{parent_hint}{conv_hint}')
    if isinstance(owner, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
        raise ValueError(f'{where} at {path!r}: the tower sits in a {type(owner).__name__} '
                         f'({owner_path!r}), whose users index it; a tower must be an '
                         'attribute of the module whose forward runs it')
    if isinstance(tower, nn.Sequential) and type(tower).forward is not nn.Sequential.forward:
        raise ValueError(f'{where} at {path!r}: {type(tower).__name__} has its own forward; '
                         'a subnet expert runs the layers in order as nn.Sequential does')
    if tower._parameters or tower._buffers:
        raise ValueError(f'{where} at {path!r}: the tower holds parameters of its own; '
                         'a subnet expert copies only its layers')
    if any(is_moe_module(m) for m in tower.modules()):
        raise ValueError(f'{where} at {path!r}: the tower already holds MoE layers; give '
                         "the expert='subnet' spec before any expert='conv' spec inside it")
    children = list(tower._modules.items())
    clashes = sorted({'experts', 'gate'} & {n for n, _ in children})
    if clashes:
        raise ValueError(f'{where} at {path!r}: tower layers named {clashes} clash with '
                         'the MoE keys')
    for depth in range(len(parts)):  # every ancestor's forward must call its child
        check_servable(model.get_submodule('.'.join(parts[:depth])), parts[depth],
                       f'{where} at {path!r}')
    _check_not_shared(model, tower, path, where)
    return owner, name, children


def _checked_output(model: nn.Module, path: str, output, children: Sequence[str],
                    where: str) -> Tuple[str, nn.Module]:
    """(name, module) of the output conv ``output`` beside the tower at ``path``, or a
    ValueError if it cannot join the experts."""
    if not isinstance(output, str) or not output:
        raise ValueError(f'{where}.output must be the name (or path) of the output '
                         f'conv, got {output!r}')
    owner_path, name = path.rpartition('.')[0], output.rsplit('.', 1)[-1]
    owner = model.get_submodule(owner_path)
    if '.' in output and output.rsplit('.', 1)[0] != owner_path:
        raise ValueError(f'{where}.output={output!r}: the output conv must sit beside '
                         f'the tower, in {owner_path!r} (e.g. output={name!r})')
    module = owner._modules.get(name)
    if module is None or module is model.get_submodule(path):
        convs = [n for n, m in owner.named_children()
                 if isinstance(m, nn.Conv2d) or hasattr(m, 'conv')]
        raise ValueError(f'{where}.output={output!r}: {type(owner).__name__} at '
                         f'{owner_path!r} has no module {name!r} beside the tower; '
                         f'its convs: {convs}')
    if name in children:
        raise ValueError(f'{where}.output={output!r}: the tower has a layer named '
                         f'{name!r} too')
    if any(is_moe_module(m) for m in module.modules()):
        raise ValueError(f'{where}.output={output!r} holds MoE layers')
    _check_not_shared(model, module, f'{owner_path}.{name}'.lstrip('.'), where)
    return name, module


USE_CONV_EXPERTS = "; use expert='conv' on the tower's convs instead"


def _check_init_weights(owner: nn.Module, name: str, moe: TowerMoE,
                        output: Optional[str], where: str, hint: str) -> None:
    """Run the owner's own ``init_weights`` on a copy holding the subnet MoE: some heads
    reach into their towers there (DDOD initialises every layer's ``.conv``), which
    would fail when the Runner initialises the model, after the build."""
    if getattr(type(owner), 'init_weights', BaseModule.init_weights) is \
            BaseModule.init_weights:
        return  # init_cfg only (or none): applies to whatever modules there are
    probe = copy.copy(owner)  # the owner's modules, in a new dict, with the MoE in place
    probe._modules = dict(owner._modules, **{name: moe})
    if output is not None:
        probe._modules[output] = OutputInExperts(name)
    probe = copy.deepcopy(probe)
    try:
        probe.init_weights()
    except (AttributeError, TypeError, IndexError, KeyError) as err:
        raise ValueError(
            f'{where}: {type(owner).__name__}.init_weights reads the layers of its tower '
            f'{name!r} ({type(err).__name__}: {err}), which a subnet MoE replaces as a '
            f'whole{hint}') from err


def insert_subnet_moe(model: nn.Module, path: str, spec: dict, where: str) -> TowerMoE:
    """Replace the tower at ``path`` of ``model`` by a :class:`TowerMoE` (see the module
    docstring); ``spec`` holds :data:`SUBNET_KEYS`. Nothing changes when it raises."""
    unknown = sorted(set(spec) - set(SUBNET_KEYS))
    if unknown:
        raise ValueError(f"{where}: {unknown} are not settings of expert='subnet'; "
                         f'it takes {list(SUBNET_KEYS)}')
    spec = dict(spec)
    owner, name, children = _checked_tower(model, path, where)
    output = spec.pop('output', None)
    layers = list(children)
    if output is not None:
        output, out_module = _checked_output(model, path, output, [n for n, _ in children],
                                             where)
        layers.append((output, out_module))
    hint = (f"; to make single convs MoE use expert='conv' on {path}.*.conv"
            if children and all(isinstance(getattr(layer, 'conv', None), nn.Conv2d)
                                for _, layer in children) else USE_CONV_EXPERTS)
    check = TowerCallCheck(where, path, type(owner).__name__, name, output, hint)
    check.check_declared(owner)

    in_channels = spec.pop('in_channels', None)
    if in_channels is None:
        in_channels = _in_channels([m for _, m in layers])
        if in_channels is None:
            raise ValueError(f'{where} at {path!r}: cannot tell the input channels of the '
                             'tower (no layer has in_channels): give in_channels=')
    if not layers:
        raise ValueError(f'{where} at {path!r}: the tower is empty (with an output conv, '
                         'that conv alone can be the expert: set output=)')
    num_experts = spec.pop('num_experts', 4)
    if not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(f'{where} at {path!r}: num_experts must be an int >= 2, '
                         f'got {num_experts!r}')
    # dense keys: the tower's layers under the tower, the output conv beside it
    dense = [(f'{name}.{child}' if n < len(children) else child, child, module)
             for n, (child, module) in enumerate(layers)]
    try:
        moe = TowerMoE(dense, num_experts, tower_name=name, output_name=output,
                       output_init_cfgs=_output_init_cfgs(owner, output) if output else (),
                       upcycle_noise_std=spec.pop('upcycle_noise_std', 0.0),
                       in_channels=in_channels, **spec)
    except (TypeError, ValueError) as err:
        raise ValueError(f'{where} at {path!r}: {err}') from err
    _check_init_weights(owner, name, moe, output, f'{where} at {path!r}', hint)
    setattr(owner, name, moe)
    if output is not None:
        setattr(owner, output, OutputInExperts(name))
    owner.register_load_state_dict_pre_hook(UpcycleDenseKeys(name))
    check.install(owner)
    return moe
