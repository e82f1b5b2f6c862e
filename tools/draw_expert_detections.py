"""Draw detections coloured by the expert that dominated them, with a legend.

    python tools/draw_expert_detections.py CONFIG CHECKPOINT --out-dir vis/ \\
        [IMAGE ...] [--num-images 8] [--score-thr 0.3] [--moe-index 0]

Without IMAGE arguments the first ``--num-images`` images of the config's test set
are drawn. Needs detections tagged with ``expert_weights`` (a dense head with MoE
layers, e.g. MoERetinaHead, or a MoE FPN neck); ``--moe-index`` picks which of the
tagged MoE modules (the head's first, then the neck's) colours the boxes. A neck
module colours only the detections of the level it feeds (the others' rows are
zeros).
"""
import argparse
import os
import os.path as osp
import sys

import mmcv
import numpy as np
from mmengine.config import Config, DictAction
from mmengine.visualization import Visualizer

EXPERT_COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40),
                  (148, 103, 189), (140, 86, 75), (227, 119, 194), (127, 127, 127),
                  (188, 189, 34), (23, 190, 207)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Draw detections coloured by expert')
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('images', nargs='*', help='image files (default: the test set)')
    parser.add_argument('--out-dir', required=True)
    parser.add_argument('--num-images', type=int, default=8)
    parser.add_argument('--score-thr', type=float, default=0.3)
    parser.add_argument('--moe-index', type=int, default=0,
                        help='which tagged MoE module colours the boxes')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(argv)


def test_set_images(cfg, count: int) -> list:
    from mmengine.registry import init_default_scope
    from mmdet.registry import DATASETS
    init_default_scope(cfg.get('default_scope', 'mmdet'))  # as the Runner does
    dataset = DATASETS.build(cfg.test_dataloader.dataset)
    return [dataset.get_data_info(i)['img_path'] for i in range(min(count, len(dataset)))]


def colour(expert: int):
    return EXPERT_COLOURS[expert % len(EXPERT_COLOURS)]


def draw(image_path: str, pred, moe_index: int, score_thr: float, out_path: str) -> int:
    """Draw one image's detections; returns how many were drawn."""
    if 'expert_weights' not in pred:
        raise ValueError('the detections carry no expert_weights: the MoE layers must be '
                         'in a dense head that decodes per FPN level (RetinaNet, FCOS, '
                         'ATSS, GFL, ...) or in an FPN neck above one, which tag them')
    num_moes = pred.expert_weights.shape[1]
    if not 0 <= moe_index < num_moes:
        raise ValueError(f'--moe-index {moe_index} is out of range: the detections are '
                         f'tagged by {num_moes} MoE module(s)')
    weights = pred.expert_weights[:, moe_index]
    # a neck module's row is zeros for the detections of levels it does not feed
    keep = (pred.scores >= score_thr) & (weights.sum(-1) > 0)
    boxes = pred.bboxes[keep].cpu().numpy()
    experts = weights[keep].argmax(-1).cpu().numpy()
    num_experts = pred.expert_weights.shape[-1]
    image = mmcv.imread(image_path, channel_order='rgb')
    visualizer = Visualizer(image=image)
    if len(boxes):
        visualizer.draw_bboxes(boxes, edge_colors=[colour(e) for e in experts], line_widths=2)
    for e in range(num_experts):  # legend, top-left
        y = 4 + 14 * e
        visualizer.draw_bboxes(np.array([[4, y, 14, y + 10]]), edge_colors=colour(e),
                               face_colors=colour(e), alpha=1.0)
        visualizer.draw_texts(f'expert {e}', np.array([18, y - 1]), colors=colour(e),
                              font_sizes=9)
    mmcv.imwrite(mmcv.rgb2bgr(visualizer.get_image()), out_path, auto_mkdir=True)
    return len(boxes)


def main(argv=None) -> int:
    args = parse_args(argv)
    from mmdet.apis import inference_detector, init_detector
    import mmdet_moe  # noqa: F401
    for path, what in ((args.config, 'config'), (args.checkpoint, 'checkpoint')):
        if not osp.isfile(path):
            print(f'draw_expert_detections: error: {what} file not found: {path}',
                  file=sys.stderr)
            return 2
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    images = args.images or test_set_images(cfg, args.num_images)
    if not images:
        print('draw_expert_detections: error: no image to draw', file=sys.stderr)
        return 2
    model = init_detector(cfg, args.checkpoint, device='cpu')
    os.makedirs(args.out_dir, exist_ok=True)
    for image_path in images:
        result = inference_detector(model, image_path)
        out_path = osp.join(args.out_dir, osp.basename(image_path))
        try:
            count = draw(image_path, result.pred_instances, args.moe_index,
                         args.score_thr, out_path)
        except ValueError as err:
            print(f'draw_expert_detections: error: {err}', file=sys.stderr)
            return 2
        print(f'{out_path}: {count} detections')
    return 0


if __name__ == '__main__':
    sys.exit(main())
