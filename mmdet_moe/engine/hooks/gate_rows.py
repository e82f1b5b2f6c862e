"""Gate rows of one batch, per MoE layer, from a GateRecorder's records."""
from typing import Dict, Optional

import numpy as np

from ...layers import GateRecorder


class LayerRows:
    """Gate weights of one MoE layer for a batch: ``rows`` (calls, B, N).

    ``calls`` is 1 for a layer run once per image (e.g. one FPN conv), or the number
    of FPN levels for a layer shared over levels (a head), ordered by level.
    """

    def __init__(self, rows: np.ndarray, per_level: bool):
        self.rows, self.per_level = rows, per_level

    def image_row(self, b: int) -> np.ndarray:
        """(N,) the image's gate weights, averaged over the layer's calls."""
        return self.rows[:, b].mean(axis=0)

    def detection_rows(self, b: int, levels: Optional[np.ndarray], count: int) -> np.ndarray:
        """(count, N) the gate row that produced each detection of image b."""
        if self.rows.shape[0] == 1:
            return np.repeat(self.rows[0, b][None], count, axis=0)
        if levels is not None and self.per_level and levels.max(initial=-1) < self.rows.shape[0]:
            return self.rows[levels, b]
        return np.repeat(self.image_row(b)[None], count, axis=0)


def rows_by_layer(recorder: GateRecorder) -> Dict[str, LayerRows]:
    layers = {}
    for name, records in recorder.by_layer().items():
        per_level = all(r.level is not None for r in records)
        ordered = sorted(records, key=lambda r: r.level if per_level else r.call)
        layers[name] = LayerRows(
            np.stack([r.weights.float().cpu().numpy() for r in ordered]),
            per_level=per_level or len(records) > 1)
    return layers
