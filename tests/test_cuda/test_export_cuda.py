"""Graph export of every toy MoE detector with the model and its example on CUDA
(``tools/export_onnx.py``'s path: ``TensorForward`` → ``export_onnx``): onnxruntime
(CPU) on new inputs against eager PyTorch on CUDA, and eager CUDA against eager CPU."""
import copy
import os.path as osp

import pytest
import torch

from helpers import TOY_MOE_CONFIGS, build_model, load_config, redraw_parameters
from mmdet_moe.layers import export_onnx, run_onnx
from mmdet_moe.models.export import TensorForward, example_inputs

pytest.importorskip('onnxruntime')
pytestmark = pytest.mark.cuda

CUDA = torch.device('cuda')
SIZE = 128  # RoIs of 8 to 64 pixels: at least a feature pixel at their FPN level


@pytest.mark.parametrize('path', TOY_MOE_CONFIGS, ids=osp.basename)
def test_export_on_cuda_matches_eager(path, tmp_path):
    torch.manual_seed(0)
    cpu_model = build_model(load_config(path).model).eval()
    redraw_parameters(cpu_model)
    with torch.no_grad():  # box scales 1 (not 3): FCOS's exp(scale · x) stays near 1
        for p in cpu_model.parameters():
            if p.dim() == 0:
                p.fill_(1.0)
    model = copy.deepcopy(cpu_model).to(CUDA)
    forward = TensorForward(model).eval()
    on_cuda = [t.to(CUDA) for t in example_inputs(forward, 2, SIZE, SIZE, 7, seed=0)]
    names = forward.name_outputs(*on_cuda)
    onnx_file = str(tmp_path / 'model.onnx')
    export_onnx(forward, tuple(on_cuda), onnx_file, input_names=forward.input_names,
                output_names=names,
                dynamic_axes={'rois': {0: 'n'}} if forward.two_stage else None,
                dynamic_rows=forward.dynamic_rows)
    new = example_inputs(forward, 2, SIZE, SIZE, 5, seed=1)  # other images and RoIs
    with torch.no_grad():
        eager = [t.cpu() for t in forward(*[t.to(CUDA) for t in new])]
        eager_cpu = TensorForward(cpu_model).eval()(*new)
    graph = run_onnx(onnx_file, dict(zip(forward.input_names, new, strict=True)))
    for name, e, g, c in zip(names, eager, graph, eager_cpu, strict=True):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-4, msg=f'onnxruntime: {name}')
        torch.testing.assert_close(e, c, rtol=0, atol=1e-4, msg=f'eager CPU: {name}')
