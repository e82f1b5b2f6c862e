import torch
import torch.nn as nn

from mmdet_moe.layers import CPMuMoEConv2d, MoE, MoEConv2d, record_gates
from mmdet_moe.layers import recording


def test_records_name_call_level_and_weights():
    model = nn.ModuleDict(dict(
        conv=MoEConv2d(4, 4, 3, padding=1, num_experts=3, top_k=1),
        head=MoE(expert_factory=lambda: nn.Conv2d(4, 4, 1), num_experts=3, in_channels=4),
        mu=CPMuMoEConv2d(4, 4, 3, padding=1, num_experts=5, rank=3))).eval()
    x = torch.randn(2, 4, 6, 6)
    model['conv'](x)  # outside any recorder: nothing kept anywhere
    assert not recording._active_recorders()
    with record_gates(model) as rec:
        model['conv'](x)
        model['conv'](x)
        model['head']([x, x[..., :3, :3]])
        model['mu'](x)
    names = [(r.name, r.call, r.level) for r in rec.records]
    assert names == [('conv', 0, None), ('conv', 1, None), ('head', 0, 0), ('head', 1, 1),
                     ('mu', 0, None)]
    torch.testing.assert_close(rec.records[0].weights, model['conv'].gate(x).weights)
    assert rec.records[-1].weights.shape == (2, 5)
    assert set(rec.by_layer()) == {'conv', 'head', 'mu'}
    rec.clear()
    assert rec.records == []
    assert not recording._active_recorders()


def test_override_routing_forces_one_expert_or_another_k():
    from mmdet_moe.layers import override_routing
    import pytest
    model = nn.ModuleDict(dict(
        conv=MoEConv2d(4, 4, 3, padding=1, num_experts=3, top_k=1),
        mu=CPMuMoEConv2d(4, 4, 3, padding=1, num_experts=5, rank=3))).eval()
    x = torch.randn(2, 4, 6, 6)
    before = model['conv'](x)
    with override_routing(model, expert=2):
        out = model['conv'].gate(x)
        assert out.weights.tolist() == [[0, 0, 1], [0, 0, 1]]
        torch.testing.assert_close(model['conv'](x), model['conv'].mix(x, out.weights))
        assert (model['mu'].gate_weights(x)[:, 2] == 1).all()
    torch.testing.assert_close(model['conv'](x), before)  # restored
    with override_routing(model['conv'], top_k=3):
        assert (model['conv'].gate(x).weights > 0).all()
    assert model['conv'].gate.top_k == 1
    with pytest.raises(ValueError, match='expert 4 is out of range'):
        with override_routing(model, expert=4):
            pass
    with pytest.raises(ValueError, match='μMoE'):
        with override_routing(model, top_k=2):
            pass


def test_a_recorder_sees_only_its_own_threads_gates():
    """Two threads recording at once (e.g. two statistics runs, or two detectors
    decoding) each get the records of their own forwards only."""
    import threading
    layers = [MoEConv2d(4, 4, 1, num_experts=3, top_k=1).eval() for _ in range(2)]
    for i, layer in enumerate(layers):
        layer.moe_name = f'layer{i}'
    barrier, names = threading.Barrier(2), {}

    def run(i):
        with record_gates() as rec:
            barrier.wait()  # both recorders active before either layer runs
            layers[i](torch.randn(2, 4, 3, 3))
            barrier.wait()  # both layers ran before either recorder closes
            names[i] = [r.name for r in rec.records]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert names == {0: ['layer0'], 1: ['layer1']}
