"""Run a conv detector in channels-last memory format (NHWC strides)."""
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS
from torch import nn

from .gate_recording import unwrap

FORMATS = {'channels_last': torch.channels_last, 'contiguous': torch.contiguous_format}
# mmcv's compiled ops (RoIAlign, deformable convs, ...) index raw NCHW memory: a
# channels-last feature map would be read as another tensor, without any error
_NCHW_ONLY_PACKAGE = 'mmcv.ops'


def nchw_only_modules(model: nn.Module) -> list:
    """Names of the submodules of ``model`` that are mmcv compiled ops."""
    return [name for name, module in model.named_modules()
            if type(module).__module__.startswith(_NCHW_ONLY_PACKAGE)]


@HOOKS.register_module()
class MemoryFormatHook(Hook):
    """Put the model's 4-D weights in ``memory_format`` before a run (train, val, test).

    With ``'channels_last'``, a convolution's channels-last weights make its output
    channels-last, so every feature map from the first conv on is NHWC: oneDNN (CPU)
    and cuDNN (with AMP) run convolutions, norms and pooling in that layout without
    reordering memory on each call. The arithmetic is the same up to floating-point
    rounding; on the toy RetinaNet an iteration on 2 CPU cores takes about a sixth
    less time (docs/demo.md). ``'contiguous'`` keeps (or restores) NCHW. The
    conversion keeps every parameter object, so an optimizer built before it stays
    valid; checkpoints do not record the layout.

    Args:
        memory_format (str): ``'channels_last'`` or ``'contiguous'``. Channels-last is
            refused, with the modules named, for a model holding mmcv compiled ops:
            their kernels read NCHW memory.

    Example:
        >>> default_hooks = dict(memory_format=dict(type='MemoryFormatHook',
        ...                                         memory_format='channels_last'))
    """

    priority = 'VERY_HIGH'

    def __init__(self, memory_format: str = 'channels_last') -> None:
        if memory_format not in FORMATS:
            raise ValueError(f'MemoryFormatHook: memory_format={memory_format!r}; expected '
                             f'one of {sorted(FORMATS)}')
        self.memory_format = memory_format

    def before_run(self, runner) -> None:
        model = unwrap(runner.model)
        offending = nchw_only_modules(model) if self.memory_format == 'channels_last' else []
        if offending:
            raise ValueError(
                'MemoryFormatHook: mmcv compiled ops read NCHW memory and would read a '
                f'channels-last feature map wrongly; this model has {offending[:5]}'
                + (f' and {len(offending) - 5} more' if len(offending) > 5 else '')
                + ". Use memory_format='contiguous' for it.")
        # 4-D tensors only: Module.to would also try 5-D ones (a fused MoEConv2d's
        # stacked expert weights), which have no channels-last layout of their own
        memory_format = FORMATS[self.memory_format]
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=memory_format)
