"""The toy COCO generator: deterministic, COCO-loadable, sizes across buckets."""
import hashlib
import re

import cv2
import pytest
from pycocotools.coco import COCO

from helpers import load_tool, make_tiny_coco
from mmdet_moe.analysis import bucket_membership


dataset_fingerprint = load_tool('make_toy_coco.py').dataset_fingerprint


def digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob('*')):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_dataset_other_seed_other_dataset(tmp_path):
    a = make_tiny_coco(tmp_path / 'a', train=6, val=2, size=96, seed=3)
    make_tiny_coco(tmp_path / 'b', train=6, val=2, size=96, seed=3)
    make_tiny_coco(tmp_path / 'c', train=6, val=2, size=96, seed=4)
    assert digest(tmp_path / 'a') == digest(tmp_path / 'b') != digest(tmp_path / 'c')
    assert a.endswith('a')


def test_annotations_load_in_pycocotools_and_are_consistent(tmp_path):
    root = tmp_path / 'toy'
    make_tiny_coco(root, train=60, val=2, size=256, seed=0)
    coco = COCO(str(root / 'train.json'))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(coco.getImgIds()) == 60 and len(coco.getCatIds()) == 5 and anns
    for ann in anns:
        x, y, w, h = ann['bbox']
        img = coco.imgs[ann['image_id']]
        assert 0 <= x and 0 <= y and x + w <= img['width'] and y + h <= img['height']
        assert 0 < ann['area'] <= w * h  # visible mask area inside its box
        assert (root / 'images' / img['file_name']).is_file()
    buckets = bucket_membership([a['area'] for a in anns]).sum(0)
    assert (buckets > 0).all()  # small, medium and large objects
    assert buckets[0] > buckets[2]  # more small than large, as in COCO


def test_bad_arguments_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        make_tiny_coco(tmp_path / 'x', size=32)
    assert '--size must be >= 64' in capsys.readouterr().err
    assert not (tmp_path / 'x').exists()


def test_size_proportions_are_coco_s(tmp_path):
    """Small / medium / large in the written annotations (areas as COCOeval buckets
    them) within 0.03 of COCO train2017's 41 / 34 / 24 %."""
    root = tmp_path / 'toy'
    make_tiny_coco(root, train=500, val=1, size=256, seed=0)
    coco = COCO(str(root / 'train.json'))
    counts = bucket_membership([a['area'] for a in coco.loadAnns(coco.getAnnIds())]).sum(0)
    assert counts / counts.sum() == pytest.approx([0.41, 0.34, 0.24], abs=0.03)


def test_worker_processes_do_not_change_the_dataset_or_its_fingerprint(tmp_path, capsys):
    printed = []
    for name, workers in (('one', 1), ('two', 2)):
        make_tiny_coco(tmp_path / name, train=5, val=2, size=96, seed=1, workers=workers)
        printed += re.findall(r'^fingerprint: ([0-9a-f]{12}) ', capsys.readouterr().out,
                              re.MULTILINE)
    assert digest(tmp_path / 'one') == digest(tmp_path / 'two')
    assert printed == [dataset_fingerprint(tmp_path / 'one')] * 2


def test_fingerprint_names_the_pixels_and_annotations_not_the_files(tmp_path):
    root = tmp_path / 'toy'
    make_tiny_coco(root, train=3, val=2, size=64, seed=2)
    before = dataset_fingerprint(root)
    image = root / 'images' / 'val' / '000002.png'
    pixels = cv2.imread(str(image), cv2.IMREAD_UNCHANGED)
    cv2.imwrite(str(image), pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])  # other bytes
    assert dataset_fingerprint(root) == before
    pixels[5, 7, 0] ^= 1  # one pixel's lowest bit
    cv2.imwrite(str(image), pixels)
    assert dataset_fingerprint(root) != before
    image.unlink()
    with pytest.raises(FileNotFoundError, match=r'val/000002\.png: an image of val\.json'):
        dataset_fingerprint(root)
