"""Export a MoE detector's tensor forward to ONNX, with per-image routing in the graph.

    python tools/export_onnx.py CONFIG CHECKPOINT --out model.onnx [--shape H W]
        [--batch 1] [--num-rois 100] [--opset 12] [--verify] [--cfg-options ...]

The graph is the detector's backbone, neck and head forward for a fixed input size and
batch (see mmdet_moe/models/export.py for its inputs and outputs): input ``images``,
preprocessed as mmdet's data preprocessor hands them to the model (normalised, padded);
outputs the head's per-level maps (``cls_score_<l>``, ``bbox_pred_<l>``, ...). Two-stage
detectors (Faster R-CNN) take the proposals as a second input ``rois`` (R, 5), whose
count R is dynamic, and output the RPN's maps and the RoI head's scores and deltas;
decoding and NMS stay outside the graph in both cases.

The gates run in the graph (TopK, Scatter), so every input is routed on its own. The
experts of every MoE layer run on every row, weighted by the gate: the graph costs N×
one expert per MoE layer where eager dispatch costs k× and a fused conv ≈ 1×. The
tool prints, per MoE layer, what the graph computes. μMoE layers are exported as
they run (soft, ≈ two convs with the rank as channels).

``--verify`` runs the written file with onnxruntime on a new random input and prints
the largest absolute difference to eager PyTorch. Exit code 2, with nothing written
at ``--out``, for bad input: a checkpoint that does not match the config (the keys
are named), a MoE layer or detector without an export path (named), a bad shape.
"""
import sys
import time
from typing import List, Optional

import torch

from mmdet_moe.atomic_output import atomic_file
from mmdet_moe.engine.evaluation import load_checked, load_config, model_parser, run_tool
from mmdet_moe.layers import export_onnx, export_plans, run_onnx
from mmdet_moe.layers.export import DEFAULT_OPSET
from mmdet_moe.models.export import TensorForward, example_inputs, input_shape

# mmcv's RoIAlign symbolic writes Squeeze with an `axes` attribute (opset <= 12) and
# RoiAlign-10 semantics; Einsum (μMoE) needs opset >= 12
TWO_STAGE_OPSET = 12


def parse_args(argv=None):
    parser = model_parser("Export a MoE detector's tensor forward to ONNX")
    parser.add_argument('--out', required=True, help='the .onnx file (written only '
                        'when the export succeeded)')
    parser.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help="input size (default: the test pipeline's Resize scale, "
                             "padded to the data preprocessor's size divisor)")
    parser.add_argument('--batch', type=int, default=1, help='images per call (fixed '
                        'in the graph)')
    parser.add_argument('--num-rois', type=int, default=100, help='two-stage detectors: '
                        'RoIs of the example input (the graph takes any number)')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, help='ONNX opset')
    parser.add_argument('--verify', action='store_true', help='run the file with '
                        'onnxruntime on a new random input and print the largest '
                        'absolute difference to eager PyTorch')
    args = parser.parse_args(argv)
    for name, value in (('--batch', args.batch), ('--num-rois', args.num_rois)):
        if value < 1:
            parser.error(f'{name} must be >= 1, got {value}')
    if args.opset < 12:
        parser.error(f'--opset must be >= 12 (ONNX Einsum), got {args.opset}')
    if args.shape is not None and min(args.shape) < 1:
        parser.error(f'--shape must be two sizes >= 1, got {args.shape}')
    return args


def export(args) -> dict:
    cfg = load_config(args.config, args.cfg_options)
    model = load_checked(cfg, args.checkpoint)
    forward = TensorForward(model).eval()
    plans = export_plans(model, forward.dynamic_rows)  # refuses what cannot export first
    if forward.two_stage and args.opset != TWO_STAGE_OPSET:
        raise ValueError(f'--opset {args.opset}: a two-stage detector exports with opset '
                         f"{TWO_STAGE_OPSET} (mmcv's RoIAlign symbolic)")
    height, width = input_shape(cfg, args.shape)
    example = example_inputs(forward, args.batch, height, width, args.num_rois, seed=0)
    names = forward.name_outputs(*example)
    dynamic = {'rois': {0: 'num_rois'}, 'roi_cls_score': {0: 'num_rois'},
               'roi_bbox_pred': {0: 'num_rois'}} if forward.two_stage else None
    summary = dict(out=args.out, plans=plans, inputs=forward.input_names, outputs=names,
                   shape=(args.batch, 3, height, width), opset=args.opset)
    with atomic_file(args.out) as tmp:
        start = time.perf_counter()
        export_onnx(forward, example, tmp, input_names=forward.input_names,
                    output_names=names, opset=args.opset, dynamic_axes=dynamic,
                    dynamic_rows=forward.dynamic_rows)
        summary['seconds'] = time.perf_counter() - start
        if args.verify:
            check = example_inputs(forward, args.batch, height, width,
                                   args.num_rois + 1, seed=1)
            with torch.no_grad():
                eager = forward(*check)
            got = run_onnx(tmp, dict(zip(forward.input_names, check, strict=True)))
            summary['max_abs_diff'] = max(
                (e - g).abs().max().item() for e, g in zip(eager, got, strict=True))
    return summary


def print_summary(summary: dict) -> None:
    print(f'exported in {summary["seconds"]:.1f} s: inputs {summary["inputs"]} (images '
          f'{"×".join(map(str, summary["shape"]))}), {len(summary["outputs"])} outputs '
          f'({", ".join(summary["outputs"][:3])}, ...), opset {summary["opset"]}')
    print('MoE layers in the graph (routing computed per input):' if summary['plans']
          else 'no MoE layer in the model')
    for plan in summary['plans']:
        print(f'  {plan.name} ({plan.layer}): {plan.cost}')
    if 'max_abs_diff' in summary:
        print(f'onnxruntime vs eager PyTorch on a new random input: max abs diff '
              f'{summary["max_abs_diff"]:.3g}')
    print(f'wrote {summary["out"]}')


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    return run_tool('export_onnx', lambda: export(args), print_summary)


if __name__ == '__main__':
    sys.exit(main())
