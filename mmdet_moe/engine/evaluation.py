"""Evaluate a config and checkpoint with mmengine's test loop, for the tools that
measure a trained model (its COCO metrics and, with :class:`ExpertSizeStatsHook`,
each expert's gate statistics)."""
import argparse
import copy
import json
import os.path as osp
import sys
from typing import Callable, Optional, Tuple, TypeVar

import torch
from mmengine.config import Config
from torch import nn


# the COCO box metrics the tools print
AP_KEYS = ('coco/bbox_mAP', 'coco/bbox_mAP_50', 'coco/bbox_mAP_s', 'coco/bbox_mAP_m',
           'coco/bbox_mAP_l')


Result = TypeVar('Result')


class CheckpointMismatchError(ValueError):
    """A checkpoint does not hold the model a config builds (the message says how)."""


def load_config(path: str, cfg_options: Optional[dict] = None) -> Config:
    if not osp.isfile(path):
        raise FileNotFoundError(f'config file not found: {path}')
    cfg = Config.fromfile(path)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    return cfg


def load_state_dict(checkpoint: str) -> Tuple[dict, dict]:
    """(state_dict, meta) of an mmengine checkpoint (or of a bare state dict)."""
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint file not found: {checkpoint}')
    state = torch.load(checkpoint, map_location='cpu')
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f'{checkpoint} holds a {type(state).__name__}, not '
                                      'a checkpoint dict')
    return state.get('state_dict', state), state.get('meta', {})


def check_checkpoint(model: nn.Module, checkpoint: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``checkpoint`` loads into ``model``
    strictly. mmengine loads ``load_from`` non-strictly (mismatches are only logged);
    a tool measuring an unrelated checkpoint would report nonsense."""
    state, _ = load_state_dict(checkpoint)
    try:
        missing, unexpected = copy.deepcopy(model).load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise CheckpointMismatchError(f'the checkpoint {checkpoint} does not match the '
                                      f'config: {str(err).splitlines()[1:3]}') from err
    if missing or unexpected:
        raise CheckpointMismatchError(
            f'the checkpoint {checkpoint} does not match the config: {len(missing)} keys '
            f'missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. '
            f'{unexpected[:3]})')


def key_mismatch(expected: dict, found: dict, examples: int = 3) -> Optional[str]:
    """How the state dict ``found`` differs from ``expected`` (a model's state dict)
    key by key, without load hooks (so a dense checkpoint does not pass for a MoE
    model by upcycling): the counts of missing, unexpected and shape-mismatched keys
    with a few of each, or None when they match."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f'{k} {tuple(found[k].shape)} ≠ {tuple(expected[k].shape)}'
              for k in expected if k in found and hasattr(found[k], 'shape')
              and tuple(found[k].shape) != tuple(expected[k].shape)]
    parts = [f'{len(keys)} {what} (e.g. {keys[:examples]})' for what, keys in (
        ('missing', missing), ('unexpected', unexpected),
        ('of another shape (checkpoint ≠ model)', shapes)) if keys]
    return '; '.join(parts) or None


def build_model(cfg: Config) -> nn.Module:
    """The model of ``cfg`` built in mmdet's scope, in eval mode (no weights loaded)."""
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    return MODELS.build(copy.deepcopy(cfg.model)).eval()


def load_checked(cfg: Config, checkpoint: str) -> nn.Module:
    """The model of ``cfg`` with ``checkpoint`` loaded strictly, in eval mode."""
    model = build_model(cfg)
    check_checkpoint(model, checkpoint)
    model.load_state_dict(load_state_dict(checkpoint)[0])
    return model


def test_runner(cfg: Config, checkpoint: str, work_dir: str,
                stats_hook: Optional[dict] = None):
    """An mmengine Runner for ``cfg``'s test loop with ``checkpoint`` (strictly
    checked: mmengine would load a mismatching ``load_from`` with a log line only)
    and, given ``stats_hook`` (an ExpertSizeStatsHook config), that hook in place of
    the config's own."""
    from mmengine.runner import Runner
    cfg = copy.deepcopy(cfg)
    cfg.work_dir, cfg.load_from = work_dir, checkpoint
    hooks = [h for h in cfg.get('custom_hooks', []) if h['type'] != 'ExpertSizeStatsHook']
    cfg.custom_hooks = hooks + ([stats_hook] if stats_hook else [])
    runner = Runner.from_cfg(cfg)
    check_checkpoint(runner.model, checkpoint)
    return runner


def evaluate_on_val(cfg: Config, checkpoint: str, work_dir: str,
                    gate_stats: bool = True) -> Tuple[dict, Optional[dict]]:
    """Run the test loop on ``cfg``'s val set (its ``val_dataloader`` and
    ``val_evaluator``) with ``checkpoint`` loaded (strictly checked).

    Returns:
        (metrics, statistics): the evaluator's metrics and, with ``gate_stats``, the
        ``expert_size_stats.json`` dict written by :class:`ExpertSizeStatsHook`
        (per MoE layer: ``importance`` Σ gate weights per expert, ``rows``, ...).
    """
    cfg = copy.deepcopy(cfg)
    for key in ('dataloader', 'evaluator'):
        if cfg.get(f'val_{key}') is None:
            raise ValueError(f'the config has no val_{key}: the val set is needed to '
                             'measure the model')
        cfg[f'test_{key}'] = cfg[f'val_{key}']
    runner = test_runner(cfg, checkpoint, work_dir,
                         dict(type='ExpertSizeStatsHook') if gate_stats else None)
    metrics = runner.test()
    if not gate_stats:
        return metrics, None
    with open(osp.join(runner.work_dir, 'expert_size_stats', 'test.json')) as f:
        return metrics, json.load(f)


def ap_line(metrics: Optional[dict]) -> str:
    """The COCO box APs of an evaluator's ``metrics`` on one line."""
    if metrics is None:
        return 'not evaluated'
    if not any(key in metrics for key in AP_KEYS):
        return f'no COCO AP (the evaluator returned {metrics}; no detections?)'
    return ', '.join(f'{key.split("_", 1)[-1]} {metrics[key]:.4f}' for key in AP_KEYS
                     if key in metrics)


def default_work_dir(config: str, tool: str) -> str:
    return osp.join('work_dirs', osp.splitext(osp.basename(config))[0], tool)


def write_model(folder: str, stem: str, cfg: Config, model: nn.Module,
                meta: dict) -> Tuple[str, str]:
    """Write ``<stem>.py`` (``cfg``) and ``<stem>.pth`` (``model``'s weights, ``meta``)
    into ``folder`` and check that they load as the stock tools load them (the config
    built, the checkpoint strictly). Returns the two paths."""
    config_path, checkpoint_path = (osp.join(folder, stem + ext) for ext in ('.py', '.pth'))
    cfg.dump(config_path)
    torch.save(dict(meta=meta, state_dict=model.state_dict()), checkpoint_path)
    load_checked(load_config(config_path), checkpoint_path)
    return config_path, checkpoint_path


def run_tool(tool: str, work: Callable[[], Result], report: Callable[[Result], None]) -> int:
    """A tool's exit code: ``report(work())`` and 0, or 2 with ``<tool>: error: ...``
    on stderr for bad input (a ValueError or a missing file)."""
    try:
        result = work()
    except (ValueError, FileNotFoundError) as err:
        print(f'{tool}: error: {err}', file=sys.stderr)
        return 2
    report(result)
    return 0


def model_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with a tool's CONFIG, CHECKPOINT and ``--cfg-options`` (as in
    mmdet's tools/test.py)."""
    from mmengine.config import DictAction
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, as in tools/test.py')
    return parser
