"""Write a whole output folder or file, or nothing: a failed run never leaves a partial one."""
import os
import os.path as osp
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Sequence


def created_mode(mode: int) -> int:
    """``mode`` less the process's umask: what a plainly created file or folder gets."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


@contextmanager
def atomic_directory(out_dir: str) -> Iterator[str]:
    """Yield a fresh temporary folder beside ``out_dir``; on success it replaces
    ``out_dir`` (removing an older one), on any error it is deleted."""
    parent = osp.dirname(osp.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{osp.basename(osp.abspath(out_dir))}-', dir=parent)
    try:
        yield tmp
        os.chmod(tmp, created_mode(0o777))  # as os.makedirs would (mkdtemp: 0700)
        if osp.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_replaceable(out_dir: str, inputs: Sequence[str], written: str) -> None:
    """Raise ValueError unless :func:`atomic_directory` may replace ``out_dir``: it must
    not be a file, hold none of the ``inputs`` (replacing it would delete them), and
    be new, empty, or an earlier output (holding the file ``written``)."""
    target = osp.realpath(out_dir)
    for path in inputs:
        if path and osp.commonpath([target, osp.realpath(path)]) == target:
            raise ValueError(f'--out-dir {out_dir} holds the input {path}, which replacing '
                             'the folder would delete; choose a new folder')
    if osp.isfile(out_dir):
        raise ValueError(f'--out-dir {out_dir} is a file; give a folder')
    if osp.isdir(out_dir) and os.listdir(out_dir) and \
            not osp.isfile(osp.join(out_dir, written)):
        raise ValueError(f'--out-dir {out_dir} is a folder of other files (no {written} of '
                         'an earlier run), which it would replace; choose a new folder')


@contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """Yield a temporary file name beside ``path``; on success the file written there
    replaces ``path``, on any error it is deleted (``path`` is left as it was)."""
    parent = osp.dirname(osp.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{osp.basename(path)}-', dir=parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, created_mode(0o666))  # as open() would (mkstemp: 0600)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
