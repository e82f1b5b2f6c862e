"""Run mmdet's own command-line tools with mmdet_moe loaded.

mmdet's wheel ships its ``tools/`` under ``mmdet/.mim/tools``. Running those exact
scripts (rather than copies) keeps our ``tools/train.py`` and ``tools/test.py``
flag-for-flag identical to mmdet 3.3.0's stock tools.
"""
import os.path as osp
import runpy

import mmdet

import mmdet_moe  # noqa: F401  registers MoE components, checkpoint compatibility


def stock_tool_path(name: str) -> str:
    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', name)
    if not osp.isfile(path):
        raise FileNotFoundError(f'mmdet {mmdet.__version__} ships no tools/{name} '
                                f'(looked for {path})')
    return path


def run_stock_tool(name: str) -> None:
    """Execute mmdet's ``tools/<name>`` as ``__main__`` with the current ``sys.argv``."""
    runpy.run_path(stock_tool_path(name), run_name='__main__')
