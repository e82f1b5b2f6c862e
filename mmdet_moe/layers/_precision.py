"""Full precision for routing under automatic mixed precision (AMP).

Gate logits, their softmax / entmax and the balance losses are computed in float32
(or float64 when the inputs are), with autocast off, whatever the activations' dtype:
half-precision logits round routing decisions and the losses' small differences away.
The experts keep the activation dtype; the float32 gate weights are cast to it where
they scale expert outputs or kernels.
"""
from contextlib import nullcontext
from typing import ContextManager, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def full_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float32, or a wider floating dtype of ``tensors`` (float64): never half."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def autocast_off(device: torch.device) -> ContextManager:
    """Autocast disabled on ``device``'s type (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return nullcontext()


def full_precision_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` in :func:`full_dtype` with autocast off (the layer is called as
    it is when its weights already have that dtype, the usual float32 case)."""
    dtype = full_dtype(x, layer.weight)
    with autocast_off(x.device):
        x = x.to(dtype)
        if layer.weight.dtype == dtype:
            return layer(x)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return F.linear(x, layer.weight.to(dtype), bias)
