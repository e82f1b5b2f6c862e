"""Peak memory: the CUDA allocator's of one module, or the peak RSS of a fresh
process that ``tools/benchmark.py`` runs for one variant (``--memory-of``)."""
import os.path as osp
import resource
import subprocess
import sys
from typing import Callable, List

import torch
import torch.nn as nn

from .timing import fwd_bwd

# the CLI the child processes run: tools/benchmark.py, beside this package
BENCHMARK_SCRIPT = osp.join(osp.dirname(osp.dirname(osp.abspath(__file__))), 'benchmark.py')


def cuda_peak_mib(module: nn.Module, make_input: Callable[[], torch.Tensor],
                  device: torch.device) -> float:
    """CUDA allocator peak of one forward + backward of ``module`` alone on the device
    (its parameters, gradients, activations and input); it goes back to the CPU after."""
    module.to(device)
    x = make_input().to(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fwd_bwd(module, x)
    peak = torch.cuda.max_memory_allocated(device) / 2**20
    module.cpu()
    return peak


def own_peak_rss_mib() -> float:
    """This process's peak resident memory. ``ru_maxrss`` is not used: on Linux it
    keeps the parent's high-water mark across fork + exec."""
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_peak_rss_mib(argv: List[str]) -> float:
    """Run ``tools/benchmark.py`` with ``argv`` in a fresh process; the peak RSS it
    prints last."""
    out = subprocess.run([sys.executable, BENCHMARK_SCRIPT, *argv], capture_output=True,
                         text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f'{" ".join(argv)} failed:\n{out.stderr[-2000:]}')
    return float(out.stdout.strip().splitlines()[-1])
