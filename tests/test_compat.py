"""The supported mmdet range, and mmengine checkpoints under torch >= 2.6 with the
safe loader kept on."""
import io
import os.path as osp
import pickle

import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.logging.history_buffer import HistoryBuffer
from helpers import ROOT

import mmdet

from mmdet_moe.compat import MMDET_RANGE, check_mmdet_version, history_buffer_statistic


def test_the_installed_mmdet_is_in_the_declared_range():
    check_mmdet_version(mmdet.__version__)
    with open(osp.join(ROOT, 'setup.py')) as f:
        assert f"'mmdet>={MMDET_RANGE[0]},<{MMDET_RANGE[1]}'" in f.read()


@pytest.mark.parametrize('version', ['3.2.0', '3.4.0', '2.28.2'])
def test_other_mmdet_versions_are_refused_naming_the_range(version):
    with pytest.raises(ImportError, match=rf'found mmdet {version}: pip install '
                                          r'"mmdet>=3\.3\.0,<3\.4\.0"'):
        check_mmdet_version(version)


def test_message_hub_state_loads_with_weights_only():
    hub = MessageHub.get_instance('compat-test')
    hub.update_scalar('train/loss', 0.5)
    buffer = io.BytesIO()
    torch.save(dict(message_hub=hub.state_dict(), meta=dict(epoch=1)), buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)
    history = restored['message_hub']['log_scalars']['train/loss']
    assert isinstance(history, HistoryBuffer) and history.current() == 0.5


def test_only_history_buffer_statistics_are_reachable():
    assert history_buffer_statistic(HistoryBuffer, 'mean') is HistoryBuffer.mean
    with pytest.raises(pickle.UnpicklingError, match='__init__'):
        history_buffer_statistic(HistoryBuffer, '__init__')
    with pytest.raises(pickle.UnpicklingError):
        history_buffer_statistic(object, 'min')
