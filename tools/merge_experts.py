"""Fold the experts of a trained MoE detector's MoEConv2d layers into dense convs.

    python tools/merge_experts.py CONFIG CHECKPOINT --out-dir DIR [--work-dir WORK_DIR]
        [--cfg-options ...]

A MoEConv2d computes ``Σ_i g_i (W_i ∗ x + b_i) = (Σ_i g_i W_i) ∗ x + Σ_i g_i b_i`` with
per-image gate weights g. Its merged form is the dense conv of the mean gate weights
ḡ on the val set, ``Σ_i ḡ_i W_i`` (+ ``Σ_i ḡ_i b_i``): exact for an equal-weight gate
(ḡ = 1/N for every image), the conv of the average routing otherwise. The tool runs
the val set once with the MoE model (its AP and every layer's ḡ), merges, evaluates
the merged model, prints both APs and writes into ``--out-dir``:

- ``<config>_merged.py``: a stock mmdet config (mmdet's own types, no custom import):
  MoE heads, necks and detectors become the stock ones they extend, MoEConv2d
  ``conv_cfg`` s dense convs, mmdet_moe's hooks are dropped;
- ``<config>_merged.pth``: its weights; both run where ``mmdet_moe`` is not installed
  (``tools/test.py``, ``init_detector``, mmdeploy);
- ``merging.json``: ḡ of every layer and the AP before and after.

Whole-subnet experts (a conv tower with norms and activations per expert) and μMoE
layers are not single linear convs and are refused, as are a checkpoint that does not
match the config: exit code 2, with nothing written.
"""
import json
import os.path as osp
import sys
from typing import Dict, List, Optional

import numpy as np
import torch
from mmdet_moe.analysis import mean_gate_weights
from mmdet_moe.atomic_output import atomic_directory, check_replaceable
from mmdet_moe.engine.evaluation import (ap_line, default_work_dir, evaluate_on_val,
                                         load_checked, load_config, load_state_dict,
                                         model_parser, run_tool, write_model)
from mmdet_moe.layers import EqualWeightGate, MoEConv2d, is_moe_module, merged_conv
from mmdet_moe.models.stock_config import stock_config


def parse_args(argv=None):
    parser = model_parser("Fold a MoE detector's MoEConv2d experts into dense convs (a stock "
                    'mmdet config and checkpoint)')
    parser.add_argument('--out-dir', required=True, help='folder for the merged config '
                        'and checkpoint (replaced as a whole; nothing written on error)')
    parser.add_argument('--work-dir', help='work dir of the val runs')
    return parser.parse_args(argv)


def mergeable_layers(model: torch.nn.Module) -> Dict[str, MoEConv2d]:
    """The MoE layers of ``model``, all MoEConv2d, or a ValueError naming the first
    that is not."""
    layers = {}
    for name, module in model.named_modules():
        if not is_moe_module(module):
            continue
        if not isinstance(module, MoEConv2d):
            experts = getattr(module, 'experts', None)
            why = (f'its experts are whole subnets ({type(experts[0]).__name__}: convs with '
                   'norms and activations), non-linear, so no single conv computes their '
                   'mixture' if experts is not None else
                   'it is a μMoE layer (soft routing through factorised weights), which '
                   'has no merge path')
            raise ValueError(f'{name}: a {type(module).__name__} cannot be merged: {why}; '
                             'merge_experts.py folds MoEConv2d layers (single linear convs)')
        layers[name] = module
    if not layers:
        raise ValueError('the model has no MoE layer to merge')
    return layers


def mean_gates(layers: Dict[str, MoEConv2d], stats: dict) -> Dict[str, np.ndarray]:
    """ḡ of every layer: 1/N for an equal-weight gate, else the mean on the val set."""
    gates = {}
    for name, layer in layers.items():
        if isinstance(layer.gate, EqualWeightGate):
            gates[name] = np.full(layer.num_experts, 1 / layer.num_experts)
        elif name in stats['layers']:
            gates[name] = mean_gate_weights(stats['layers'][name]['importance'],
                                            stats['layers'][name]['rows'])
        else:
            raise ValueError(f'{name} was not called on the val set: no mean gate weights')
    return gates


def merge(args) -> dict:
    work_dir = args.work_dir or default_work_dir(args.config, 'merge_experts')
    check_replaceable(args.out_dir, [args.config, args.checkpoint, work_dir], 'merging.json')
    cfg = load_config(args.config, args.cfg_options)
    model = load_checked(cfg, args.checkpoint)
    layers = mergeable_layers(model)
    dense_cfg = stock_config(cfg)  # before the val run: a config it cannot express fails now
    before, stats = evaluate_on_val(cfg, args.checkpoint, osp.join(work_dir, 'moe'))
    gates = mean_gates(layers, stats)
    for name, layer in layers.items():
        parent, child = name.rpartition('.')[::2]
        setattr(model.get_submodule(parent), child, merged_conv(layer, torch.from_numpy(
            gates[name])))
    stem = osp.splitext(osp.basename(args.config))[0] + '_merged'
    _, meta = load_state_dict(args.checkpoint)
    summary = dict(config=args.config, checkpoint=args.checkpoint, metrics_before=before,
                   mean_gates={name: g.tolist() for name, g in gates.items()})
    with atomic_directory(args.out_dir) as tmp:
        config_path, checkpoint_path = write_model(
            tmp, stem, dense_cfg, model, dict(meta, merged_experts=summary['mean_gates']))
        summary['metrics_after'], _ = evaluate_on_val(
            load_config(config_path), checkpoint_path, osp.join(work_dir, 'merged'),
            gate_stats=False)
        with open(osp.join(tmp, 'merging.json'), 'w') as f:
            json.dump(summary, f, indent=1, default=float)
    summary['files'] = [osp.join(args.out_dir, stem + ext) for ext in ('.py', '.pth')]
    return summary


def print_summary(summary: dict) -> None:
    for name, gates in summary['mean_gates'].items():
        print(f'{name}: merged with mean gate weights '
              + ', '.join(f'{g:.4f}' for g in gates))
    print(f'AP of the MoE model:    {ap_line(summary["metrics_before"])}')
    print(f'AP of the merged model: {ap_line(summary["metrics_after"])}')
    print('wrote ' + ' and '.join(summary['files']) + ' (stock mmdet, no mmdet_moe needed)')


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return run_tool('merge_experts', lambda: merge(args), print_summary)


if __name__ == '__main__':
    sys.exit(main())
