"""Train a detector: mmdet 3.3.0's stock ``tools/train.py`` with mmdet_moe loaded.

Same flags and behaviour (``--work-dir``, ``--resume``, ``--amp``, ``--auto-scale-lr``,
``--cfg-options``, ``--launcher``); configs need no ``custom_imports``.
"""
from mmdet_moe.stock_tools import run_stock_tool

if __name__ == '__main__':
    run_stock_tool('train.py')
