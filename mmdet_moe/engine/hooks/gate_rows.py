"""Gate rows of one batch, per MoE layer, from a GateRecorder's records."""
from typing import Dict, Optional

import numpy as np
import torch

from ...layers import GateRecord, GateRecorder


class LayerRows:
    """Gate weights of one MoE layer for a batch: ``rows`` (views, calls, B, N).

    ``views`` is the number of augmented views of each image (test-time
    augmentation; else 1). ``calls`` is 1 for a layer run once per image (e.g. one
    FPN conv), or the number of FPN levels for a layer shared over levels (a head),
    ordered by level.
    """

    def __init__(self, rows: np.ndarray, per_level: bool):
        self.rows, self.per_level = rows, per_level

    def image_row(self, b: int) -> np.ndarray:
        """(N,) the image's gate weights, averaged over its views and the layer's calls."""
        return self.rows[:, :, b].mean(axis=(0, 1))

    def call_rows(self, b: int) -> np.ndarray:
        """(calls, N) the image's gate weights per call (level), averaged over views."""
        return self.rows[:, :, b].mean(axis=0)

    def detection_rows(self, b: int, levels: Optional[np.ndarray],
                       views: Optional[np.ndarray], count: int) -> np.ndarray:
        """(count, N) the gate row that produced each detection of image b: that of
        its view (``views``; None: view 0) and its level."""
        views = np.zeros(count, np.int64) if views is None else views
        rows = self.rows[views, :, b]  # (count, calls, N)
        if self.rows.shape[1] == 1:
            return rows[:, 0]
        if levels is not None and self.per_level and levels.max(initial=-1) < self.rows.shape[1]:
            return rows[np.arange(count), levels]
        return rows.mean(axis=1)


def image_rows(record: GateRecord, num_images: Optional[int]) -> np.ndarray:
    """(B, N) a record's gate rows per image: a layer gating objects (RoIs, their
    ``row_images`` known) gives each image the mean row of its objects."""
    weights = record.weights.float().cpu()
    if record.row_images is None:
        return weights.numpy()
    if num_images is None:
        raise ValueError(f'MoE layer {record.name} gates objects, not images: the number '
                         'of images of the batch is needed')
    images = record.row_images.cpu()
    sums = torch.zeros(num_images, weights.shape[1]).index_add_(0, images, weights)
    counts = torch.bincount(images, minlength=num_images).clamp(min=1)
    return (sums / counts[:, None]).numpy()


def rows_by_layer(recorder: GateRecorder, num_views: int = 1,
                  num_images: Optional[int] = None) -> Dict[str, LayerRows]:
    """Each layer's records of a batch of ``num_images`` images in ``num_views``
    augmented views, run one view after the other (as test-time augmentation does)."""
    layers = {}
    for name, records in recorder.by_layer().items():
        if len(records) % num_views:
            raise RuntimeError(f'MoE layer {name} routed {len(records)} times for '
                               f'{num_views} augmented views: not the same calls per view')
        per_level = all(r.level is not None for r in records)
        calls = len(records) // num_views
        by_call = sorted(records, key=lambda r: r.call)
        views = []
        for view in range(num_views):
            own = by_call[view * calls:(view + 1) * calls]
            ordered = sorted(own, key=lambda r: r.level if per_level else r.call)
            views.append(np.stack([image_rows(r, num_images) for r in ordered]))
        layers[name] = LayerRows(np.stack(views), per_level=per_level or calls > 1)
    return layers
