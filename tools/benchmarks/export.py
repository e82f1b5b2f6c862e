"""``benchmark.py export``: a config's tensor forward in eager PyTorch and as the ONNX
graph of ``tools/export_onnx.py`` in onnxruntime (the 'export' extra), round-robin,
and, when its MoE layers are all single convs, the same for the stock dense detector
that ``tools/merge_experts.py`` would write, or for ``--dense-config`` (random
weights unless ``--checkpoint``)."""
import argparse
import os.path as osp
import statistics
import time

import torch

from mmdet_moe.analysis.report import markdown_table
from .cli import config_command

def bench_export(args: argparse.Namespace) -> None:
    """Eager PyTorch against onnxruntime on one config's tensor forward (and on its
    merged dense detector where one exists), round-robin, median ms per call."""
    import tempfile
    import onnxruntime
    from mmdet_moe.engine.evaluation import build_model, load_checked, load_config
    from mmdet_moe.layers import export_onnx
    from mmdet_moe.models.export import TensorForward, example_inputs, input_shape
    from mmdet_moe.models.stock_config import stock_config
    cfg = load_config(args.config, args.cfg_options)
    models = {'MoE': load_checked(cfg, args.checkpoint) if args.checkpoint
              else build_model(cfg)}
    if args.dense_config:
        models['dense (--dense-config)'] = build_model(load_config(args.dense_config))
    else:
        try:
            models['dense (merged)'] = build_model(stock_config(cfg))
        except ValueError as err:
            print(f'no merged dense counterpart ({err}); give --dense-config')
    height, width = input_shape(cfg, args.shape)
    calls, folder = {}, tempfile.mkdtemp(prefix='benchmark_export-')
    for name, model in models.items():
        forward = TensorForward(model).eval()
        inputs = example_inputs(forward, args.batch, height, width, args.num_rois, seed=0)
        names = forward.name_outputs(*inputs)
        path = osp.join(folder, f'{len(calls)}.onnx')
        export_onnx(forward, inputs, path, input_names=forward.input_names,
                    output_names=names, dynamic_rows=forward.dynamic_rows)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = onnxruntime.InferenceSession(path, options,
                                               providers=['CPUExecutionProvider'])
        feed = {n: t.numpy() for n, t in zip(forward.input_names, inputs, strict=True)}
        calls[f'{name}, eager PyTorch'] = lambda f=forward, x=inputs: f(*x)
        calls[f'{name}, onnxruntime'] = lambda s=session, d=feed: s.run(None, d)
    times = {name: [] for name in calls}
    with torch.no_grad():
        for step in range(args.warmup + args.repeats):
            for name, call in calls.items():  # round-robin: every variant, every step
                start = time.perf_counter()
                call()
                if step >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    reference = statistics.median(times['MoE, eager PyTorch'])
    print(f'{args.config}: tensor forward of {args.batch}×3×{height}×{width} images, '
          f'{torch.get_num_threads()} threads, median of {args.repeats} (CPU)')
    print(markdown_table(['variant', 'ms / call', '× MoE eager'],
                         [[name, statistics.median(t) * 1e3,
                           statistics.median(t) / reference] for name, t in times.items()],
                         digits=2))


def add_commands(sub) -> None:
    export = config_command(sub, 'export', "a config's tensor forward: eager PyTorch "
                            'against its ONNX graph in onnxruntime')
    export.add_argument('--checkpoint', help='weights (default: random)')
    export.add_argument('--dense-config', help='the dense detector to compare with '
                        '(default: the merged one, where the MoE layers are single convs)')
    export.add_argument('--shape', type=int, nargs=2, metavar=('H', 'W'),
                        help="input size (default: the test pipeline's)")
    export.add_argument('--batch', type=int, default=1)
    export.add_argument('--num-rois', type=int, default=100,
                        help='RoIs of a two-stage detector')
    export.add_argument('--repeats', type=int, default=20)
    export.add_argument('--warmup', type=int, default=3)
    export.set_defaults(func=bench_export)
