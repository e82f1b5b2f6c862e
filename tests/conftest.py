import multiprocessing.util
import os
import os.path as osp
import random
import subprocess

import numpy as np
import pytest
import torch

# what a test of the fast tier (`make test-fast`: not slow, not cuda) may not start: a
# tool, pip, a shell script or worker ranks make a test slow (pytest.ini)
INTERPRETERS = ('python', 'bash')


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Keep the tiers honest: a test of the fast tier fails if it (or a fixture it
    sets up) starts a Python or bash process or spawns multiprocessing workers."""
    if item.get_closest_marker('slow') or item.get_closest_marker('cuda'):
        yield
        return

    def refuse(what: str):
        raise RuntimeError(f'{item.nodeid} starts {what}: mark it @pytest.mark.slow '
                           '(`make test-fast` leaves slow tests out)')

    popen_init = subprocess.Popen.__init__

    def checked_init(self, args, *rest, **kwargs):
        # a command line (str, bytes, path) or a sequence whose first item is the program
        command = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
        program = os.fsdecode(command).split()[0]
        if osp.basename(program).startswith(INTERPRETERS):
            refuse(f'a process ({program})')
        popen_init(self, args, *rest, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, '__init__', checked_init)
        patch.setattr(multiprocessing.util, 'spawnv_passfds',
                      lambda *args, **kwargs: refuse('multiprocessing workers (spawn)'))
        yield
