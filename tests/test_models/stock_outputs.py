"""Write the losses and predictions of stock mmdet detectors (no MoE layers) to a
file, with or without ``import mmdet_moe``; run as a script by test_mmdet_patches.

Usage: python stock_outputs.py OUT_FILE [--plugin]
"""
import os.path as osp
import random
import sys

import numpy as np
import torch

sys.path.insert(0, osp.dirname(osp.dirname(osp.abspath(__file__))))  # tests/: helpers

from helpers import redraw_parameters, stock_model_cfg  # noqa: E402

CONFIGS = ('retinanet/retinanet_r50_fpn_1x_coco.py',
           'faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
           'cascade_rcnn/cascade-rcnn_r50_fpn_1x_coco.py',
           'paa/paa_r50_fpn_1x_coco.py')  # a head with its own decode


def outputs(path: str) -> dict:
    """{name: tensor}: the loss dict of one training step and the predicted boxes,
    scores and labels of each image, of the stock detector of ``path``."""
    from mmdet.registry import MODELS
    from mmdet.testing import demo_mm_inputs
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    model = MODELS.build(stock_model_cfg(path, 32))
    model.init_weights()
    redraw_parameters(model, seed=3)
    packed = demo_mm_inputs(2, [[3, 96, 128], [3, 128, 96]], num_items=[2, 2],
                            num_classes=5)
    result = {}
    model.train()
    torch.manual_seed(1)  # the samplers of two-stage detectors
    for key, value in model(**model.data_preprocessor(packed, True), mode='loss').items():
        values = value if isinstance(value, list) else [value]
        result.update({f'loss/{key}/{i}': v.detach() for i, v in enumerate(values)})
    model.eval()
    with torch.no_grad():
        samples = model(**model.data_preprocessor(packed, False), mode='predict')
    for b, sample in enumerate(samples):
        pred = sample.pred_instances
        result.update({f'predict/{b}/{key}': pred[key] for key in pred.keys()})
        result[f'predict/{b}/metainfo'] = sorted(pred.metainfo)
    return result


def main(out_file: str, plugin: bool) -> None:
    from mmengine.registry import init_default_scope
    if plugin:
        import mmdet_moe  # noqa: F401
    else:
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)
    init_default_scope('mmdet')
    assert ('mmdet_moe' in sys.modules) == plugin, sorted(sys.modules)
    torch.save({path: outputs(path) for path in CONFIGS}, out_file)


if __name__ == '__main__':
    main(sys.argv[1], '--plugin' in sys.argv[2:])
