"""Shared test helpers: tiny toy datasets, config overrides, running the tools."""
import glob
import os
import os.path as osp
import socket
import subprocess
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mmengine.config import Config

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
TOOLS = osp.join(ROOT, 'tools')
CONFIGS = osp.join(ROOT, 'configs')
TOY_BASE_CONFIG = osp.join(CONFIGS, 'toy', 'retinanet_r18_fpn_4e_toy-coco.py')
TOY_MOE_CONFIG = osp.join(CONFIGS, 'toy', 'retinanet_r18_fpn_moe-head_4e_toy-coco.py')
TOY_CONFIGS = sorted(glob.glob(osp.join(CONFIGS, 'toy', '*.py')))
TOY_MOE_CONFIGS = sorted(glob.glob(osp.join(CONFIGS, 'toy', '*moe*.py')))
COCO_MOE_CONFIGS = sorted(glob.glob(osp.join(CONFIGS, 'moe_retinanet', '*.py')) +
                          glob.glob(osp.join(CONFIGS, 'moe_anywhere', '*.py')))


@contextmanager
def logged_lines():
    """The messages mmengine's current logger emits within the block (a list)."""
    import logging
    from mmengine.logging import MMLogger
    messages = []
    handler = type('Recording', (logging.Handler, ), {
        'emit': lambda self, record: messages.append(record.getMessage())})()
    logger = MMLogger.get_current_instance()
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


def make_tiny_coco(out_dir, train=4, val=2, size=64, seed=0, workers=1):
    """A tiny toy COCO dataset written by the project's own generator."""
    sys.path.insert(0, TOOLS)
    try:
        import make_toy_coco
    finally:
        sys.path.remove(TOOLS)
    make_toy_coco.main([str(out_dir), '--train', str(train), '--val', str(val),
                        '--size', str(size), '--seed', str(seed), '--workers', str(workers)])
    return str(out_dir)


def toy_overrides(data_root, max_epochs=1, batch_size=2):
    """``--cfg-options`` that point a toy config at ``data_root`` and make it tiny."""
    root = str(data_root).rstrip('/') + '/'
    options = {
        'train_cfg.max_epochs': max_epochs, 'train_cfg.val_interval': max_epochs,
        'default_hooks.checkpoint.interval': 1, 'default_hooks.logger.interval': 1,
        'train_dataloader.batch_size': batch_size,
        'val_evaluator.ann_file': root + 'val.json',
        'test_evaluator.ann_file': root + 'val.json',
    }
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        options[f'{loader}.dataset.data_root'] = root
        options[f'{loader}.num_workers'] = 0
        options[f'{loader}.persistent_workers'] = False
    return options


def as_cli_options(options):
    return ['--cfg-options'] + [f'{k}={v}' for k, v in options.items()]


def run_tool(script, *args, cwd=None, timeout=600):
    """Run ``tools/<script>`` with the venv's Python; returns the finished process."""
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.run([sys.executable, osp.join(TOOLS, script), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    return proc


def load_tool(script):
    """The module of ``tools/<script>``, loaded from its file (tools/ is no package)."""
    import importlib.util
    name = osp.splitext(script)[0] + '_under_test'
    spec = importlib.util.spec_from_file_location(name, osp.join(TOOLS, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def import_tool(name):
    """``import <name>`` from tools/ (the demo scripts import each other by name)."""
    import importlib
    sys.path.insert(0, TOOLS)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(TOOLS)


def load_config(path, **overrides):
    cfg = Config.fromfile(path)
    cfg.merge_from_dict(overrides)
    return cfg


def one_training_step(model, batch_size=2, image_size=128, num_classes=5):
    """Loss dict (after backward) of one step on random images with random boxes."""
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(batch_size, [[3, image_size, image_size]] * batch_size,
                            num_items=[3] * batch_size, num_classes=num_classes)
    data = model.data_preprocessor(packed, True)
    model.train()
    losses = model(**data, mode='loss')
    total = sum(sum(v) if isinstance(v, list) else v
                for k, v in losses.items() if 'loss' in k)
    total.backward()
    return losses, data


def predict(model, batch_size=2, image_size=128, num_classes=5):
    from mmdet.testing import demo_mm_inputs
    packed = demo_mm_inputs(batch_size, [[3, image_size, image_size]] * batch_size,
                            num_items=[3] * batch_size, num_classes=num_classes)
    data = model.data_preprocessor(packed, False)
    model.eval()
    with torch.no_grad():
        return model(**data, mode='predict')


def toy_retinanet(**moe_head):
    """The toy RetinaNet config's model (score_thr 0: untrained scores are tiny); with
    ``moe_head`` arguments, a MoERetinaNet whose head is a MoERetinaHead with them."""
    model = load_config(TOY_BASE_CONFIG).model
    model.test_cfg.score_thr = 0.0
    if moe_head:
        model.type = 'MoERetinaNet'
        model.bbox_head.update(type='MoERetinaHead', **moe_head)
    return model


def stock_model_cfg(path, width=None):
    """The ``model`` of mmdet's own config ``path`` (e.g.
    ``'retinanet/retinanet_r50_fpn_1x_coco.py'``) with a ResNet-18 backbone; with
    ``width``, FPN and head channels set to it (5 classes; a two-stage detector's
    bbox heads become ``Shared4Conv1FCBBoxHead``, which has convs, see
    :func:`with_roi_head_width`)."""
    import mmdet
    cfg = Config.fromfile(osp.join(osp.dirname(mmdet.__file__), '.mim', 'configs', path))
    model = with_resnet18(cfg.model)
    if width is None:
        return model
    model.neck.out_channels = width
    if 'bbox_head' in model:
        model.bbox_head.update(in_channels=width, feat_channels=width, num_classes=5)
    else:  # two-stage; a Cascade RPN's channels are its stages'
        for rpn in model.rpn_head.get('stages') or [model.rpn_head]:
            rpn.update(in_channels=width, feat_channels=width)
        with_roi_head_width(model.roi_head, width)
    return model


def with_roi_head_width(roi_head, width):
    """RoI extractors, mask and semantic heads of ``width`` channels, 5 classes, and
    a ``Shared4Conv1FCBBoxHead`` per bbox head (per stage for a cascade), keeping
    its box coder, class-agnostic regression and losses."""
    for key in ('bbox_roi_extractor', 'mask_roi_extractor', 'semantic_roi_extractor'):
        if key in roi_head:
            roi_head[key].out_channels = width
    if 'semantic_head' in roi_head:
        roi_head.semantic_head.update(in_channels=width, conv_out_channels=width)
    masks = roi_head.get('mask_head') or []
    for mask in masks if isinstance(masks, list) else [masks]:
        mask.update(in_channels=width, conv_out_channels=width, num_classes=5)
    boxes = [dict(type='Shared4Conv1FCBBoxHead', in_channels=width,
                  conv_out_channels=width, fc_out_channels=64, roi_feat_size=7,
                  num_classes=5, bbox_coder=old.bbox_coder,
                  reg_class_agnostic=old.get('reg_class_agnostic', False),
                  loss_cls=old.loss_cls, loss_bbox=old.loss_bbox)
             for old in (roi_head.bbox_head if isinstance(roi_head.bbox_head, list)
                         else [roi_head.bbox_head])]
    roi_head.bbox_head = boxes if isinstance(roi_head.bbox_head, list) else boxes[0]


def redraw_parameters(model, seed=0):
    """Weights at a 1/sqrt(fan_in) scale, biases small, per-level box scales 3: a
    model whose scores spread over (0, 1) and whose boxes vary in size, unlike at
    mmdet's initialisation, where no score passes ``score_thr``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif name.endswith('bias'):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.dim() == 0:
                p.fill_(3.0)


def with_resnet18(model_cfg):
    """A detector config with a ResNet-18 backbone (no pretrained weights); for a
    nested ``MoEDetector`` the inner detector is changed."""
    cfg = model_cfg.get('detector') or model_cfg
    cfg.backbone.update(depth=18, init_cfg=None)
    cfg.neck.in_channels = [64, 128, 256, 512]
    return model_cfg


def build_model(model_cfg):
    """Build as the Runner does, under mmdet's default registry scope."""
    from mmdet.registry import MODELS
    from mmengine.registry import init_default_scope
    import mmdet_moe  # noqa: F401
    init_default_scope('mmdet')
    model = MODELS.build(model_cfg)
    model.init_weights()
    return model


def assert_losses_equal_dense(dense, moe, make_data, name, seed=None):
    """The MoE detector's loss dict is the dense one's plus ``loss_moe_importance``
    (each model on ``make_data(model)``; ``seed`` set before each forward, for the
    random samplers of two-stage detectors)."""
    from mmengine.logging import MessageHub
    MessageHub.get_current_instance().update_info('epoch', 0)  # TOOD reads it
    losses = []
    for model in (dense, moe):
        data = make_data(model)
        model.train()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            losses.append(model(**data, mode='loss'))
        finally:
            model.eval()
    want, got = losses
    assert set(got) - set(want) == {'loss_moe_importance'}, name
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-4, msg=key)


def all_finite(losses):
    values = [v for value in losses.values()
              for v in (value if isinstance(value, list) else [value])]
    return all(bool(torch.isfinite(v).all()) for v in values)


def _gloo_rank(rank, port, fn, args):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_on_two_gloo_ranks(fn, *args):
    """Run ``fn(rank, *args)`` in two CPU processes joined by a gloo process group.

    ``fn`` must be a module-level function (it is pickled into the children).
    """
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(_gloo_rank, args=(port, fn, args), nprocs=2)
