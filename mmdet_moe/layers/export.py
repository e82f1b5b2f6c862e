r"""Graph export (ONNX, ``torch.jit.trace``) of MoE layers, with routing left dynamic.

A traced graph has no host. Dispatch reads the rows per expert on the host to size
each expert's batch, so a traced dispatch would freeze the example input's routing
into the graph. Within :func:`export_mode` every MoE layer computes what it computes
in eval with an implementation whose routing stays in the graph (gate → TopK →
Scatter → weights, recomputed for every input):

- ``fused`` (:class:`MoEConv2d`, a :class:`MoE` of plain conv experts, whatever their
  ``impl``): per image, the kernel ``Σ_n g_n W_n`` mixed from the gate weights (0 for
  unrouted experts), then one conv with it: ≈ one dense conv per image, whatever N
  and k (the mixing reads all N kernels: N·|W| multiply-adds, small beside a conv
  over the map). Eager runs one grouped conv over the batch; a graph runs one conv
  per image (:func:`mixed_conv2d` while tracing), since after a resize (FPN's top-down
  path) torch's exporter no longer knows the batch in the grouped conv's kernel shape,
  which ONNX's Conv needs.
- ``dense`` (whole-subnet :class:`MoE`, non-linear experts): every expert on every
  row, weighted by the gate: N× one expert, where eager dispatch runs k×.
- per-location gates (``gate_mode='pixel'``): ``dense``, every expert on the whole map
  mixed per location (N× one expert, eager dispatch k× for conv experts).
- ``soft`` (μMoE layers): unchanged, no host read: ≈ two convs with R channels.

The batch size is frozen into the graph (gates split their rows per FPN level by it).
"""
import os.path as osp
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .gates import routes_pixels
from .moe import MoE
from .moe_conv import MoEConv2d
from .multilinear import _MuMoEConvBase
from .recording import assign_moe_names, is_moe_module

# Einsum (μMoE layers) needs opset >= 12; mmcv's RoIAlign symbolic writes
# opset-12 Squeeze and RoiAlign-10 semantics (see mmdet_moe.models.export)
DEFAULT_OPSET = 12
_PACKAGE = osp.dirname(osp.dirname(osp.abspath(__file__)))  # mmdet_moe/


class ExportError(ValueError):
    """A model holds a MoE layer that has no graph export path (named in the message)."""


@dataclass
class LayerExport:
    """What one MoE layer computes in an exported graph.

    Attributes:
        name: the layer's path in the model.
        layer: its class name.
        impl: ``'fused'``, ``'dense'`` or ``'soft'`` (see the module docstring).
        cost: the graph's compute for this layer, in words, against eager.
    """
    name: str
    layer: str
    impl: str
    cost: str


def _plan(module: nn.Module, dynamic_rows: bool) -> LayerExport:
    name, layer = module.moe_name, type(module).__name__
    if isinstance(module, (MoE, MoEConv2d)) and routes_pixels(module):
        return LayerExport(name, layer, 'dense', f'per location: all {module.num_experts} '
                           'experts on the whole map, mixed by the per-location gate: '
                           f'{module.num_experts}× one expert (eager: k× for conv experts '
                           'with impl dispatch)')
    if isinstance(module, (MoE, MoEConv2d)):
        n, k, impl = module.num_experts, module.top_k, module.impl
        eager = {'dispatch': f'{k}×', 'dense': f'{n}×'}.get(impl, '≈ 1×: fused kernel')
        fusable = isinstance(module, MoEConv2d) or module.fusable()
        if fusable and not dynamic_rows:
            return LayerExport(name, layer, 'fused', f'per image one conv with the kernel '
                               f'mixed from all {n} by the gate: ≈ 1× one conv (eager '
                               f'{impl}: {eager})')
        what = 'conv; its rows vary in number' if fusable else 'expert'
        return LayerExport(name, layer, 'dense', f'all {n} experts on every row, weighted '
                           f'by the gate: {n}× one {what} (eager {impl}: {eager})')
    if isinstance(module, _MuMoEConvBase):
        return LayerExport(name, layer, 'soft', f'soft mixture of {module.num_experts} '
                           'experts as two factor convs (≈ 2 convs with the rank as '
                           'channels); as eager')
    raise ExportError(f'{name} ({layer}) has no graph export path: export supports '
                      'MoEConv2d, MoE (and its subclasses), CPMuMoEConv2d and TRMuMoEConv2d')


def export_plans(model: nn.Module,
                 dynamic_rows: Sequence[nn.Module] = ()) -> List[LayerExport]:
    """What each MoE layer of ``model`` computes in an exported graph, in
    ``named_modules`` order. MoE layers inside ``dynamic_rows`` gate rows whose number
    the graph leaves open (e.g. the RoIs of a RoI head): they run ``dense`` (the fused
    form runs one conv per row, a number a graph fixes).

    Raises:
        ExportError: naming the first MoE layer without an export path.
    """
    return [plan for _, plan in _layers(model, dynamic_rows)]


def _layers(model: nn.Module,
            dynamic_rows: Sequence[nn.Module]) -> List[Tuple[nn.Module, LayerExport]]:
    assign_moe_names(model)
    open_rows = {id(m) for owner in dynamic_rows for m in owner.modules()}
    return [(module, _plan(module, id(module) in open_rows)) for module in model.modules()
            if is_moe_module(module)]


@contextmanager
def export_mode(model: nn.Module,
                dynamic_rows: Sequence[nn.Module] = ()) -> Iterator[List[LayerExport]]:
    """Within the block, every MoE layer of ``model`` runs its graph implementation
    (:func:`export_plans`, yielded); the layers' ``impl`` is restored on exit, also
    when the block raises. Meant for eval mode: training-only behaviour (noise,
    hard-constraint masks, capacity) stays out of the graph anyway.

    Raises:
        ExportError: before changing anything, naming a MoE layer without an
            export path.
    """
    layers = _layers(model, dynamic_rows)
    switched = [(module, plan.impl) for module, plan in layers if plan.impl != 'soft']
    saved = [(module, module.impl) for module, _ in switched]
    try:
        for module, impl in switched:
            module.impl = impl
        yield [plan for _, plan in layers]
    finally:
        for module, impl in saved:
            module.impl = impl


def export_onnx(module: nn.Module, args: Tuple[Tensor, ...], path: str, *,
                input_names: Sequence[str], output_names: Sequence[str],
                opset: int = DEFAULT_OPSET,
                dynamic_axes: Optional[Dict[str, Dict[int, str]]] = None,
                dynamic_rows: Sequence[nn.Module] = ()) -> None:
    """Trace ``module(*args)`` (eval mode, MoE layers in :func:`export_mode`) into the
    ONNX file ``path``.

    The TorchScript exporter (``dynamo=False``) traces the Python forward as it runs,
    the path mmdeploy takes for mmdet models (mmcv's ops carry ONNX symbolics for it);
    torch.export (``dynamo=True``) must first capture mmdet's data-dependent Python
    (image metas, per-level loops with shape checks) as a graph.

    Raises:
        ExportError: naming a MoE layer without an export path.
        ValueError: for a module in training mode.
        RuntimeError: if tracing met data-dependent Python in mmdet_moe's code (a
            ``TracerWarning`` from this package: the routing of ``args`` could be
            frozen into the graph).
    """
    if module.training:
        raise ValueError(f'export {type(module).__name__} in eval mode (call .eval()): '
                         'a graph holds no training-only routing (noise, masks, capacity)')
    with export_mode(module, dynamic_rows), torch.no_grad(), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', torch.jit.TracerWarning)
        torch.onnx.export(module, args, path, dynamo=False, opset_version=opset,
                          input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes=dynamic_axes)
    ours, shown = [], {}
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning) and \
                osp.abspath(w.filename).startswith(_PACKAGE):
            ours.append(f'{osp.relpath(w.filename, osp.dirname(_PACKAGE))}:{w.lineno}: '
                        f'{w.message}')
        else:  # everyone else's warnings, as they would have been shown
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno,
                                   registry=shown)
    if ours:
        raise RuntimeError('tracing met data-dependent Python in mmdet_moe (the graph '
                           'could freeze the example routing): ' + '; '.join(ours))


def run_onnx(path: str, inputs: Dict[str, Tensor]) -> List[Tensor]:
    """The outputs of the ONNX file ``path`` on ``inputs`` ({input name: tensor}) with
    onnxruntime on the CPU (the 'export' extra), in output order."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    outputs = session.run(None, {name: t.detach().cpu().numpy() for name, t in inputs.items()})
    return [torch.from_numpy(out) for out in outputs]
