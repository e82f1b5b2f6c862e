"""Tag each detection of a dense head with its FPN level and its experts' gate weights."""
import copy
from typing import List, Optional

import torch
from mmengine.structures import InstanceData
from torch import Tensor

from ...layers import GateRecorder, is_moe_module, record_gates


class ExpertTaggingMixin:
    """For dense heads (RetinaHead-like, ``forward`` per FPN level): ``predict`` adds

    - ``pred_instances.levels`` (num_dets,): the FPN level of each detection;
    - ``pred_instances.expert_weights`` (num_dets, M, N): for each of the head's M
      MoE modules that route (a module reusing another's gate decision adds
      nothing), the gate weights of the (image, level) the detection came from.

    Detections are decoded level by level (same ``nms_pre`` per level as mmdet) and
    then share one ``_bbox_post_process`` (rescale, score factors, ``min_bbox_size``,
    NMS), so the boxes are those of the stock ``predict_by_feat``.
    """

    def moe_modules(self) -> list:
        return [m for m in self.modules() if is_moe_module(m)]

    def predict(self, x, batch_data_samples, rescale: bool = False):
        batch_img_metas = [s.metainfo for s in batch_data_samples]
        with record_gates() as recorder:
            outs = self(x)
        routing = self.routing_per_level(recorder, len(x), len(batch_img_metas))
        return self.predict_by_feat(*outs, batch_img_metas=batch_img_metas,
                                    rescale=rescale, routing=routing)

    def routing_per_level(self, recorder: GateRecorder, num_levels: int,
                          batch_size: int) -> Optional[Tensor]:
        """(L, B, M, N) gate weights of this head's MoE modules, or None without MoE."""
        per_module = []
        for module in self.moe_modules():
            records = [r for r in recorder.records if r.module is module]
            if not records:  # reuses another module's routing
                continue
            if len(records) != num_levels:
                raise RuntimeError(f'{type(self).__name__}: MoE module '
                                   f'{module.moe_name or type(module).__name__} was '
                                   f'called {len(records)} times for {num_levels} levels')
            ordered = sorted(records, key=lambda r: r.call if r.level is None else r.level)
            per_module.append(torch.stack([r.weights for r in ordered]))  # (L, B, N)
        if not per_module:
            return None
        sizes = {w.shape[-1] for w in per_module}
        if len(sizes) != 1:
            raise ValueError(f'{type(self).__name__}: MoE modules with different numbers '
                             f'of experts {sorted(sizes)} cannot share expert_weights')
        return torch.stack(per_module, dim=2)

    def predict_by_feat(self, cls_scores: List[Tensor], bbox_preds: List[Tensor],
                        score_factors: Optional[List[Tensor]] = None,
                        batch_img_metas: Optional[List[dict]] = None, cfg=None,
                        rescale: bool = False, with_nms: bool = True,
                        routing: Optional[Tensor] = None) -> List[InstanceData]:
        if routing is None:
            return super().predict_by_feat(cls_scores, bbox_preds, score_factors,
                                           batch_img_metas, cfg, rescale, with_nms)
        cfg = self.test_cfg if cfg is None else cfg
        # per level: decode only; min_bbox_size (like rescale and NMS) is applied once,
        # by the final _bbox_post_process, to the rescaled boxes as in mmdet
        level_cfg = copy.deepcopy(cfg)
        level_cfg['min_bbox_size'] = -1
        num_levels = len(cls_scores)
        priors = self.prior_generator.grid_priors(
            [s.shape[-2:] for s in cls_scores], dtype=cls_scores[0].dtype,
            device=cls_scores[0].device)
        results_list = []
        for b, img_meta in enumerate(batch_img_metas):
            per_level = []
            for level in range(num_levels):
                factor = None if score_factors is None else score_factors[level][b].detach()
                result = self._predict_by_feat_single(
                    [cls_scores[level][b].detach()], [bbox_preds[level][b].detach()],
                    [factor], [priors[level]], img_meta, level_cfg, rescale=False,
                    with_nms=False)
                result.levels = result.scores.new_full((len(result),), level,
                                                       dtype=torch.long)
                result.expert_weights = routing[level, b].expand(len(result), -1, -1).clone()
                per_level.append(result)
            results_list.append(self._bbox_post_process(
                InstanceData.cat(per_level), cfg, rescale=rescale, with_nms=with_nms,
                img_meta=img_meta))
        return results_list
