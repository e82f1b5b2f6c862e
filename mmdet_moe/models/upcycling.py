"""Start MoE layers from a trained dense model, and train only the MoE parts."""
from typing import Iterable, Mapping, Sequence

import torch.nn as nn

from ..layers import is_moe_module
from ..layers.moe_conv import noisy_copy


def expand_dense_keys(state_dict: dict, prefix: str, moe_name: str,
                      dense_to_expert: Mapping[str, str], num_experts: int,
                      noise_std: float) -> None:
    """Upcycle dense keys into expert keys, in place: the one key mover of every
    whole-subnet MoE (:class:`~mmdet_moe.models.TowerMoE`).

    ``prefix + dense + '.' + rest`` (the keys of a dense module at the owner-relative
    path ``dense``) becomes ``prefix + moe_name + '.experts.<n>.' + expert + '.' + rest``
    for every ``dense → expert`` of ``dense_to_expert`` and every expert n, plus
    Gaussian noise of ``noise_std × std(parameter)`` on float parameters (see
    :func:`~mmdet_moe.layers.moe_conv.noisy_copy`). Expert keys already in the state
    dict are kept (a MoE checkpoint loads as saved); the dense keys are removed.
    """
    for dense, expert in dense_to_expert.items():
        old = f'{prefix}{dense}.'
        for key in [k for k in state_dict if k.startswith(old)]:
            rest = key[len(old):]
            value = state_dict.pop(key)
            for n in range(num_experts):
                state_dict.setdefault(f'{prefix}{moe_name}.experts.{n}.{expert}.{rest}',
                                      noisy_copy(value, noise_std))


def moe_parameters(model: nn.Module):
    """Parameters of all MoE modules (experts and gates) in ``model``."""
    seen = set()
    for module in model.modules():
        if is_moe_module(module):
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p


def _train_only(model: nn.Module, trainable: Iterable[nn.Parameter]) -> int:
    """``requires_grad`` on the ``trainable`` parameters only; their number of tensors."""
    ids = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    return len(ids)


def freeze_all_but_moe(model: nn.Module) -> int:
    """``requires_grad=False`` on every non-MoE parameter (the paper fine-tunes only
    the MoE parts of a trained detector). Returns the number of trainable tensors."""
    trainable = list(moe_parameters(model))
    if not trainable:
        raise ValueError('freeze_all_but_moe: the model has no MoE layer to train')
    return _train_only(model, trainable)


def freeze_all_but(model: nn.Module, paths: Sequence[str]) -> int:
    """``requires_grad=False`` on every parameter outside the submodules at ``paths``
    (e.g. ``'bbox_head.cls_convs'``): a dense model frozen as :func:`freeze_all_but_moe`
    freezes its MoE counterpart, the control of the paper's fine-tuning. Returns the
    number of trainable tensors. Only ``requires_grad`` changes, as there: norm-layer
    statistics are the config's to fix (e.g. the backbone's ``norm_eval``)."""
    if isinstance(paths, str) or not paths:
        raise ValueError(f'freeze_all_but: paths must be a non-empty list of module '
                         f"paths such as ['bbox_head.cls_convs'], got {paths!r}")
    trainable = []
    for path in paths:
        try:
            module = model.get_submodule(path)
        except AttributeError as err:
            raise ValueError(f'freeze_all_but: the model has no module {path!r} ({err})') \
                from err
        params = list(module.parameters())
        if not params:
            raise ValueError(f'freeze_all_but: the module {path!r} has no parameter to '
                             'train')
        trainable += params
    return _train_only(model, trainable)
