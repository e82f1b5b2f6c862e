"""Argument validation shared by the MoE layers (clear errors naming the value)."""


def check_num_experts(num_experts, top_k=None):
    """Validate ``num_experts >= 2`` and ``1 <= top_k <= num_experts``."""
    if not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(f'num_experts must be an int >= 2, got {num_experts!r}')
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= num_experts):
        raise ValueError(f'top_k must be an int in [1, num_experts={num_experts}], '
                         f'got {top_k!r}')


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f'{name} must be one of {sorted(choices)}, got {value!r}')


def has_zero_padding(conv) -> bool:
    """A conv with numeric zero padding (what MoE convs and kernel mixing support)."""
    return conv.padding_mode == 'zeros' and not isinstance(conv.padding, str)


def check_capacity_factor(capacity_factor) -> None:
    """None (every routed row runs) or a number > 0 (rows per expert, see ``_dispatch``)."""
    if capacity_factor is None:
        return
    if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) \
            or not 0 < capacity_factor < float('inf'):
        raise ValueError(f'capacity_factor must be a finite number > 0 (each expert takes '
                         f'ceil(capacity_factor · B · top_k / num_experts) rows per call) or '
                         f'None (every routed row runs), got {capacity_factor!r}')


def check_capacity_impl(capacity_factor, impl: str) -> None:
    """A capacity fixes the rows per expert of ``impl='dispatch'``; other impls run none."""
    if capacity_factor is not None and impl != 'dispatch':
        raise ValueError(f"capacity_factor={capacity_factor!r} applies to impl='dispatch' "
                         f'(experts run on their routed rows); this layer runs '
                         f'impl={impl!r}, whose cost does not depend on the routing: set '
                         "impl='dispatch' or capacity_factor=None")
