"""FPN whose lateral, output and/or extra convs are MoE layers."""
from typing import Optional, Sequence, Union

from mmdet.models.necks import FPN
from mmdet.registry import MODELS

from ...layers._checks import check_choice
from ..insertion import insert_moe_layers

PARTS = {'lateral', 'output', 'extra'}


@MODELS.register_module()
class MoEFPN(FPN):
    """FPN with :class:`~mmdet_moe.layers.MoEConv2d` convs (per-image top-k gates).

    Args:
        moe_parts: which convs become MoE: ``'lateral'`` (1×1), ``'output'`` (3×3 on
            each pyramid level), ``'extra'`` (the stride-2 extra levels).
        shared_gate: one gate for all convs of a part (each level still routed on its
            own input); needs equal input channels. Else one gate per level.
        num_experts, top_k, gate_cfg, balance_cfg, impl, upcycle_noise_std: passed
            to each :class:`MoEConv2d`.
        Other arguments: as :class:`mmdet.models.necks.FPN`.
    """

    def __init__(self, *args, moe_parts: Union[str, Sequence[str]] = ('output',),
                 shared_gate: bool = False, num_experts: int = 4, top_k: int = 2,
                 gate_cfg: Optional[dict] = None, balance_cfg: Optional[dict] = None,
                 impl: str = 'auto', upcycle_noise_std: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        moe_parts = [moe_parts] if isinstance(moe_parts, str) else list(moe_parts)
        if not moe_parts:
            raise ValueError(f'moe_parts must name at least one of {sorted(PARTS)}')
        num_outputs = self.backbone_end_level - self.start_level
        indices = dict(lateral=range(len(self.lateral_convs)), output=range(num_outputs),
                       extra=range(num_outputs, len(self.fpn_convs)))
        container = dict(lateral='lateral_convs', output='fpn_convs', extra='fpn_convs')
        specs = []
        for part in moe_parts:
            check_choice('moe_parts', part, PARTS)
            if not indices[part]:
                raise ValueError(f"moe_parts has '{part}' but this FPN has no such convs "
                                 f'(add_extra_convs={self.add_extra_convs!r})')
            specs.append(dict(
                paths=[f'{container[part]}.{i}.conv' for i in indices[part]],
                shared_gate=shared_gate, num_experts=num_experts, top_k=top_k,
                gate_cfg=gate_cfg, balance_cfg=balance_cfg, impl=impl,
                upcycle_noise_std=upcycle_noise_std))
        insert_moe_layers(self, specs, key='MoEFPN.moe_parts')
