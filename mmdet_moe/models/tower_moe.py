"""Whole-subnet experts: a MoE whose experts are copies of a dense model's modules.

A *tower* (the stacked convs of a dense head, ``cls_convs``), optionally followed by
its output conv (``retina_cls``), becomes N routed copies of itself: a
:class:`TowerMoE`. Its experts are ``nn.Sequential`` s of the copies under names of
their own (a copied ``nn.ModuleList`` becomes an ``nn.Sequential`` of the same
children, so that it runs in order), and :attr:`TowerMoE.dense_to_expert` says where
each copied module sat in the dense owner: a load-state-dict pre-hook on the owner
(:class:`UpcycleDenseKeys`) moves a dense checkpoint's keys into every expert
(upcycling), so a stock checkpoint loads with only the gate keys missing, and with
identical experts and no gate noise the MoE computes what the dense modules do.

Two layouts use it: :class:`~mmdet_moe.models.MoERetinaHead`'s ``cls_moe`` (experts
``cls_convs.<i>…``, ``retina_cls…``) and a tower replaced in place by
:func:`~mmdet_moe.models.subnet_insertion.insert_subnet_moe` (the MoE at the tower's
path, experts ``<i>…`` and the output conv's name).
"""
import copy
from collections import OrderedDict
from typing import Dict, Optional, Sequence, Tuple

import torch.nn as nn
from mmengine.registry import WEIGHT_INITIALIZERS, build_from_cfg
from torch import Tensor

from ..layers import MoE
from .upcycling import expand_dense_keys


def _runnable_copy(module: nn.Module) -> nn.Module:
    """A deep copy that runs as a layer: a ModuleList becomes a Sequential of the same
    children (same state-dict keys)."""
    module = copy.deepcopy(module)
    if type(module) is nn.ModuleList:
        return nn.Sequential(OrderedDict(module._modules))
    return module


class TowerMoE(MoE):
    """A :class:`~mmdet_moe.layers.MoE` of copies of dense modules (see the module
    docstring); iterating over it yields itself once, so an owner's
    ``for layer in self.<tower>: x = layer(x)`` calls it once.

    Args:
        layers: ``(dense path, expert name, module)`` of each copied module, in the
            order the expert runs them; ``dense path`` is relative to the owner (whose
            load pre-hook :class:`UpcycleDenseKeys` upcycles its keys), ``module`` is
            deep-copied into every expert.
        num_experts: N.
        tower_name: the dense tower's name in the owner (e.g. ``cls_convs``).
        output_name: the expert name of the output conv, or None.
        output_init_cfgs: ``init_cfg`` overrides of the output conv, applied to every
            expert's copy by :meth:`init_weights` (e.g. the focal-loss bias prior of
            ``retina_cls``; the owner's own override finds no conv in its place).
        upcycle_noise_std: noise (× std of each dense tensor) added to each expert's
            copy when a dense checkpoint is loaded.
        **kwargs: for :class:`~mmdet_moe.layers.MoE` (in_channels, top_k, gate,
            gate_cfg, balance_cfg, impl, capacity_factor).

    Shapes: as the dense modules run in order, (B, C, H, W) → (B, C', H', W'); a
    list of L level maps → L maps, routed per (image, level) by one gate.
    """

    def __init__(self, layers: Sequence[Tuple[str, str, nn.Module]], num_experts: int, *,
                 tower_name: str, output_name: Optional[str] = None,
                 output_init_cfgs: Sequence[dict] = (), upcycle_noise_std: float = 0.0,
                 **kwargs):
        if upcycle_noise_std < 0:
            raise ValueError(f'upcycle_noise_std must be >= 0, got {upcycle_noise_std!r}')
        experts = [nn.Sequential(OrderedDict((name, _runnable_copy(module))
                                             for _, name, module in layers))
                   for _ in range(num_experts)]
        super().__init__(experts, **kwargs)
        self.dense_to_expert: Dict[str, str] = {dense: name for dense, name, _ in layers}
        self.tower_name, self.output_name = tower_name, output_name
        self.output_init_cfgs = list(output_init_cfgs)
        self.upcycle_noise_std = upcycle_noise_std
        # how the owner runs it, set by insert_subnet_moe (see .tower_call_check)
        self.call_check = None

    def __iter__(self):
        return iter((self,))

    def __getitem__(self, index):
        raise self._misuse(f'indexes it ([{index!r}]: runs single layers)')

    def __len__(self) -> int:
        raise self._misuse('measures it (len())')

    def __bool__(self) -> bool:  # ``if tower:`` must not reach __len__
        return True

    def _misuse(self, what: str) -> Exception:
        if self.call_check is not None:
            return self.call_check.refusal(what)
        return TypeError(f'{self.tower_name!r} is a TowerMoE, one layer: its owner '
                         f'{what}')

    def init_weights(self) -> None:
        """Apply the output conv's ``init_cfg`` overrides to every expert's copy. The
        other layers get the owner's ``init_cfg`` as the dense ones do."""
        for expert in self.experts if self.output_name else ():
            for cfg in self.output_init_cfgs:
                initializer = build_from_cfg(copy.deepcopy(cfg), WEIGHT_INITIALIZERS)
                initializer.wholemodule = True
                initializer(getattr(expert, self.output_name))

    def extra_repr(self):
        output = f', output={self.output_name!r}' if self.output_name else ''
        return f'{super().extra_repr()}, tower={self.tower_name!r}{output}'


class OutputInExperts(nn.Identity):
    """Stands where an output conv was that now ends every expert of the tower MoE
    ``tower_name``: the owner calls it on the MoE's output, which already went through
    the experts' copies. It returns a view, a new tensor object, so that the call check
    can tell the conv's output from the tower's."""

    def __init__(self, tower_name: str):
        super().__init__()
        self.tower_name = tower_name

    def forward(self, x: Tensor) -> Tensor:
        return x.view_as(x)

    def extra_repr(self):
        return f'in the experts of {self.tower_name!r}'


class UpcycleDenseKeys:
    """Load-state-dict pre-hook of the owner of the :class:`TowerMoE` ``moe_name``: a
    dense checkpoint's keys of the copied modules go to every expert (see
    :func:`~mmdet_moe.models.upcycling.expand_dense_keys`). It runs at the owner, as
    torch hands each module only the keys under its own prefix; the experts and the
    noise are the MoE's when the keys load (a pruned MoE has fewer experts)."""

    def __init__(self, moe_name: str):
        self.moe_name = moe_name

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *args) -> None:
        moe = getattr(module, self.moe_name)
        expand_dense_keys(state_dict, prefix, self.moe_name, moe.dense_to_expert,
                          moe.num_experts, moe.upcycle_noise_std)
