"""Forward + backward timing of modules, round-robin, on a CPU or a CUDA GPU."""
import statistics
import time
from typing import Callable, Dict, Hashable

import torch
import torch.nn as nn


class Stopwatch:
    """Seconds of the work queued between ``start()`` and ``stop()``: CUDA events
    (the GPU's own clock, read after a synchronisation), else ``perf_counter``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'

    def start(self) -> None:
        if self.cuda:
            self._start, self._end = (torch.cuda.Event(enable_timing=True),
                                      torch.cuda.Event(enable_timing=True))
            self._start.record()
        else:
            self._begin = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self._end.record()
            torch.cuda.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        return time.perf_counter() - self._begin


def fwd_bwd(module: nn.Module, x: torch.Tensor) -> None:
    module(x).sum().backward()
    module.zero_grad(set_to_none=True)


def time_fwd_bwd(modules: Dict[Hashable, nn.Module], make_input: Callable[[], torch.Tensor],
                 repeats: int, warmup: int = 2, device: torch.device = torch.device('cpu')
                 ) -> Dict[Hashable, float]:
    """Median seconds of forward + backward (sum of outputs) of each module over
    ``repeats`` rounds; the modules run round-robin within a round, so that every
    one sees the same machine state (timings of a shared machine drift)."""
    watch, times = Stopwatch(device), {name: [] for name in modules}
    for module in modules.values():
        module.to(device)
    for i in range(warmup + repeats):
        for name, module in modules.items():
            x = make_input().to(device)
            watch.start()
            fwd_bwd(module, x)
            if i >= warmup:
                times[name].append(watch.stop())
            else:
                watch.stop()
    return {name: statistics.median(t) for name, t in times.items()}
