"""RetinaNet head whose classification and/or regression towers are MoE layers."""
from typing import Iterable, List, Optional, Sequence, Tuple

import torch
from mmengine.model import bias_init_with_prob, normal_init
from torch import Tensor, nn

from mmdet.models.dense_heads import RetinaHead
from mmdet.registry import MODELS

from ...layers import MoEConv2d
from ...layers._checks import check_choice, check_num_experts
from ..moe_losses import LOSS_PREFIX, collect_moe_losses, merge_losses
from ..reference_sizes import level_reference_sizes
from ..tower_moe import TowerMoE, UpcycleDenseKeys
from .expert_tagging import moe_modules
from .scale_routing import check_routing_supervision, scale_routing_loss

BRANCHES = {'cls': ('cls',), 'reg': ('reg',), 'both': ('cls', 'reg'), 'shared': ('cls', 'reg')}


@MODELS.register_module()
class MoERetinaHead(RetinaHead):
    r"""RetinaHead with Mixture-of-Experts towers (Pavlitska et al.).

    Args:
        moe_branches: ``'cls'``, ``'reg'``, ``'both'`` (two MoEs with their own
            gates, "mixed") or ``'shared'`` (two MoEs, one gate routes both).
        expert_type: ``'subnet'``: an expert is a whole branch (stacked convs, plus
            the output conv if ``experts_include_output``); routing is per
            (image, FPN level) by one gate shared over all levels. ``'conv'``:
            the tower convs listed in ``moe_convs`` become :class:`MoEConv2d`
            experts (the paper's conv4 variant; fused, ≈ dense cost).
        num_experts, top_k: N experts, k per (image, level).
        gate_cfg: e.g. ``dict(type='TopKGate', noisy=True)`` or
            ``dict(type='RelativeImportanceGate', threshold=0.3)``.
        balance_cfg: soft constraints, e.g. ``dict(importance=0.5)``; their values
            appear in the loss dict as ``loss_moe_<name>``.
        moe_convs: tower indices made MoE for ``expert_type='conv'``.
        experts_include_output: subnet experts include the output conv.
        upcycle_noise_std: noise (× std of the dense weights) added to each expert
            when a dense checkpoint is loaded (upcycling).
        fresh_expert_init: how the experts start before any checkpoint loads:
            ``'mmdet'`` as the dense head (Normal, std 0.01, and the focal-loss prior
            on every expert's ``retina_cls``); ``'pytorch'``: PyTorch's default conv
            init and no prior, as the paper's fresh experts (its MoE heads build them
            after the model's own init). Upcycled experts copy the dense weights
            either way.
        impl: MoE implementation (``'auto'``, ``'dispatch'``, ``'dense'``, ...).
        capacity_factor: fixed rows per expert for ``impl='dispatch'`` in training
            (no host read; see :class:`~mmdet_moe.layers.MoE`).
        routing_supervision: with per-location gates (``gate_cfg=dict(gate_mode=
            'pixel')``), ``dict(weight=1.0, edges=None)`` adds ``loss_moe_scale_routing``:
            each positive anchor's location is taught to pick the expert of its
            ground-truth box's relative scale (see :mod:`.scale_routing`); a positive
            control for the within-level scale measure, not a way to train a detector.

    ``predict`` adds ``levels`` and ``expert_weights`` (num_dets, M, N) to each
    image's ``pred_instances`` (M = number of MoE modules in the head), as every
    dense head with MoE modules does (see :mod:`.expert_tagging`).
    """

    def __init__(self, *args, moe_branches: str = 'cls', expert_type: str = 'subnet',
                 num_experts: int = 4, top_k: int = 2, gate_cfg: Optional[dict] = None,
                 balance_cfg: Optional[dict] = None, moe_convs: Sequence[int] = (3,),
                 experts_include_output: bool = True, upcycle_noise_std: float = 0.0,
                 fresh_expert_init: str = 'mmdet', impl: str = 'auto',
                 capacity_factor: Optional[float] = None,
                 routing_supervision: Optional[dict] = None,
                 init_cfg=dict(type='Normal', layer='Conv2d', std=0.01),
                 **kwargs):
        check_choice('moe_branches', moe_branches, set(BRANCHES))
        check_choice('expert_type', expert_type, {'subnet', 'conv'})
        check_choice('fresh_expert_init', fresh_expert_init, {'mmdet', 'pytorch'})
        check_num_experts(num_experts, top_k)
        if moe_branches == 'shared' and expert_type != 'subnet':
            raise ValueError("moe_branches='shared' needs expert_type='subnet' (conv "
                             'experts of the two towers see different inputs)')
        self.moe_branches, self.expert_type = moe_branches, expert_type
        self.moe_kwargs = dict(num_experts=num_experts, top_k=top_k, gate_cfg=gate_cfg,
                               balance_cfg=balance_cfg, impl=impl,
                               capacity_factor=capacity_factor)
        self.moe_convs = tuple(moe_convs)
        self.experts_include_output = experts_include_output
        self.upcycle_noise_std = upcycle_noise_std
        self.fresh_expert_init = fresh_expert_init
        self.routing_supervision = check_routing_supervision(
            routing_supervision, num_experts, (gate_cfg or {}).get('gate_mode') == 'pixel')
        super().__init__(*args, init_cfg=init_cfg, **kwargs)
        self._scale_targets = None  # (positives, gt boxes) per level of the last targets
        if self.routing_supervision:
            for module in moe_modules(self):
                module.keep_gate_outputs = True

    def _init_layers(self) -> None:
        super()._init_layers()
        for branch in BRANCHES[self.moe_branches]:
            if self.expert_type == 'conv':
                self._make_conv_experts(branch)
            else:
                self._make_subnet_experts(branch)

    def _make_conv_experts(self, branch: str) -> None:
        convs = getattr(self, f'{branch}_convs')
        for index in self.moe_convs:
            if not 0 <= index < len(convs):
                raise ValueError(f'moe_convs index {index} is out of range for '
                                 f'{branch}_convs with {len(convs)} convs (stacked_convs)')
            convs[index].conv = MoEConv2d.like(
                convs[index].conv, upcycle_noise_std=self.upcycle_noise_std, **self.moe_kwargs)

    @staticmethod
    def _out_name(branch: str) -> str:
        return 'retina_cls' if branch == 'cls' else 'retina_reg'

    def _expert_children(self, branch: str) -> Tuple[str, Optional[str]]:
        return (f'{branch}_convs',
                self._out_name(branch) if self.experts_include_output else None)

    def _make_subnet_experts(self, branch: str) -> None:
        """``<branch>_moe``: a :class:`~mmdet_moe.models.TowerMoE` of the branch (its
        tower, and the output conv if ``experts_include_output``), with the dense names
        (experts ``cls_convs.<i>…``, ``retina_cls…``), upcycled by the head's
        :class:`~mmdet_moe.models.UpcycleDenseKeys`."""
        convs_name, out_name = self._expert_children(branch)
        kwargs = dict(self.moe_kwargs)
        if self.moe_branches == 'shared' and branch == 'reg':
            # one gate routes both branches; it is balanced once, through cls_moe
            kwargs.update(gate=self.cls_moe.gate, gate_cfg=None, balance_cfg=None)
        else:
            kwargs['in_channels'] = self.in_channels
        names = [convs_name] + ([out_name] if out_name else [])
        moe_name = f'{branch}_moe'
        setattr(self, moe_name, TowerMoE(
            [(name, name, getattr(self, name)) for name in names],
            kwargs.pop('num_experts'), tower_name=convs_name, output_name=out_name,
            upcycle_noise_std=self.upcycle_noise_std, **kwargs))
        for name in names:
            delattr(self, name)
        self.register_load_state_dict_pre_hook(UpcycleDenseKeys(moe_name))

    def init_weights(self) -> None:
        super().init_weights()
        # focal-loss prior on every classification output conv (dense or expert)
        bias_cls = bias_init_with_prob(0.01)
        for name, module in self.named_modules():
            if name.endswith('retina_cls'):
                normal_init(module, std=0.01, bias=bias_cls)
        if self.fresh_expert_init == 'pytorch':
            for module in self.modules():
                if isinstance(module, MoEConv2d):
                    module.reset_parameters()  # its experts, not its gate
                elif isinstance(module, TowerMoE):
                    for conv in module.experts.modules():
                        if isinstance(conv, nn.Conv2d):
                            conv.reset_parameters()

    def _branch_forward(self, branch: str, x: Sequence[Tensor], routing=None):
        """Per-level outputs of one branch: (MoE) tower, then the output conv."""
        out_conv = getattr(self, self._out_name(branch), None)
        moe = getattr(self, f'{branch}_moe', None)
        if moe is not None:
            feats = moe(list(x), gate_output=routing)
        else:
            feats = []
            for level in x:
                for conv in getattr(self, f'{branch}_convs'):
                    level = conv(level)
                feats.append(level)
        return feats if out_conv is None else [out_conv(f) for f in feats]

    def forward(self, x: Iterable[Tensor]) -> Tuple[list, list]:
        """x: L maps (B, C, H_l, W_l), any iterable → (cls_scores, bbox_preds), L maps
        each. The gates route per (image, level)."""
        x = list(x)  # read once: a generator is consumed by the first pass
        routing = None
        if self.moe_branches == 'shared' and self.expert_type == 'subnet':
            routing = self.cls_moe.route(x)
        return self._branch_forward('cls', x, routing), self._branch_forward('reg', x, routing)

    def forward_single(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """One level (B, C, H, W) → (cls_score, bbox_pred), as ``RetinaHead``; the
        gates route each image on this level alone."""
        cls_scores, bbox_preds = self([x])
        return cls_scores[0], bbox_preds[0]

    def get_targets(self, anchor_list, *args, **kwargs) -> tuple:
        """``AnchorHead.get_targets``; with ``routing_supervision`` it also keeps, per
        level, the positive anchors and the box each is assigned (decoded from the
        regression targets), for :meth:`loss_by_feat`."""
        targets = super().get_targets(anchor_list, *args, **kwargs)
        if self.routing_supervision:
            labels, bbox_targets = targets[0], targets[2]
            levels = [torch.stack(per_image) for per_image in zip(*anchor_list)]
            boxes = [t if self.reg_decoded_bbox else
                     self.bbox_coder.decode(a.reshape(-1, 4), t.reshape(-1, t.shape[-1]))
                     .reshape(*t.shape[:2], 4)
                     for a, t in zip(levels, bbox_targets)]
            self._scale_targets = ([(lab >= 0) & (lab < self.num_classes) for lab in labels],
                                   boxes)
        return targets

    def _scale_routing_loss(self, cls_scores: List[Tensor]) -> Tensor:
        positives, boxes = self._scale_targets
        self._scale_targets = None
        shapes = [(s.shape[0], *s.shape[-2:]) for s in cls_scores]
        references = level_reference_sizes(self)
        losses = [scale_routing_loss(m.gate_outputs().logits, shapes, positives, boxes,
                                     references, self.routing_supervision['edges'])
                  for m in moe_modules(self) if m.gate_outputs() is not None]
        return self.routing_supervision['weight'] * sum(losses)

    def loss_by_feat(self, cls_scores: List[Tensor], *args, **kwargs) -> dict:
        losses = super().loss_by_feat(cls_scores, *args, **kwargs)
        if self.routing_supervision:
            losses[LOSS_PREFIX + 'scale_routing'] = self._scale_routing_loss(cls_scores)
        return merge_losses(losses, collect_moe_losses(self))
