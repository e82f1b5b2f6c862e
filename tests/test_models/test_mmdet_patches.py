"""Importing mmdet_moe changes only the documented functions of mmdet, models
without MoE layers run mmdet's code unchanged, and concurrent decodes do not see
each other's recording."""
import os.path as osp
import subprocess
import sys
import threading

import pytest
import torch
from mmengine.config import ConfigDict

from helpers import build_model, redraw_parameters, stock_model_cfg
from mmdet_moe.models.mmdet_patches import MARK, PATCHES

HERE = osp.dirname(osp.abspath(__file__))
RETINANET = 'retinanet/retinanet_r50_fpn_1x_coco.py'
MOE = dict(num_experts=3, top_k=2, gate_cfg=dict(type='TopKGate', noisy=False))

# Lists the identity of every global of every loaded module of mmdet, mmcv and
# mmengine and of every attribute of their classes, imports mmdet_moe, and prints the
# names whose object changed, was added or was removed.
SNAPSHOT = r'''
import importlib, inspect, pkgutil, sys
import mmdet, mmdet.models
for info in pkgutil.walk_packages(mmdet.models.__path__, 'mmdet.models.'):
    try:
        importlib.import_module(info.name)
    except Exception:
        pass
modules = [name for name, module in sys.modules.items()
           if module is not None and name.split('.')[0] in ('mmdet', 'mmcv', 'mmengine')]
def snapshot():
    seen = {}
    for name in modules:
        for key, value in list(vars(sys.modules[name]).items()):
            seen[f'{name}.{key}'] = id(value)
            if inspect.isclass(value) and value.__module__ == name:
                for attr, member in list(vars(value).items()):
                    seen[f'{name}.{key}.{attr}'] = id(member)
    return seen
before = snapshot()
import mmdet_moe
after = snapshot()
print(sorted(k for k in before.keys() | after.keys() if after.get(k) != before.get(k)))
'''


@pytest.mark.slow
def test_only_the_documented_functions_of_mmdet_change():
    """Every global of mmdet's, mmcv's and mmengine's modules and every attribute of
    their classes keeps its object through the import, except the functions PATCHES
    lists (in a fresh interpreter: mmdet is patched in this one)."""
    out = subprocess.run([sys.executable, '-c', SNAPSHOT], capture_output=True,
                         text=True, timeout=600, check=True).stdout.splitlines()[-1]
    documented = sorted(f'{cls.__module__}.{cls.__name__}.{name}'
                        for cls, name, _ in PATCHES)
    assert out == repr(documented)


def test_patches_wrap_mmdet_own_functions_and_nothing_is_shadowed():
    from mmdet.models.detectors import BaseDetector
    from mmdet.models.mot import BaseMOTModel
    from mmdet.registry import MODELS
    import mmdet_moe  # noqa: F401
    assert '__init_subclass__' not in vars(BaseDetector)
    for cls, name, _ in PATCHES:
        patched = vars(cls)[name]
        assert getattr(patched, MARK) and patched.__wrapped__.__module__ == cls.__module__
        assert not getattr(patched.__wrapped__, MARK, False)  # wrapped once
    # the one wrapper on an object: mmdet's model build function
    assert getattr(MODELS.build_func, MARK)
    assert not getattr(MODELS.build_func.__wrapped__, MARK, False)
    # a detector or tracker with its own forward would bypass the loss collection
    for model_cls in set(MODELS.module_dict.values()):
        if isinstance(model_cls, type) and issubclass(model_cls, (BaseDetector, BaseMOTModel)):
            base = BaseDetector if issubclass(model_cls, BaseDetector) else BaseMOTModel
            assert model_cls.forward is base.forward, model_cls


@pytest.mark.slow
def test_models_without_moe_are_byte_identical_with_the_plugin_imported(tmp_path):
    """Stock RetinaNet, Faster R-CNN and Cascade R-CNN: one training step's losses
    and the predictions, in a process that imports mmdet_moe and in one that does
    not."""
    results = []
    for flags in ([], ['--plugin']):
        out = tmp_path / f'outputs{"".join(flags)}.pth'
        subprocess.run([sys.executable, osp.join(HERE, 'stock_outputs.py'), str(out), *flags],
                       check=True, timeout=600)
        results.append(torch.load(out, weights_only=False))
    without, with_plugin = results
    assert without.keys() == with_plugin.keys()
    for path, want in without.items():
        got = with_plugin[path]
        assert got.keys() == want.keys(), path
        assert any(key.startswith('predict/0/bboxes') for key in want)
        for key, value in want.items():
            if isinstance(value, torch.Tensor):  # PAA's untrained score voting gives NaNs
                torch.testing.assert_close(got[key], value, rtol=0, atol=0, equal_nan=True,
                                           msg=f'{path} {key}')
            else:
                assert got[key] == value, (path, key)


def retinanet(moe: bool):
    cfg = stock_model_cfg(RETINANET, 32)
    cfg.test_cfg.update(score_thr=0.0, nms_pre=200, max_per_img=50)
    if moe:
        cfg = ConfigDict(type='MoEDetector', detector=cfg,
                         moe_layers=[dict(paths='bbox_head.cls_convs.1.conv', **MOE)])
    model = build_model(cfg)
    redraw_parameters(model, seed=5)
    return model.eval()


def decode(model, data):
    with torch.no_grad():
        feats = model.extract_feat(data['inputs'])
        return [dict(pred.items()) for pred in
                model.bbox_head.predict(feats, data['data_samples'], rescale=True)]


@pytest.mark.slow
def test_concurrent_decodes_give_the_single_thread_results():
    """Defect: the tagging swapped filter_scores_and_topk in mmdet's module for the
    duration of a decode, so a dense head decoding in another thread at the same
    time fed its kept priors into the MoE head's tags (which then failed or were
    wrong). Each thread decodes many times, released together by a barrier."""
    from mmdet.testing import demo_mm_inputs
    models = {'moe': retinanet(True), 'dense': retinanet(False)}
    packed = demo_mm_inputs(2, [[3, 96, 128], [3, 128, 96]], num_items=[2, 2],
                            num_classes=5)
    data = {name: model.data_preprocessor(packed, False) for name, model in models.items()}
    want = {name: decode(model, data[name]) for name, model in models.items()}
    assert all('expert_weights' in pred for pred in want['moe'])
    assert not any('expert_weights' in pred for pred in want['dense'])
    rounds, barrier, failures = 15, threading.Barrier(2), []

    def run(name):
        try:
            for _ in range(rounds):
                barrier.wait(timeout=120)
                got = decode(models[name], data[name])
                for g, w in zip(got, want[name], strict=True):
                    assert g.keys() == w.keys(), name
                    for key, value in w.items():
                        assert torch.equal(g[key], value), (name, key)
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            failures.append(f'{name}: {error!r}')
            barrier.abort()

    threads = [threading.Thread(target=run, args=(name,)) for name in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
