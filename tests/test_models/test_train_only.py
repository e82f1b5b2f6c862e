"""MoERetinaNet(train_only=...): a dense RetinaNet frozen as train_only_moe freezes a MoE one."""
import pytest

from helpers import build_model, toy_retinanet


def test_train_only_trains_exactly_the_named_modules():
    cfg = toy_retinanet()
    cfg.update(type='MoERetinaNet', train_only=['bbox_head.cls_convs', 'bbox_head.retina_cls'])
    model = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f'bbox_head.{n}' for n, _ in model.bbox_head.named_parameters()
                if n.startswith(('cls_convs.', 'retina_cls.'))}
    # each tower conv: its weight and GroupNorm's two; then the output conv's two
    assert trainable == expected and len(expected) == 3 * cfg.bbox_head.stacked_convs + 2


@pytest.mark.parametrize('options, message', [
    (dict(train_only=['bbox_head.cls_tower']), "the model has no module 'bbox_head.cls_tower'"),
    (dict(train_only='bbox_head.cls_convs'), 'paths must be a non-empty list'),
    (dict(train_only=[]), 'paths must be a non-empty list'),
    (dict(train_only=['bbox_head.loss_cls']), "'bbox_head.loss_cls' has no parameter"),
    (dict(train_only=['bbox_head.cls_convs'], train_only_moe=True), 'not both'),
])
def test_train_only_errors_name_the_value(options, message):
    cfg = toy_retinanet()
    cfg.update(type='MoERetinaNet', **options)
    with pytest.raises(ValueError, match=message):
        build_model(cfg)
