"""A detector's tensor forward as a flat tuple of named tensors, for graph export.

- single-stage detectors (RetinaNet, FCOS, ATSS, GFL, ...): input ``images``
  (B, 3, H, W), preprocessed as the data preprocessor hands them to the model
  (normalised, padded); outputs the head's per-level maps, ``cls_score_<l>``,
  ``bbox_pred_<l>`` and, where the head has a third output (FCOS's and ATSS's
  centerness), ``score_factor_<l>`` as mmdet's ``predict_by_feat`` calls it.
- two-stage detectors (Faster R-CNN: ``StandardRoIHead`` with a single-level RoI
  extractor, no mask or shared head): inputs ``images`` and ``rois`` (R, 5)
  ``[image index, x1, y1, x2, y2]`` in input pixels; outputs ``rpn_cls_score_<l>``,
  ``rpn_bbox_pred_<l>`` (the RPN head's maps) and ``roi_cls_score`` (R, C+1),
  ``roi_bbox_pred`` (R, 4·C) of the RoI head on the given RoIs. Proposal selection
  (decoding, NMS, top-k per image) stays outside the graph: mmdet runs it as Python
  on data-dependent shapes (mmdeploy rewrites those functions to export them).

Box decoding and NMS of the detections are left to the caller in both cases.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config
from torch import Tensor

from mmdet.models.detectors import SingleStageDetector, TwoStageDetector
from mmdet.models.roi_heads import StandardRoIHead
from mmdet.models.roi_heads.roi_extractors import SingleRoIExtractor

HEAD_OUTPUTS = ('cls_score', 'bbox_pred', 'score_factor')


class TensorForward(nn.Module):
    """``detector``'s backbone, neck and head forward returning a flat tuple of tensors
    (names in :attr:`output_names`, inputs in :attr:`input_names`; see the module
    docstring). Shares the detector's modules.

    Raises:
        ValueError: for a detector whose tensor forward cannot be exported, saying why.
    """

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector
        if isinstance(detector, SingleStageDetector):
            self.two_stage = False
        elif isinstance(detector, TwoStageDetector):
            self.two_stage = True
            _check_roi_head(detector)
        else:
            raise ValueError(f'{type(detector).__name__} is neither a single-stage nor a '
                             'two-stage mmdet detector; export supports those')
        self.input_names = ['images', 'rois'] if self.two_stage else ['images']
        self.output_names: List[str] = []
        # the RoI head's MoE layers gate RoIs, a number the graph leaves open
        self.dynamic_rows = [detector.roi_head] if self.two_stage else []

    def name_outputs(self, *example: Tensor) -> List[str]:
        """Run the eager forward on ``example`` once and name its outputs."""
        with torch.no_grad():
            groups = self._groups(*example)
        prefix = 'rpn_' if self.two_stage else ''
        self.output_names = [
            f'{prefix}{HEAD_OUTPUTS[i] if i < len(HEAD_OUTPUTS) else f"output{i}"}_{level}'
            for i, group in enumerate(groups[:len(groups) - 2 * self.two_stage])
            for level in range(len(group))]
        if self.two_stage:
            self.output_names += ['roi_cls_score', 'roi_bbox_pred']
        return self.output_names

    def _groups(self, images: Tensor, rois: Tensor = None) -> List[Sequence[Tensor]]:
        if not self.two_stage:
            return list(self.detector._forward(images))
        feats = self.detector.extract_feat(images)
        roi_head = self.detector.roi_head
        cls_score, bbox_pred = roi_head.bbox_head(roi_features(
            roi_head.bbox_roi_extractor, feats, rois))
        return list(self.detector.rpn_head(feats)) + [[cls_score], [bbox_pred]]

    def forward(self, images: Tensor, rois: Tensor = None) -> Tuple[Tensor, ...]:
        """images (B, 3, H, W), rois (R, 5) for two-stage detectors → the outputs."""
        return tuple(t for group in self._groups(images, rois) for t in group)


def _check_roi_head(detector: nn.Module) -> None:
    roi_head = detector.roi_head
    if not detector.with_rpn:
        raise ValueError(f'{type(detector).__name__} has no RPN; export supports '
                         'two-stage detectors with an RPN head')
    if type(roi_head) is not StandardRoIHead or roi_head.with_mask or \
            roi_head.with_shared_head or \
            type(roi_head.bbox_roi_extractor) is not SingleRoIExtractor:
        raise ValueError(f'the RoI head {type(roi_head).__name__} (mask head: '
                         f'{roi_head.with_mask}, shared head: {roi_head.with_shared_head}, '
                         f'extractor: {type(roi_head.bbox_roi_extractor).__name__}) has no '
                         'export path; export supports StandardRoIHead with a '
                         'SingleRoIExtractor and a bbox head only (Faster R-CNN)')


def roi_features(extractor: SingleRoIExtractor, feats: Sequence[Tensor],
                 rois: Tensor) -> Tensor:
    """``extractor(feats, rois)`` without data-dependent Python: every RoI is pooled from
    every level and keeps its own level's features (L× the RoIAlign, which is cheap
    next to the bbox head; mmdet's loop indexes the RoIs of each level, a shape the
    graph cannot know).

    Args:
        feats: L maps (B, C, H_l, W_l), the extractor's inputs first.
        rois: (R, 5) ``[image index, x1, y1, x2, y2]``.

    Returns:
        (R, C, h, w) pooled features.
    """
    feats = feats[:extractor.num_inputs]
    rois = rois.type_as(feats[0])
    levels = extractor.map_roi_levels(rois, len(feats))[:, None, None, None]
    pooled = [layer(level_feats, rois)
              for layer, level_feats in zip(extractor.roi_layers, feats, strict=True)]
    out = pooled[0]
    for i, level_pooled in enumerate(pooled[1:], 1):
        out = torch.where(levels == i, level_pooled, out)
    return out


def example_inputs(forward: TensorForward, batch: int, height: int, width: int,
                   num_rois: int, seed: int) -> Tuple[torch.Tensor, ...]:
    """Random images (B, 3, H, W) and, for two-stage detectors, random RoIs (R, 5)
    of 1/16 to 1/2 the image size, spread over the images."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, height, width, generator=gen)
    if not forward.two_stage:
        return (images,)
    size = torch.tensor([width, height], dtype=torch.float)
    wh = size * (1 / 16 + torch.rand(num_rois, 2, generator=gen) * 7 / 16)
    xy = (size - wh) * torch.rand(num_rois, 2, generator=gen)
    index = torch.arange(num_rois, dtype=torch.float)[:, None] % batch
    return images, torch.cat([index, xy, xy + wh], dim=1)


def input_shape(cfg: Config, shape: Optional[List[int]]) -> Tuple[int, int]:
    """(H, W): ``shape``, else the test pipeline's Resize scale (w, h), each checked
    against or padded to the data preprocessor's ``pad_size_divisor``."""
    divisor = cfg.model.get('data_preprocessor', {}).get('pad_size_divisor', 1)
    if shape is not None:
        bad = [s for s in shape if s % divisor]
        if bad:
            raise ValueError(f'--shape {shape[0]} {shape[1]}: the data preprocessor pads '
                             f'images to multiples of {divisor}; {bad} is not one')
        return shape[0], shape[1]
    pipeline = cfg.get('test_dataloader', {}).get('dataset', {}).get('pipeline', [])
    scales = [step['scale'] for step in pipeline
              if step.get('type') == 'Resize' and 'scale' in step]
    if not scales:
        raise ValueError('the config has no test pipeline Resize with a scale: give '
                         '--shape H W')
    width, height = scales[0]
    return tuple(-(-s // divisor) * divisor for s in (height, width))
