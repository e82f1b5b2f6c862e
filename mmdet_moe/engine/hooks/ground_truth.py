"""Ground-truth boxes, areas and labels of an image in original-image pixels."""
from typing import Optional

import numpy as np
from mmengine.fileio import get_local_path
from pycocotools.coco import COCO


class GroundTruth:
    """Reads GT from the dataset's COCO annotation file when it has one (so areas are
    the annotations' ``area``, as COCOeval uses), else from the data sample's
    ``gt_instances`` rescaled to the original image (area = w·h). Crowd regions are
    left out, as COCOeval ignores them.
    """

    def __init__(self, dataset):
        self.coco: Optional[COCO] = None
        self.cat2label = getattr(dataset, 'cat2label', None)
        ann_file = getattr(dataset, 'ann_file', None)
        if self.cat2label is not None and ann_file and str(ann_file).endswith('.json'):
            with get_local_path(ann_file, backend_args=getattr(dataset, 'backend_args',
                                                                None)) as local:
                self.coco = COCO(local)

    def __call__(self, sample):
        """(boxes (n, 4) xyxy, areas (n,), labels (n,)) of one DetDataSample."""
        if self.coco is not None:
            anns = [a for a in self.coco.imgToAnns.get(sample.metainfo['img_id'], [])
                    if not a.get('iscrowd', 0) and a['category_id'] in self.cat2label]
            boxes = np.array([[a['bbox'][0], a['bbox'][1], a['bbox'][0] + a['bbox'][2],
                               a['bbox'][1] + a['bbox'][3]] for a in anns],
                             dtype=np.float64).reshape(-1, 4)
            areas = np.array([a.get('area', a['bbox'][2] * a['bbox'][3]) for a in anns],
                             dtype=np.float64)
            labels = np.array([self.cat2label[a['category_id']] for a in anns], dtype=np.int64)
            return boxes, areas, labels
        gt = sample.gt_instances
        boxes = gt.bboxes.cpu().numpy().astype(np.float64).reshape(-1, 4)
        scale = sample.metainfo.get('scale_factor', (1.0, 1.0))
        boxes = boxes / np.array([scale[0], scale[1], scale[0], scale[1]])
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        return boxes, areas, gt.labels.cpu().numpy().astype(np.int64)
