"""Routing supervised by relative scale (the positive control): the loss against a
positive-by-positive computation, in a MoERetinaHead against the assignment it reads,
and a gate trained on it routes by relative scale."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmdet_moe.models.dense_heads.scale_routing import (check_routing_supervision,
                                                        default_edges, scale_routing_loss)

from helpers import build_model, one_training_step, toy_retinanet

PIXEL = dict(type='TopKGate', noisy=False, gate_mode='pixel')


def box_of_scale(scale, reference):
    side = reference * 2 ** scale
    return [0.0, 0.0, side, side]


def test_loss_equals_the_positive_by_positive_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    shapes, anchors, references, edges = [(2, 3, 2), (2, 1, 2)], 3, [8.0, 16.0], [0.0, 0.5]
    logits = torch.randn(sum(b * h * w for b, h, w in shapes), 3, generator=gen)
    positives = [torch.rand(b, h * w * anchors, generator=gen) < 0.4 for b, h, w in shapes]
    scales = [torch.empty(b, h * w * anchors).uniform_(-1, 1.5, generator=gen)
              for b, h, w in shapes]
    boxes = [torch.tensor([[box_of_scale(s, ref) for s in row] for row in level.tolist()])
             for level, ref in zip(scales, references)]
    terms, offset = [], 0
    for (b_, h, w), pos, scale in zip(shapes, positives, scales):
        for b in range(b_):
            for a in range(h * w * anchors):
                if pos[b, a]:
                    expert = sum(float(scale[b, a]) >= e for e in edges)
                    row = offset + b * h * w + a // anchors
                    terms.append(-F.log_softmax(logits[row], 0)[expert])
        offset += b_ * h * w
    expected = torch.stack(terms).mean()
    got = scale_routing_loss(logits, shapes, positives, boxes, references, edges)
    torch.testing.assert_close(got, expected)


def test_no_positives_gives_zero_with_a_gradient():
    logits = torch.randn(4, 2, requires_grad=True)
    loss = scale_routing_loss(logits, [(1, 2, 2)], [torch.zeros(1, 4, dtype=torch.bool)],
                              [torch.zeros(1, 4, 4)], [8.0], [0.5])
    loss.backward()
    assert loss.item() == 0 and logits.grad is not None


def supervised_retinanet(**extra):
    return build_model(toy_retinanet(
        moe_branches='cls', expert_type='conv', moe_convs=(0,), num_experts=4, top_k=2,
        gate_cfg=PIXEL, balance_cfg=None, routing_supervision=dict(weight=1.0, **extra)))


def test_head_loss_reads_the_assignment_and_the_gate_logits():
    """The loss of a training step equals the loss recomputed from the head's own
    assigned positives, boxes and the gate's logits recorded in that step."""
    torch.manual_seed(0)
    model = supervised_retinanet()
    head = model.bbox_head
    seen = {}
    original = type(head)._scale_routing_loss

    def spy(self, cls_scores):
        seen['targets'] = self._scale_targets
        seen['logits'] = [m.gate_outputs().logits.detach() for m in
                          [head.cls_convs[0].conv]]
        seen['shapes'] = [(s.shape[0], *s.shape[-2:]) for s in cls_scores]
        return original(self, cls_scores)

    head._scale_routing_loss = spy.__get__(head)
    losses, _ = one_training_step(model)
    positives, boxes = seen['targets']
    assert sum(int(p.sum()) for p in positives) > 0
    strides = [8, 16, 32, 64, 128]
    references = [head.prior_generator.octave_base_scale * s for s in strides]
    expected = scale_routing_loss(seen['logits'][0], seen['shapes'], positives, boxes,
                                  references, default_edges(4))
    torch.testing.assert_close(losses['loss_moe_scale_routing'].detach(), expected)
    assert head.cls_convs[0].conv.gate.w_gate.weight.grad.abs().sum() > 0


def test_a_gate_trained_on_it_routes_by_relative_scale():
    """The positive control at layer level: a per-location gate trained with only this
    loss on features that carry the scale picks each location's scale expert."""
    torch.manual_seed(0)
    from mmdet_moe.layers import TopKGate
    gate = TopKGate(4, 3, 1, noisy=False, gate_mode='pixel', renormalize=False)
    optim = torch.optim.Adam(gate.parameters(), lr=0.1)
    scale = torch.empty(2, 1, 4, 4).uniform_(-0.5, 1.5)
    features = torch.cat([scale, torch.randn(2, 3, 4, 4)], 1)  # channel 0: the scale
    boxes = [torch.tensor([[box_of_scale(float(s), 8.0)] * 1 for s in image.flatten()])
             .view(1, 16, 4) for image in scale]
    boxes = torch.cat(boxes)
    positives = torch.ones(2, 16, dtype=torch.bool)
    edges = [0.25, 0.75]
    for _ in range(300):
        optim.zero_grad()
        loss = scale_routing_loss(gate(features).logits, [(2, 4, 4)], [positives], [boxes],
                                  [8.0], edges)
        loss.backward()
        optim.step()
    routed = gate(features).indices[:, 0]
    expected = torch.bucketize(scale.flatten(), torch.tensor(edges), right=True)
    assert (routed == expected).float().mean() > 0.9


@pytest.mark.parametrize('cfg,gate_mode,match', [
    (dict(weight=1.0), 'image', "gate_mode='pixel'"),
    (dict(weight=0), 'pixel', 'weight=0'),
    (dict(edges=[0.5, 0.1, 0.9]), 'pixel', 'increasing'),
    (dict(edges=[0.5]), 'pixel', '3 increasing'),
    (dict(bins=4), 'pixel', 'unknown keys'),
])
def test_bad_routing_supervision_is_refused(cfg, gate_mode, match):
    with pytest.raises(ValueError, match=match):
        check_routing_supervision(cfg, 4, gate_mode == 'pixel')
    with pytest.raises(ValueError, match=match):
        build_model(toy_retinanet(expert_type='conv', moe_convs=(0,), num_experts=4,
                                  top_k=2, gate_cfg=dict(PIXEL, gate_mode=gate_mode),
                                  routing_supervision=cfg))


def test_default_edges_split_the_anchor_octave():
    assert default_edges(4) == [0.25, 0.5, 0.75]
    assert math.isclose(default_edges(2)[0], 0.5)
