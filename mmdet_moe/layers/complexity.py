"""Parameters a MoE model holds, and those one routing decision uses."""
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParameterCount:
    """``total``: every parameter; ``active``: those one gate row (an image, or an
    (image, FPN level) for a head shared over levels) runs through."""
    total: int
    active: int


def count_parameters(model: nn.Module) -> ParameterCount:
    """Total and active parameters of ``model``.

    A MoE module that routes each row to ``top_k`` of its N equally sized experts
    (:class:`~mmdet_moe.layers.MoE`, :class:`~mmdet_moe.layers.MoEConv2d`) uses k/N of
    its expert parameters per row (the fused MoEConv2d mixes k kernels into one);
    an equal-weight gate (k = N) and μMoE layers (soft routing over all experts)
    use all of theirs. Parameters shared by several modules count once.

    Example:
        >>> from mmdet_moe.layers import MoEConv2d
        >>> count_parameters(MoEConv2d(8, 8, 3, num_experts=4, top_k=2))
        ParameterCount(total=2408, active=1240)
    """
    total = sum(p.numel() for p in model.parameters())  # each shared one once
    inactive, counted = 0, set()
    for module in model.modules():
        experts = getattr(module, 'expert_parameters', None)
        if experts is None:
            continue
        own = [p for p in experts() if id(p) not in counted]
        counted.update(id(p) for p in own)
        inactive += sum(p.numel() for p in own) * (module.num_experts - module.top_k) \
            // module.num_experts
    return ParameterCount(total, total - inactive)
