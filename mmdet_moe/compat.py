"""Compatibility: the mmdet versions the plugin supports, and mmengine 0.10.7's
checkpoints under torch >= 2.6.

The tagging of detections follows mmdet's decode code (``filter_scores_and_topk``,
``_bbox_post_process``, ``multiclass_nms``), which changes between minor versions,
so the plugin accepts the minor version its tests run against and refuses others at
import with what to install (setup.py declares the same range).

torch >= 2.6 loads checkpoints with ``weights_only=True`` by default, and mmengine
0.10.7 does not pass the argument, so its own checkpoints (which hold a
``HistoryBuffer`` and numpy arrays in the message hub) fail to load for
``tools/test.py``, ``--resume`` and ``load_from``. We keep the safe loader and
allow-list exactly the classes such checkpoints contain.

The allow-list is process-wide (``torch.serialization.add_safe_globals`` at import)
because the plugin does not call ``torch.load`` itself: the stock tools, ``--resume``
and ``load_from`` reach it inside mmengine (``CheckpointLoader`` → ``torch.load``),
after the config's ``custom_imports`` ran, and nothing the plugin runs encloses that
call, so a scoped ``torch.serialization.safe_globals`` block could only be had by
wrapping mmengine's loader, a change of mmengine in every process anyway. What it
admits is data only: a ``HistoryBuffer``, numpy arrays, dtypes and scalars, and
``getattr`` restricted to four HistoryBuffer statistics (below); no callable that
runs code beyond constructing them.

A ``HistoryBuffer`` also pickles its statistics methods as
``getattr(HistoryBuffer, 'min')`` etc. Allow-listing the real ``getattr`` would let
a checkpoint reach any attribute of any allowed object, so ``builtins.getattr`` is
served by :func:`history_buffer_statistic`, which resolves those methods only.
"""
import pickle

import numpy as np
import torch


MMDET_RANGE = ('3.3.0', '3.4.0')  # [lowest, first refused), as setup.py declares


def check_mmdet_version(version: str) -> None:
    """Raise ImportError unless ``version`` (mmdet's) lies in :data:`MMDET_RANGE`."""
    from mmengine.utils import digit_version
    low, high = MMDET_RANGE
    if not digit_version(low) <= digit_version(version) < digit_version(high):
        raise ImportError(f'mmdet_moe supports mmdet>={low},<{high} (the version its tests '
                          f'run against), found mmdet {version}: pip install '
                          f'"mmdet>={low},<{high}"')


HISTORY_BUFFER_STATISTICS = ('min', 'max', 'current', 'mean')


def history_buffer_statistic(owner, name: str):
    """The only ``getattr`` a checkpoint may call: a HistoryBuffer statistic."""
    from mmengine.logging.history_buffer import HistoryBuffer
    if owner is not HistoryBuffer or name not in HISTORY_BUFFER_STATISTICS:
        raise pickle.UnpicklingError(
            f'checkpoint asks for getattr({owner!r}, {name!r}); only HistoryBuffer '
            f'statistics {HISTORY_BUFFER_STATISTICS} are allowed')
    return getattr(HistoryBuffer, name)


def mmengine_checkpoint_globals() -> list:
    """Globals pickled in checkpoints written by mmengine's Runner."""
    from mmengine.logging.history_buffer import HistoryBuffer
    try:
        multiarray = np._core.multiarray  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        multiarray = np.core.multiarray
    dtype_classes = [getattr(np.dtypes, name) for name in dir(np.dtypes)
                     if name.endswith('DType')]
    return [HistoryBuffer, np.ndarray, np.dtype, multiarray._reconstruct,
            multiarray.scalar, *dtype_classes,
            (history_buffer_statistic, 'builtins.getattr')]


def allow_mmengine_checkpoints() -> None:
    """Allow-list mmengine's checkpoint classes for ``torch.load(weights_only=True)``."""
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is not None:  # torch < 2.4 has no safe loader by default
        add_safe_globals(mmengine_checkpoint_globals())
