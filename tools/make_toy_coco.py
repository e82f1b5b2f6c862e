"""Generate a small COCO-format detection dataset that needs no download.

    python tools/make_toy_coco.py data/toy_coco [--train 3000 --val 300 --size 256]

Writes ``{out}/train.json``, ``{out}/val.json`` and ``{out}/images/{train,val}/*.png``:
textured shapes of several classes on cluttered backgrounds, with sizes spread over
COCO's small / medium / large buckets (areas < 32², < 96², ≥ 96² in pixels) in
about COCO's proportions, some overlapping. ``area`` is the shape's pixel count
(as in COCO, the mask area, not the box's w·h). Deterministic for a seed. Prints
the dataset's fingerprint (:func:`dataset_fingerprint`: annotations and pixels), which
tells one dataset from another across machines.
"""
import argparse
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import os.path as osp

import cv2
import numpy as np

from mmdet_moe.atomic_output import atomic_directory

CLASSES = ('circle', 'square', 'triangle', 'star', 'ring')
# COCO train2017: 41 % small, 34 % medium, 24 % large objects (COCO_PROPORTIONS).
# Objects are drawn from the buckets with the odds below, sqrt(area) log-uniform in
# the range: large shapes lose visible area to the objects in front of them (and the
# last ones placed fail to fit more often), so they are drawn more often than they
# end up; these odds give COCO's proportions in the written annotations (a test
# checks it).
COCO_PROPORTIONS = dict(small=0.41, medium=0.34, large=0.24)
SIZE_BUCKETS = (('small', 0.38, 6, 32), ('medium', 0.29, 32, 96), ('large', 0.33, 96, 180))
# mask area / side² of each shape (side = diameter of its circumscribed circle)
FILL_RATIO = dict(circle=0.785, square=0.5, triangle=0.325, star=0.33, ring=0.63)


def shape_polygon(cls: str, cx: float, cy: float, side: float, rng) -> np.ndarray:
    """Outline points of a shape that fits in a circle of diameter ``side``."""
    r = side / 2
    angle = rng.uniform(0, 2 * math.pi)
    if cls == 'square':
        t = angle + np.arange(4) * math.pi / 2
    elif cls == 'triangle':
        t = angle + np.arange(3) * 2 * math.pi / 3
    elif cls == 'star':
        t = angle + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.45)
        return np.stack([cx + radii * np.cos(t), cy + radii * np.sin(t)], 1)
    else:  # circle, ring
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def shape_mask(cls: str, poly: np.ndarray, height: int, width: int, side: float):
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(poly * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    if cls == 'ring':
        centre = poly.mean(0)
        cv2.circle(mask, tuple(int(v) for v in np.round(centre)),
                   max(1, int(side * 0.22)), 0, -1)
    return mask.astype(bool)


def texture(height: int, width: int, rng) -> np.ndarray:
    """A coloured texture: base colour plus stripes or noise."""
    colour = rng.uniform(40, 255, 3).astype(np.float32)
    img = np.broadcast_to(colour, (height, width, 3)).copy()
    kind = rng.integers(3)
    if kind == 0:
        yy, xx = np.mgrid[:height, :width].astype(np.float32)
        period, direction = rng.uniform(4, 14), rng.uniform(0, math.pi)
        phase = (xx * math.cos(direction) + yy * math.sin(direction)) / period
        stripes = np.sin(phase * 2 * math.pi)
        img += stripes[..., None] * rng.uniform(20, 60)
    elif kind == 1:
        img += rng.normal(0, 25, (height, width, 1)).astype(np.float32)
    return img


def background(height: int, width: int, rng) -> np.ndarray:
    """Gradient plus clutter (lines, elongated blobs) that look like, but are not,
    objects. Blobs are at least 2.5 times as long as wide: round ones would be
    indistinguishable from small circles, whatever the detector."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32) / max(height, width)
    c0, c1 = rng.uniform(0, 180, (2, 3)).astype(np.float32)
    w = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1))[..., None]
    img = c0 + (c1 - c0) * (w - w.min()) / (np.ptp(w) + 1e-6)
    for _ in range(rng.integers(4, 12)):
        colour = tuple(float(v) for v in rng.uniform(0, 255, 3))
        p1 = tuple(int(v) for v in rng.integers(0, [width, height]))
        p2 = tuple(int(v) for v in rng.integers(0, [width, height]))
        if rng.random() < 0.5:
            cv2.line(img, p1, p2, colour, int(rng.integers(1, 4)))
        else:
            width_ = rng.uniform(1.5, 4)
            axes = (int(round(width_ * rng.uniform(2.5, 4))), int(round(width_)))
            cv2.ellipse(img, p1, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return img + rng.normal(0, 6, img.shape).astype(np.float32)


def sample_side(rng, cls: str, image_size: int) -> float:
    """Side of a shape whose area falls in a COCO bucket chosen with COCO's odds."""
    probs = np.array([bucket[1] for bucket in SIZE_BUCKETS])
    _, _, lo, hi = SIZE_BUCKETS[rng.choice(len(SIZE_BUCKETS), p=probs / probs.sum())]
    # uniform in log-area within the bucket, like natural size distributions
    root_area = math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return min(root_area / math.sqrt(FILL_RATIO[cls]), image_size * 0.9)


def make_image(rng, size: int, max_objects: int, max_occlusion: float = 0.3, tries: int = 10):
    """One image and its annotations; no object is more than ``max_occlusion`` hidden.

    Box and area are those of the visible part, as COCO annotates them.
    """
    img = background(size, size, rng)
    owner = np.full((size, size), -1, np.int32)  # which object each pixel shows
    full_areas, labels = [], []
    objects = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        cls = int(rng.integers(len(CLASSES)))
        objects.append((sample_side(rng, CLASSES[cls], size), cls))
    # big objects first, so the small ones in front rarely hide them
    for side, cls in sorted(objects, reverse=True):
        for _ in range(tries):
            cx, cy = rng.uniform(side / 2, size - side / 2, 2)
            mask = shape_mask(CLASSES[cls], shape_polygon(CLASSES[cls], cx, cy, side, rng),
                              size, size, side)
            hidden = np.bincount(owner[mask & (owner >= 0)], minlength=len(full_areas))
            visible = np.bincount(owner[owner >= 0], minlength=len(full_areas))
            if mask.sum() >= 16 and all(visible - hidden >= (1 - max_occlusion) *
                                        np.array(full_areas, dtype=float)):
                break
        else:
            continue
        # paint the texture over the mask's bounding box only
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        local = mask[y0:y1, x0:x1]
        img[y0:y1, x0:x1][local] = texture(y1 - y0, x1 - x0, rng)[local]
        owner[mask] = len(full_areas)
        full_areas.append(int(mask.sum()))
        labels.append(cls)
    annotations = []
    for index, cls in enumerate(labels):
        ys, xs = np.nonzero(owner == index)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        annotations.append(dict(category_id=cls + 1, iscrowd=0, area=float(len(xs)),
                                bbox=[float(x0), float(y0), float(x1 - x0), float(y1 - y0)]))
    return np.clip(img, 0, 255).astype(np.uint8), annotations


SPLITS = ('train', 'val')
# bump when the drawing changes: a dataset of another version is not the one the
# configs and the README's figures were made with
GENERATOR_VERSION = 2


def dataset_info(images: int, size: int, max_objects: int, seed: int) -> dict:
    """COCO's ``info`` entry of a split: what made it (read by tools/demo.py)."""
    return dict(description='mmdet-moe toy COCO (tools/make_toy_coco.py)',
                generator_version=GENERATOR_VERSION, images=images, size=size,
                max_objects=max_objects, seed=seed)


def render(task: tuple) -> list:
    """Draw and write one image; its own random stream (seed, split, id) makes the
    dataset the same whatever the number of worker processes."""
    out_dir, split, image_id, size, max_objects, seed = task
    rng = np.random.default_rng([seed, SPLITS.index(split), image_id])
    img, anns = make_image(rng, size, max_objects)
    cv2.imwrite(osp.join(out_dir, 'images', f'{split}/{image_id:06d}.png'), img)
    return anns


def write_split(out_dir: str, split: str, count: int, size: int, max_objects: int,
                seed: int, pool=None):
    os.makedirs(osp.join(out_dir, 'images', split), exist_ok=True)
    tasks = [(out_dir, split, image_id, size, max_objects, seed)
             for image_id in range(1, count + 1)]
    rendered = pool.imap(render, tasks, chunksize=16) if pool else map(render, tasks)
    images, annotations = [], []
    for image_id, anns in enumerate(rendered, 1):
        images.append(dict(id=image_id, file_name=f'{split}/{image_id:06d}.png',
                           height=size, width=size))
        for ann in anns:
            annotations.append(dict(ann, id=len(annotations) + 1, image_id=image_id))
    categories = [dict(id=i + 1, name=name, supercategory='shape')
                  for i, name in enumerate(CLASSES)]
    with open(osp.join(out_dir, f'{split}.json'), 'w') as f:
        json.dump(dict(info=dataset_info(count, size, max_objects, seed), images=images,
                       annotations=annotations, categories=categories), f)
    return len(images), len(annotations)


def dataset_fingerprint(root: str) -> str:
    """A short hash of the dataset in ``root``: each split's annotations (as parsed)
    and every image's pixels, in image order. It names the data, not the files (the
    PNG encoder's output may differ between library versions), so two machines with
    the same fingerprint train on the same data."""
    digest = hashlib.sha256()
    for split in SPLITS:
        with open(osp.join(root, f'{split}.json')) as f:
            coco = json.load(f)
        digest.update(json.dumps(coco, sort_keys=True, separators=(',', ':')).encode())
        for image in coco['images']:
            path = osp.join(root, 'images', image['file_name'])
            pixels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
            if pixels is None:
                raise FileNotFoundError(f'{path}: an image of {split}.json is missing or '
                                        'unreadable; remake the dataset')
            digest.update(pixels.tobytes())
    return digest.hexdigest()[:12]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Generate the toy COCO dataset')
    parser.add_argument('out_dir', nargs='?', default='data/toy_coco')
    parser.add_argument('--train', type=int, default=3000, help='training images')
    parser.add_argument('--val', type=int, default=300, help='validation images')
    parser.add_argument('--size', type=int, default=256, help='image side in pixels')
    parser.add_argument('--max-objects', type=int, default=6, help='objects per image, at most')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--workers', type=int, default=os.cpu_count(),
                        help='processes drawing images (the dataset does not depend on it)')
    args = parser.parse_args(argv)
    for name in ('train', 'val', 'max_objects', 'workers'):
        if getattr(args, name) < 1:
            parser.error(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.size < 64:
        parser.error(f'--size must be >= 64 pixels, got {args.size}')
    return args


def main(argv=None):
    args = parse_args(argv)
    with atomic_directory(args.out_dir) as tmp, \
            (multiprocessing.Pool(args.workers, initializer=cv2.setNumThreads,
                                  initargs=(1,)) if args.workers > 1 else
             contextlib.nullcontext()) as pool:  # never a half-written dataset
        for split in SPLITS:
            n_img, n_ann = write_split(tmp, split, getattr(args, split), args.size,
                                       args.max_objects, args.seed, pool)
            print(f'{split}: {n_img} images, {n_ann} objects')
        print(f'fingerprint: {dataset_fingerprint(tmp)} (annotations and pixels)')
    print(f'wrote {args.out_dir}')


if __name__ == '__main__':
    main()
