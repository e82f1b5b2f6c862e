"""COCO object-size buckets, with boundaries included exactly as pycocotools does.

pycocotools' ``COCOeval`` uses ``areaRng = [[0, 32²], [32², 96²], [96², 1e5²]]`` and
ignores an object when ``area < lo or area > hi``: both ends are inclusive, so an
object of area exactly 32² (or 96²) counts in *both* neighbouring buckets, as it
does for AP_S/AP_M/AP_L. Areas are in original-image pixels.
"""
import numpy as np

BUCKET_NAMES = ('small', 'medium', 'large')
AREA_RANGES = ((0.0, 32.0 ** 2), (32.0 ** 2, 96.0 ** 2), (96.0 ** 2, 1e5 ** 2))


def bucket_membership(areas) -> np.ndarray:
    """(n,) areas → (n, 3) bool: which COCO buckets each object counts in."""
    areas = np.asarray(areas, dtype=np.float64).reshape(-1, 1)
    lo = np.array([r[0] for r in AREA_RANGES])
    hi = np.array([r[1] for r in AREA_RANGES])
    return (areas >= lo) & (areas <= hi)
