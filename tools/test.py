"""Test a detector: mmdet 3.3.0's stock ``tools/test.py`` with mmdet_moe loaded.

Same flags and behaviour (``--work-dir``, ``--out``, ``--show``, ``--show-dir``,
``--tta``, ``--cfg-options``, ``--launcher``); configs need no ``custom_imports``.
"""
from mmdet_moe.stock_tools import run_stock_tool

if __name__ == '__main__':
    run_stock_tool('test.py')
