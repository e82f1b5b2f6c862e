"""Hard-constraint state under DDP: importance is reduced over ranks (gloo, 2 processes)."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmdet_moe.layers import RelativeImportanceGate


def make_gate():
    torch.manual_seed(0)
    return RelativeImportanceGate(4, num_experts=4, top_k=1, threshold=0.3).train()


def batches():
    torch.manual_seed(1)
    return [torch.randn(6, 4, 3, 3) * 3 for _ in range(3)]


def worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    gate = make_gate()
    for x in batches():
        gate(x[rank * 3:(rank + 1) * 3])  # each rank sees half of every batch
    torch.save(gate.usage, os.path.join(out_dir, f'usage{rank}.pt'))
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(tmp_path)), nprocs=2)
    single = make_gate()
    for x in batches():
        single(x)
    usage0 = torch.load(tmp_path / 'usage0.pt')
    usage1 = torch.load(tmp_path / 'usage1.pt')
    assert torch.equal(usage0, usage1)
    torch.testing.assert_close(usage0, single.usage)
    assert single.usage.abs().sum() > 0
