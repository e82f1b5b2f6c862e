"""Write a whole output folder or nothing: a failed run never leaves a partial one."""
import os
import os.path as osp
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
    """Yield a fresh temporary folder beside ``out_dir``; on success it replaces
    ``out_dir`` (removing an older one), on any error it is deleted."""
    parent = osp.dirname(osp.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(osp.abspath(out_dir))}-', dir=parent)
    try:
        yield tmp
        if osp.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
