"""FLOPs of a forward pass, counted as mmengine's ``get_model_complexity_info`` counts.

mmengine (``mmengine.analysis``, fvcore's rules) counts one multiply-add as one
"flop", and only these operations:

- convolution: ``batch · |W| · H'·W'`` (``|W|`` = O · I/groups · kh · kw; the bias
  is not counted); linear, mm, bmm, einsum: the products (the bias is not counted);
- batch norm: ``numel`` (2 · numel with affine) in eval, 4 (5 with affine) · numel in
  training; group / layer norm: 4 (5 with affine) · numel;
- nearest upsampling: one per output element (bilinear: four); adaptive average
  pooling: one per input element; grid sampling: four per output element.

Everything else is free: ReLU, additions, ``mean`` (a gate's global average pool),
max pooling, softmax, top-k, indexing. mmengine reads these operations off a JIT
trace; :class:`FlopCounter` counts the same operations as the dispatcher runs them
(where ``linear`` and ``einsum`` have become ``addmm`` / ``mm`` / ``bmm``, same
products), so a functional call inside a module (the mixed-kernel ``F.conv2d`` of a
fused MoE conv, FPN's ``F.interpolate``) counts too, and data-dependent routing
counts what it ran. Two differences: mmengine reads an einsum's count off numpy's
printed ``einsum_path``, rounded to 4 significant digits (exact here); a gather that
sums rows (``embedding_bag``, a fused layer mixing k of N kernels) is free in both.
"""
from math import prod
from typing import Callable, Dict, Hashable, List, Optional

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _conv(args, out) -> int:
    x, w, transposed = args[0], args[1], args[6]
    spatial = (x if transposed else out).shape[2:]
    return x.shape[0] * w.numel() * prod(spatial)


def _addmm(args, out) -> int:  # bias, (n, m), (m, p)
    return args[1].shape[0] * args[1].shape[1] * args[2].shape[1]


def _mm(args, out) -> int:
    return args[0].shape[0] * args[0].shape[1] * args[1].shape[1]


def _bmm(args, out) -> int:  # (b, n, m), (b, m, p)
    return prod(args[0].shape) * args[1].shape[-1]


def _baddbmm(args, out) -> int:
    return _bmm(args[1:], out)


def _norm(weight_index: int) -> Callable:
    def count(args, out) -> int:
        affine = len(args) > weight_index and args[weight_index] is not None
        return args[0].numel() * (5 if affine else 4)
    return count


def _batch_norm(training: Callable) -> Callable:
    def count(args, out) -> int:
        if training(args):
            return _norm(1)(args, out)
        return args[0].numel() * (2 if args[1] is not None else 1)
    return count


def _per_output(scale: int) -> Callable:
    return lambda args, out: scale * (out[0] if isinstance(out, (tuple, list))
                                      else out).numel()


# the dispatcher's operations (overloads) and their counts, in mmengine's convention
OP_FLOPS: Dict[object, Callable] = {
    aten.convolution.default: _conv,
    aten.addmm.default: _addmm,
    aten.mm.default: _mm,
    aten.bmm.default: _bmm,
    aten.baddbmm.default: _baddbmm,
    aten._native_batch_norm_legit_no_training.default: _batch_norm(lambda a: False),
    aten._native_batch_norm_legit.default: _batch_norm(lambda a: a[5]),
    aten._native_batch_norm_legit.no_stats: _batch_norm(lambda a: a[3]),
    aten.native_batch_norm.default: _batch_norm(lambda a: a[5]),
    aten.cudnn_batch_norm.default: _batch_norm(lambda a: a[5]),  # what CUDA dispatches
    aten.miopen_batch_norm.default: _batch_norm(lambda a: a[5]),
    aten.native_group_norm.default: _norm(1),
    aten.native_layer_norm.default: _norm(2),
    aten.upsample_nearest2d.default: _per_output(1),
    aten.upsample_nearest2d.vec: _per_output(1),
    aten.upsample_bilinear2d.default: _per_output(4),
    aten.upsample_bilinear2d.vec: _per_output(4),
    aten._adaptive_avg_pool2d.default: lambda args, out: args[0].numel(),
    aten.grid_sampler_2d.default: _per_output(4),
}


class FlopCounter(TorchDispatchMode):
    """Count FLOPs (mmengine's convention, see the module docstring) while active, in
    total and per group of modules.

    Args:
        groups: ``{module: key}``; an operation run while modules of ``groups`` are
            being called is charged to the key of the innermost of them, any other to
            ``None``. Modules called through ``__call__`` only (as mmengine's
            per-module counts).

    Example:
        >>> conv = nn.Conv2d(3, 8, 3, padding=1)
        >>> with FlopCounter({conv: 'conv'}) as counter:
        ...     _ = conv(torch.randn(2, 3, 10, 10))
        >>> counter.total, counter.by_group['conv']  # 2 · 8·3·3·3 · 10·10
        (43200, 43200)
    """

    def __init__(self, groups: Optional[Dict[nn.Module, Hashable]] = None):
        super().__init__()
        self.groups = dict(groups or {})
        self.total = 0
        self.by_group: Dict[Hashable, int] = {}
        self._stack: List[Hashable] = []
        self._handles = []

    def __enter__(self):
        for module, key in self.groups.items():
            self._handles += [
                module.register_forward_pre_hook(lambda *_, key=key: self._enter(key)),
                module.register_forward_hook(lambda *_: self._leave(), always_call=True)]
        return super().__enter__()

    # hooks return None: a forward hook's return value would replace the output
    def _enter(self, key: Hashable) -> None:
        self._stack.append(key)

    def _leave(self) -> None:
        self._stack.pop()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        count = OP_FLOPS.get(func)
        if count is not None:
            flops = int(count(args, out))
            self.total += flops
            key = self._stack[-1] if self._stack else None
            self.by_group[key] = self.by_group.get(key, 0) + flops
        return out


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs (mmengine's convention) of calling ``fn()`` under ``torch.no_grad``.

    Example:
        >>> count_flops(lambda: nn.Linear(16, 4)(torch.randn(5, 16)))  # 5 · 16 · 4
        320
    """
    with torch.no_grad(), FlopCounter() as counter:
        fn()
    return counter.total
