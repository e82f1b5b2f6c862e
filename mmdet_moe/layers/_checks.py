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
