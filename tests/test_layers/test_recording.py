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
    assert not recording._ACTIVE_RECORDERS
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
    assert not recording._ACTIVE_RECORDERS
