"""Hard-constraint state under DDP: importance is reduced over ranks (gloo, 2 processes)."""
import os

import pytest
import torch

from helpers import run_on_two_gloo_ranks
from mmdet_moe.layers import RelativeImportanceGate

pytestmark = pytest.mark.slow


def make_gate():
    torch.manual_seed(0)
    return RelativeImportanceGate(4, num_experts=4, top_k=1, threshold=0.3).train()


def batches():
    torch.manual_seed(1)
    return [torch.randn(6, 4, 3, 3) * 3 for _ in range(3)]


def worker(rank, out_dir):
    gate = make_gate()
    for x in batches():
        gate(x[rank * 3:(rank + 1) * 3])  # each rank sees half of every batch
    torch.save(gate.usage, os.path.join(out_dir, f'usage{rank}.pt'))


def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    run_on_two_gloo_ranks(worker, str(tmp_path))
    single = make_gate()
    for x in batches():
        single(x)
    usage0 = torch.load(tmp_path / 'usage0.pt')
    usage1 = torch.load(tmp_path / 'usage1.pt')
    assert torch.equal(usage0, usage1)
    torch.testing.assert_close(usage0, single.usage)
    assert single.usage.abs().sum() > 0
