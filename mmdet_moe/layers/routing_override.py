"""Force the routing of every MoE gate in a model (for analysis, e.g. "each expert alone")."""
from contextlib import contextmanager
from typing import Iterator, Optional

import torch.nn as nn

from .recording import assign_moe_names, is_moe_module


@contextmanager
def override_routing(model: nn.Module, expert: Optional[int] = None,
                     top_k: Optional[int] = None) -> Iterator[None]:
    """Within the block, every gate routes all rows to ``expert`` alone (weight 1),
    or keeps its ``top_k`` largest logits instead of its own k.

    Raises:
        ValueError: naming the layer when ``expert`` or ``top_k`` is out of its range,
            or ``top_k`` is asked of a soft (μMoE) layer, or the model has no MoE.
    """
    if (expert is None) == (top_k is None):
        raise ValueError('override_routing needs exactly one of expert= or top_k=')
    assign_moe_names(model)
    gates = {id(m.gate): m for m in model.modules() if is_moe_module(m) and hasattr(m, 'gate')}
    soft = [m for m in model.modules() if is_moe_module(m) and not hasattr(m, 'gate')]
    if not gates and not soft:
        raise ValueError(f'{type(model).__name__} has no MoE layer to override')
    targets = [m.gate for m in gates.values()] + soft
    for target in targets:
        name = target.moe_name or type(target).__name__
        if expert is not None and not 0 <= expert < target.num_experts:
            raise ValueError(f'{name}: expert {expert} is out of range [0, {target.num_experts})')
        if top_k is not None:
            if target in soft:
                raise ValueError(f'{name} routes softly (μMoE); top_k cannot be overridden')
            if not 1 <= top_k <= target.num_experts:
                raise ValueError(f'{name}: top_k={top_k} is out of range '
                                 f'[1, {target.num_experts}]')
    saved = [(t, t.forced_expert, getattr(t, 'top_k', None)) for t in targets]
    try:
        for target in targets:
            if expert is not None:
                target.forced_expert = expert
            else:
                target.top_k = top_k
        yield
    finally:
        for target, forced, k in saved:
            target.forced_expert = forced
            if k is not None:
                target.top_k = k
