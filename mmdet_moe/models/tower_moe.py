"""Whole-subnet experts by path: a tower of layers becomes N routed copies of itself.

``MoEDetector`` / :func:`~mmdet_moe.models.insert_moe_layers` with ``expert='subnet'``::

    moe_layers = [dict(paths='bbox_head.cls_convs', expert='subnet', num_experts=4,
                       top_k=2, balance_cfg=dict(importance=0.5)),
                  dict(paths='bbox_head.reg_convs', expert='subnet',
                       output='retina_reg')]  # the output conv joins each expert

A *tower* is an ``nn.ModuleList`` or ``nn.Sequential`` that its owner (e.g. a dense
head) runs in order, ``for layer in self.cls_convs: x = layer(x)`` or
``x = self.tower(x)``, at exactly one place. The tower is replaced by a
:class:`TowerMoE` at the same path: a :class:`~mmdet_moe.layers.MoE` whose experts
are copies of the whole tower (an ``nn.Sequential`` keeping the layers' names), and
which iterates as a one-layer tower, so the owner's own loop calls it once per call
of its forward: a dense head routes each (image, FPN level) in level order with one
gate, as the paper's RetinaNet does. With ``output``, the owner's output conv (called
on the tower's output and nowhere else) joins every expert and its place holds an
:class:`OutputInExperts` (an identity); a load-state-dict pre-hook on the owner
(:class:`UpcycleOutputKeys`) upcycles the conv's dense keys.

Upcycling: a dense checkpoint's keys (``bbox_head.cls_convs.<i>.…`` and, with an
output, ``bbox_head.retina_cls.…``) load into every expert
(``bbox_head.cls_convs.experts.<n>.<i>.…``, ``….experts.<n>.retina_cls.…``), so a
stock checkpoint loads with only the gate keys missing; with identical experts and no
gate noise the detector computes what the dense one does.

The owner's source is read at build time (:func:`tower_call_site`): a tower that is
indexed, measured, iterated with more than ``x = layer(x)`` in the loop (TOOD keeps
every intermediate feature), run at several places, or an output conv whose input is
not the tower's output or that is used elsewhere, is refused with the path and what
would work instead.
"""
import ast
import copy
import inspect
import textwrap
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn
from mmengine.registry import WEIGHT_INITIALIZERS, build_from_cfg

from ..layers import MoE, is_moe_module
from ..layers.moe_conv import noisy_copy
from .conv_types import check_servable

# spec keys of expert='subnet' (besides paths and expert)
SUBNET_KEYS = ('num_experts', 'top_k', 'gate_cfg', 'balance_cfg', 'impl', 'capacity_factor',
               'in_channels', 'output', 'upcycle_noise_std')
# classes whose methods are not read: the framework's own, which never run a head's towers
_FRAMEWORK_PACKAGES = ('torch', 'mmengine', 'builtins', 'abc', 'typing')


def _move_keys(state_dict: dict, old_prefix: str, names: Optional[Sequence[str]],
               new_prefixes: Sequence[str], noise_std: float) -> None:
    """``old_prefix + rest`` → ``new_prefix + rest`` for every new prefix (a noisy copy
    each), in place; with ``names``, only keys whose ``rest`` starts with one of them."""
    for key in [k for k in state_dict if k.startswith(old_prefix)]:
        rest = key[len(old_prefix):]
        if names is not None and rest.split('.', 1)[0] not in names:
            continue
        value = state_dict.pop(key)
        for new_prefix in new_prefixes:
            state_dict.setdefault(new_prefix + rest, noisy_copy(value, noise_std))


def _expert_prefixes(tower_prefix: str, num_experts: int, child: str = '') -> List[str]:
    return [f'{tower_prefix}experts.{n}.{child}' for n in range(num_experts)]


class TowerMoE(MoE):
    """A :class:`~mmdet_moe.layers.MoE` standing where a tower was.

    Each expert is an ``nn.Sequential`` of a copy of the tower's layers under their
    names (plus the output conv under its name). Iterating over it yields itself
    once, so the owner's ``for layer in self.<tower>: x = layer(x)`` calls the MoE once;
    calling it runs it as the ``nn.Sequential`` it replaces.

    Args:
        experts: the expert modules.
        tower_name: the tower's attribute name in its owner (e.g. ``cls_convs``).
        tower_children: the tower's child names (dense checkpoint keys under them
            are upcycled into every expert).
        output_name: the owner's output conv joined to every expert, or None.
        output_init_cfgs: the owner's ``init_cfg`` overrides for the output conv,
            applied to every expert's copy by :meth:`init_weights` (e.g. the
            focal-loss bias prior of ``retina_cls``).
        upcycle_noise_std: noise (× std of each dense tensor) added to each expert's
            copy when a dense checkpoint is loaded.
        **kwargs: for :class:`~mmdet_moe.layers.MoE` (in_channels, top_k, gate_cfg,
            balance_cfg, impl, capacity_factor).
    """

    def __init__(self, experts: Sequence[nn.Module], *, tower_name: str,
                 tower_children: Sequence[str], output_name: Optional[str] = None,
                 output_init_cfgs: Sequence[dict] = (), upcycle_noise_std: float = 0.0,
                 **kwargs):
        if upcycle_noise_std < 0:
            raise ValueError(f'upcycle_noise_std must be >= 0, got {upcycle_noise_std!r}')
        super().__init__(experts, **kwargs)
        self.tower_name, self.tower_children = tower_name, tuple(tower_children)
        self.output_name, self.output_init_cfgs = output_name, list(output_init_cfgs)
        self.upcycle_noise_std = upcycle_noise_std

    def __iter__(self):
        return iter((self,))

    def init_weights(self) -> None:
        """Apply the owner's ``init_cfg`` override of the output conv to every expert's
        copy (the owner's own override finds only the identity in its place). The
        tower layers get the owner's ``init_cfg`` as the dense ones do."""
        if self.output_name is None:
            return
        for expert in self.experts:
            for cfg in self.output_init_cfgs:
                initializer = build_from_cfg(copy.deepcopy(cfg), WEIGHT_INITIALIZERS)
                initializer.wholemodule = True
                initializer(getattr(expert, self.output_name))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # upcycling: the dense tower's keys go to every expert (the output conv's keys,
        # outside this module's prefix, are moved by the owner's UpcycleOutputKeys)
        _move_keys(state_dict, prefix, self.tower_children,
                   _expert_prefixes(prefix, self.num_experts), self.upcycle_noise_std)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        output = f', output={self.output_name!r}' if self.output_name else ''
        return f'{super().extra_repr()}, tower={self.tower_name!r}{output}'


class OutputInExperts(nn.Identity):
    """Stands where an output conv was that now ends every expert of the tower MoE
    ``tower_name``: the owner calls it on the MoE's output, which already went through
    the experts' copies."""

    def __init__(self, tower_name: str):
        super().__init__()
        self.tower_name = tower_name

    def extra_repr(self):
        return f'in the experts of {self.tower_name!r}'


class UpcycleOutputKeys:
    """Load-state-dict pre-hook of the tower's owner: a dense checkpoint's keys of the
    output conv (``<owner>.<output_name>.…``) go to every expert of the tower MoE
    (``<owner>.<tower_name>.experts.<n>.<output_name>.…``). It must run at the owner:
    torch hands each module only the keys under its own prefix. The experts and the
    noise are the tower's when the keys load (a pruned tower has fewer experts)."""

    def __init__(self, tower_name: str, output_name: str):
        self.tower_name, self.output_name = tower_name, output_name

    def __call__(self, module, state_dict, prefix, *args) -> None:
        tower = getattr(module, self.tower_name)
        _move_keys(state_dict, f'{prefix}{self.output_name}.', None,
                   _expert_prefixes(f'{prefix}{self.tower_name}.', tower.num_experts,
                                    f'{self.output_name}.'), tower.upcycle_noise_std)


# ---------------------------------------------------------------------------------
# Reading the owner's source: where and how does it run the tower?


@dataclass
class _Method:
    cls: type
    name: str
    func: object
    tree: Optional[ast.AST]  # the FunctionDef, None if the source cannot be read
    first_line: int
    lines: List[str]

    @property
    def self_name(self) -> Optional[str]:
        if self.tree is None:
            return None
        args = self.tree.args.posonlyargs + self.tree.args.args
        return args[0].arg if args else None

    def where(self, node: ast.AST) -> str:
        line = self.lines[node.lineno - 1].strip() if self.lines else ''
        return (f'{self.cls.__name__}.{self.name} (line {self.first_line + node.lineno - 1}'
                f'): `{line}`')


def _functions(value) -> Optional[object]:
    if isinstance(value, (staticmethod, classmethod)):
        return value.__func__
    if isinstance(value, property):
        return value.fget
    return value if inspect.isfunction(value) else None


def _parse(cls: type, name: str, func) -> _Method:
    try:
        lines, first = inspect.getsourcelines(func)
        tree = ast.parse(textwrap.dedent(''.join(lines))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return _Method(cls, name, func, None, 0, [])
    lines = textwrap.dedent(''.join(lines)).splitlines()
    return _Method(cls, name, func, tree if isinstance(
        tree, (ast.FunctionDef, ast.AsyncFunctionDef)) else None, first, lines)


def owner_methods(owner_cls: type) -> List[_Method]:
    """The methods of ``owner_cls`` that can run: each name's definition in the MRO,
    and the definitions these reach through ``super().name`` or ``Base.name(self)``
    (framework classes, torch and mmengine, excluded)."""
    mro = [c for c in owner_cls.__mro__ if c is not object and
           (c.__module__ or '').split('.')[0] not in _FRAMEWORK_PACKAGES]

    def definition(name: str, classes: Sequence[type]) -> Optional[Tuple[type, object]]:
        for cls in classes:
            func = _functions(vars(cls).get(name))
            if func is not None:
                return cls, func
        return None

    names = {name for cls in mro for name in vars(cls)}
    queue = [d + (n,) for n in sorted(names) if (d := definition(n, mro)) is not None]
    seen, methods = set(), []
    while queue:
        cls, func, name = queue.pop(0)
        if func in seen:
            continue
        seen.add(func)
        method = _parse(cls, name, func)
        methods.append(method)
        if method.tree is None:
            continue
        for node in ast.walk(method.tree):  # super().x / super(K, self).x / Base.x
            if not isinstance(node, ast.Attribute):
                continue
            value = node.value
            if isinstance(value, ast.Call) and isinstance(value.func, ast.Name) \
                    and value.func.id == 'super':
                after = cls
                if value.args and isinstance(value.args[0], ast.Name):
                    after = getattr(func, '__globals__', {}).get(value.args[0].id, cls)
                classes = mro[mro.index(after) + 1:] if after in mro else []
            elif isinstance(value, ast.Name):
                base = getattr(func, '__globals__', {}).get(value.id)
                classes = [c for c in getattr(base, '__mro__', ()) if c in mro] \
                    if isinstance(base, type) and base in mro else []
            else:
                continue
            found = definition(node.attr, classes)
            if found is not None:
                queue.append(found + (node.attr,))
    return methods


def _is_construction(name: str) -> bool:
    """Methods that build the module (they ran before the insertion)."""
    return name == '__init__' or name.startswith('_init')


def _uses_name(code, name: str) -> bool:
    return name in code.co_names or any(
        _uses_name(c, name) for c in code.co_consts if inspect.iscode(c))


def _references(methods: Sequence[_Method], name: str, where: str, path: str):
    """(method, node, parents) for every ``self.<name>`` in the methods that run."""
    refs = []
    for method in methods:
        if _is_construction(method.name):
            continue
        if method.tree is None:
            code = getattr(method.func, '__code__', None)
            if code is not None and _uses_name(code, name):
                raise ValueError(f'{where} at {path!r}: cannot read the source of '
                                 f'{method.cls.__name__}.{method.name}, which uses '
                                 f'{name!r}, to check how it runs the module')
            continue
        parents = {child: parent for parent in ast.walk(method.tree)
                   for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(method.tree):
            if isinstance(node, ast.Attribute) and node.attr == name and isinstance(
                    node.value, ast.Name) and node.value.id == method.self_name:
                refs.append((method, node, parents))
    return refs


@dataclass
class TowerCallSite:
    """Where the owner runs the tower: ``node`` (the ``for`` loop or the call) in
    ``method``; ``feature`` is the variable holding the tower's output (None when the
    call's value is used directly, e.g. ``self.out(self.tower(x))``)."""
    method: _Method
    node: ast.AST
    feature: Optional[str]
    parents: Dict[ast.AST, ast.AST]


def _tower_use(ref: ast.Attribute, parents) -> Optional[Tuple[ast.AST, Optional[str]]]:
    """(node, feature) if ``ref`` runs the tower in order, else None."""
    parent = parents.get(ref)
    if isinstance(parent, ast.For) and parent.iter is ref:
        body = parent.body
        if (isinstance(parent.target, ast.Name) and not parent.orelse and len(body) == 1
                and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1
                and isinstance(body[0].targets[0], ast.Name)):
            feature, call = body[0].targets[0].id, body[0].value
            if (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
                    and call.func.id == parent.target.id and not call.keywords
                    and len(call.args) == 1 and isinstance(call.args[0], ast.Name)
                    and call.args[0].id == feature):
                return parent, feature
        return None
    if isinstance(parent, ast.Call) and parent.func is ref and len(parent.args) == 1 \
            and not parent.keywords and not isinstance(parent.args[0], ast.Starred):
        statement = parents.get(parent)
        if isinstance(statement, ast.Assign) and statement.value is parent and len(
                statement.targets) == 1 and isinstance(statement.targets[0], ast.Name):
            return statement, statement.targets[0].id
        return parent, None
    return None


def _misuse(ref: ast.Attribute, parents) -> str:
    """What the code does with the tower instead of running it in order."""
    parent = parents.get(ref)
    if isinstance(parent, ast.For) and parent.iter is ref:
        return ('does more in its loop than `x = layer(x)` (it keeps, changes or reads '
                'the layers or their intermediate features)')
    if isinstance(parent, ast.Subscript) and parent.value is ref:
        return 'indexes it (runs single layers)'
    if isinstance(parent, ast.Call) and ref in parent.args:
        callee = ast.unparse(parent.func)
        return f'passes it to {callee}()'
    if isinstance(parent, ast.Call) and parent.func is ref:
        return 'calls it with other than one feature map'
    return 'uses it otherwise'


def tower_call_site(owner: nn.Module, name: str, path: str, where: str,
                    methods: Optional[List[_Method]] = None) -> TowerCallSite:
    """Check that ``owner`` runs its tower ``name`` in order at exactly one place."""
    methods = owner_methods(type(owner)) if methods is None else methods
    owner_cls = type(owner).__name__
    tower = getattr(owner, name)
    conv_hint = (f"; to make single convs MoE use expert='conv' on {path}.*.conv"
                 if all(isinstance(getattr(layer, 'conv', None), nn.Conv2d)
                        for layer in tower) and len(tower) else '')
    good, bad = [], []
    for method, ref, parents in _references(methods, name, where, path):
        use = _tower_use(ref, parents)
        (good if use else bad).append((method, ref, parents, use))
    if bad:
        method, ref, parents, _ = bad[0]
        raise ValueError(
            f'{where} at {path!r}: {owner_cls} does not run the tower only as '
            f'`for layer in self.{name}: x = layer(x)` or `x = self.{name}(x)`: '
            f'{method.where(ref)} {_misuse(ref, parents)}; a subnet expert replaces the '
            f'whole tower, which this code does not run as one{conv_hint}')
    if len(good) != 1:
        places = '; '.join(m.where(r) for m, r, _, _ in good) or 'none'
        raise ValueError(
            f'{where} at {path!r}: {owner_cls} must run the tower at exactly one place '
            f'(`for layer in self.{name}: x = layer(x)` or `x = self.{name}(x)`), '
            f'found {len(good)}: {places}; a subnet MoE must run once per call of its '
            f'owner{conv_hint}')
    method, _, parents, (node, feature) = good[0]
    return TowerCallSite(method, node, feature, parents)


def _after(node: ast.AST, anchor: ast.AST) -> bool:
    return (node.lineno, node.col_offset) > (anchor.end_lineno, anchor.end_col_offset)


def check_output_call(owner: nn.Module, site: TowerCallSite, tower_name: str,
                      output: str, path: str, where: str,
                      methods: Sequence[_Method]) -> None:
    """Check that ``owner`` calls ``output`` once, on the tower's output, and uses that
    output for nothing else."""
    refs = _references(methods, output, where, path)
    owner_cls = type(owner).__name__
    hint = 'leave output unset to make the tower alone the expert'
    if len(refs) != 1:
        places = '; '.join(m.where(r) for m, r, _ in refs) or 'none'
        raise ValueError(f'{where} at {path!r}: output {output!r} must be called exactly '
                         f'once by {owner_cls}, on the output of {tower_name}; found '
                         f'{len(refs)} uses: {places}; {hint}')
    method, ref, parents = refs[0]
    call = parents.get(ref)
    if method is not site.method or not (
            isinstance(call, ast.Call) and call.func is ref and len(call.args) == 1
            and not call.keywords):
        raise ValueError(f'{where} at {path!r}: {method.where(ref)} does not call '
                         f'{output!r} on the output of {tower_name} '
                         f'({site.method.where(site.node)}); {hint}')
    arg = call.args[0]
    if site.feature is None:
        if arg is not site.node:
            raise ValueError(f'{where} at {path!r}: {method.where(ref)} does not call '
                             f'{output!r} on the output of {tower_name}; {hint}')
        return
    if not (isinstance(arg, ast.Name) and arg.id == site.feature and _after(arg, site.node)):
        raise ValueError(f'{where} at {path!r}: {method.where(ref)} does not call '
                         f'{output!r} on {site.feature}, the output of {tower_name} '
                         f'({site.method.where(site.node)}); {hint}')
    for node in ast.walk(method.tree):
        if isinstance(node, ast.Name) and node.id == site.feature and node is not arg \
                and _after(node, site.node):
            raise ValueError(
                f'{where} at {path!r}: {method.where(node)} uses {site.feature}, the '
                f'output of {tower_name}, besides {output!r}: the output conv cannot '
                f'join the experts (they would return its output instead); {hint}')


# ---------------------------------------------------------------------------------
# Insertion


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
            raise ValueError(f'{where} at {path!r}: {sub_name!r} is also at {others}; '
                             'its copies in the experts would no longer be shared')


def insert_subnet_moe(model: nn.Module, path: str, spec: dict, where: str) -> TowerMoE:
    """Replace the tower at ``path`` of ``model`` by a :class:`TowerMoE` (see the module
    docstring); ``spec`` holds :data:`SUBNET_KEYS`. Nothing changes when it raises."""
    unknown = sorted(set(spec) - set(SUBNET_KEYS))
    if unknown:
        raise ValueError(f"{where}: {unknown} are not settings of expert='subnet'; "
                         f'it takes {list(SUBNET_KEYS)}')
    spec = dict(spec)
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

    methods = owner_methods(type(owner))
    site = tower_call_site(owner, name, path, where, methods)
    output = spec.pop('output', None)
    out_module = None
    if output is not None:
        if not isinstance(output, str) or not output:
            raise ValueError(f'{where}.output must be the name (or path) of the output '
                             f'conv, got {output!r}')
        out_name = output.rsplit('.', 1)[-1]
        if '.' in output and output.rsplit('.', 1)[0] != owner_path:
            raise ValueError(f'{where}.output={output!r}: the output conv must sit beside '
                             f'the tower, in {owner_path!r} (e.g. output={out_name!r})')
        out_module = getattr(owner, out_name, None) if out_name in owner._modules else None
        if out_module is None or out_module is tower:
            convs = [n for n, m in owner.named_children()
                     if isinstance(m, nn.Conv2d) or hasattr(m, 'conv')]
            raise ValueError(f'{where}.output={output!r}: {type(owner).__name__} at '
                             f'{owner_path!r} has no module {out_name!r} beside the tower; '
                             f'its convs: {convs}')
        if out_name in dict(children):
            raise ValueError(f'{where}.output={output!r}: the tower has a layer named '
                             f'{out_name!r} too')
        if any(is_moe_module(m) for m in out_module.modules()):
            raise ValueError(f'{where}.output={output!r} holds MoE layers')
        _check_not_shared(model, out_module, f'{owner_path}.{out_name}'.lstrip('.'), where)
        check_output_call(owner, site, name, out_name, path, where, methods)
        output = out_name

    in_channels = spec.pop('in_channels', None)
    layers = children + ([(output, out_module)] if output is not None else [])
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
    experts = [nn.Sequential(OrderedDict(copy.deepcopy(layers))) for _ in range(num_experts)]
    noise = spec.pop('upcycle_noise_std', 0.0)
    try:
        moe = TowerMoE(experts, tower_name=name, tower_children=[n for n, _ in children],
                       output_name=output,
                       output_init_cfgs=_output_init_cfgs(owner, output) if output else (),
                       upcycle_noise_std=noise, in_channels=in_channels, **spec)
    except (TypeError, ValueError) as err:
        raise ValueError(f'{where} at {path!r}: {err}') from err
    setattr(owner, name, moe)
    if output is not None:
        setattr(owner, output, OutputInExperts(name))
        owner.register_load_state_dict_pre_hook(
            UpcycleOutputKeys(name, output))
    return moe
