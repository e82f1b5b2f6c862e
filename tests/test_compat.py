"""mmengine checkpoints load under torch >= 2.6 with the safe loader kept on."""
import io
import pickle

import pytest
import torch
from mmengine.logging import MessageHub
from mmengine.logging.history_buffer import HistoryBuffer

from mmdet_moe.compat import history_buffer_statistic


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
