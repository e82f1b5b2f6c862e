"""Test-time augmentation that keeps each detection's expert tags through the merge."""
from typing import List

import torch
from mmcv.ops import batched_nms
from mmengine.structures import InstanceData

from mmdet.models.test_time_augs import DetTTAModel
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample

# what DetTTAModel merges itself; every other per-detection field is carried along
MERGED_FIELDS = ('bboxes', 'scores', 'labels')


@MODELS.register_module()
class MoEDetTTAModel(DetTTAModel):
    """:class:`mmdet.models.DetTTAModel` whose merged detections keep their other
    per-detection fields (``levels``, ``expert_weights`` of an expert-tagging head)
    and gain ``views`` (num_dets,): the index of the augmented view each kept
    detection came from, so that its gate weights are those of that view.

    The boxes, scores and labels are DetTTAModel's: the views' boxes mapped back to
    the original image, one NMS over all of them, ``max_per_img`` kept.

    Example::

        tta_model = dict(type='MoEDetTTAModel',
                         tta_cfg=dict(nms=dict(type='nms', iou_threshold=0.5),
                                      max_per_img=100))
    """

    def _merge_single_sample(self, data_samples: List[DetDataSample]) -> DetDataSample:
        preds = [sample.pred_instances for sample in data_samples]
        if 'masks' in preds[0]:
            raise NotImplementedError('MoEDetTTAModel, as DetTTAModel, merges boxes only; '
                                      'instance masks are not supported')
        for view, pred in enumerate(preds):
            pred.views = pred.labels.new_full((len(pred),), view)
        bboxes, scores = self.merge_aug_bboxes([p.bboxes for p in preds],
                                               [p.scores for p in preds],
                                               [sample.metainfo for sample in data_samples])
        labels = torch.cat([p.labels for p in preds])
        if bboxes.numel() == 0:
            return data_samples[0]
        dets, keep = batched_nms(bboxes, scores, labels, self.tta_cfg.nms)
        max_per_img = self.tta_cfg.max_per_img
        dets, keep = dets[:max_per_img], keep[:max_per_img]
        merged = InstanceData(metainfo=preds[0].metainfo, bboxes=dets[:, :-1],
                              scores=dets[:, -1], labels=labels[keep])
        for key in preds[0].keys():
            if key not in MERGED_FIELDS:
                merged[key] = torch.cat([p[key] for p in preds])[keep]
        result = data_samples[0]
        result.pred_instances = merged
        return result
