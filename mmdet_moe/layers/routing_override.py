"""Force the routing of every MoE gate in a model (for analysis: "each expert alone",
"all experts with equal weights", another k)."""
from contextlib import contextmanager
from typing import Iterator, Optional

import torch.nn as nn

from .recording import assign_moe_names, is_moe_module

# The value of a gate's (or μMoE layer's) ``forced_expert`` under
# ``override_routing(equal_weights=True)``: every row goes to all N experts, weight 1/N.
EQUAL_WEIGHTS = 'equal_weights'


@contextmanager
def override_routing(model: nn.Module, expert: Optional[int] = None,
                     top_k: Optional[int] = None, equal_weights: bool = False
                     ) -> Iterator[None]:
    """Within the block, every gate of ``model`` routes as told, exactly one of:

    - ``expert=i``: every row to expert ``i`` alone (weight 1);
    - ``top_k=k``: each gate keeps its ``k`` largest logits instead of its own k;
    - ``equal_weights=True``: every row to all N experts with weight 1/N, no gate
      (the paper's "all experts averaged" baseline); soft (μMoE) layers mix their
      experts with uniform weights 1/N as well.

    Forced routings return the clean logits only (no noise, no hard-constraint mask)
    and leave hard-constraint statistics untouched. Everything is restored on exit,
    also when the block raises.

    Raises:
        ValueError: naming the wrong value when not exactly one mode is given or a
            value has the wrong type; naming the layer when ``expert`` or ``top_k`` is
            out of its range or ``top_k`` is asked of a soft (μMoE) layer; when the
            model has no MoE.
    """
    if not isinstance(equal_weights, bool):
        raise ValueError(f'override_routing: equal_weights must be True or False, got '
                         f'{equal_weights!r}')
    for arg, value in (('expert', expert), ('top_k', top_k)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f'override_routing: {arg} must be an int, got {value!r}')
    modes = [f'{n}={v!r}' for n, v in (('expert', expert), ('top_k', top_k),
                                       ('equal_weights', equal_weights or None))
             if v is not None]
    if len(modes) != 1:
        raise ValueError('override_routing needs exactly one of expert=, top_k= or '
                         f'equal_weights=True; got {", ".join(modes) or "none"}')
    assign_moe_names(model)
    gates = {id(m.gate): m for m in model.modules() if is_moe_module(m) and hasattr(m, 'gate')}
    soft = [m for m in model.modules() if is_moe_module(m) and not hasattr(m, 'gate')]
    if not gates and not soft:
        raise ValueError(f'{type(model).__name__} has no MoE layer to override')
    targets = [m.gate for m in gates.values()] + soft
    for target in targets:
        name = getattr(target, 'moe_name', None) or type(target).__name__
        if expert is not None and not 0 <= expert < target.num_experts:
            raise ValueError(f'{name}: expert {expert} is out of range [0, {target.num_experts})')
        if top_k is not None:
            if target in soft or getattr(target, 'fixed_top_k', False):
                raise ValueError(f'{name} ({type(target).__name__}) does not choose its '
                                 'experts (a soft μMoE layer or equal weights); top_k '
                                 'cannot be overridden')
            if not 1 <= top_k <= target.num_experts:
                raise ValueError(f'{name}: top_k={top_k} is out of range '
                                 f'[1, {target.num_experts}]')
    saved = [(t, t.forced_expert, getattr(t, 'top_k', None)) for t in targets]
    try:
        for target in targets:
            if expert is not None:
                target.forced_expert = expert
            elif top_k is not None:
                target.top_k = top_k
            else:
                target.forced_expert = EQUAL_WEIGHTS
        yield
    finally:
        for target, forced, k in saved:
            target.forced_expert = forced
            if k is not None:
                target.top_k = k
