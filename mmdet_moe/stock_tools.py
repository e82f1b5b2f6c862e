"""Run mmdet's own command-line tools with mmdet_moe loaded.

mmdet's wheel ships its ``tools/`` under ``mmdet/.mim/tools``. Running those exact
scripts (rather than copies) keeps our ``tools/train.py`` and ``tools/test.py``
flag-for-flag identical to mmdet 3.3.0's stock tools.

Distributed runs without CUDA (``--launcher pytorch`` on a CPU-only machine, e.g.
``tools/dist_train.sh CONFIG 2`` on a laptop or in CI) do not work with the stock
tools alone, for two reasons in mmengine 0.10.7:

- ``Runner.setup_env`` calls ``mmengine.dist.init_dist``, whose ``pytorch`` launcher
  calls ``torch.cuda.set_device(LOCAL_RANK)`` before creating the process group
  (a CPU-only torch raises ``AttributeError: module 'torch._C' has no attribute
  '_cuda_setDevice'``), with the config's ``env_cfg.dist_cfg.backend`` (``'nccl'``
  in mmdet's default runtime);
- ``Runner.wrap_model`` builds ``MMDistributedDataParallel`` with
  ``device_ids=[LOCAL_RANK]``, which torch's DDP refuses for a module on the CPU
  (``ValueError: DistributedDataParallel device_ids and output_device arguments
  only work with single-device/multiple-device GPU modules or CPU modules``).

So, only when ``torch.cuda.is_available()`` is False and the launcher is
``pytorch``, :func:`run_stock_tool` first creates the process group itself with the
``gloo`` backend from torchrun's environment (``setup_env`` skips ``init_dist`` when
torch.distributed is already initialised), and appends to the command line the
``--cfg-options`` that make the config say what runs: ``env_cfg.dist_cfg.backend=gloo``
and a ``model_wrapper_cfg`` with ``device_ids=None`` (``Runner.wrap_model`` passes
``device_ids`` as a default argument, which the registry only ``setdefault``-s, so an
explicit ``None`` is kept). Without a ``model_wrapper_cfg`` in the config, the one
added is exactly the Runner's default wrapper (``MMDistributedDataParallel``,
``broadcast_buffers=False``, the config's ``find_unused_parameters``) with
``device_ids=None``. Nothing in mmengine is patched;
with CUDA, nothing changes. The ``slurm`` and ``mpi`` launchers are left as they are.
"""
import datetime
import os.path as osp
import runpy
import sys
from typing import Optional

import mmdet
import torch
import torch.distributed as dist

import mmdet_moe  # noqa: F401  registers MoE components, checkpoint compatibility

#: the wrapper ``Runner.wrap_model`` builds when the config has no ``model_wrapper_cfg``
DEFAULT_WRAPPER = 'MMDistributedDataParallel'


def stock_tool_path(name: str) -> str:
    path = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', name)
    if not osp.isfile(path):
        raise FileNotFoundError(f'mmdet {mmdet.__version__} ships no tools/{name} '
                                f'(looked for {path})')
    return path


def run_stock_tool(name: str) -> None:
    """Execute mmdet's ``tools/<name>`` as ``__main__`` with the current ``sys.argv``
    (on a machine without CUDA, a ``--launcher pytorch`` run goes over gloo on CPU:
    see the module's docstring)."""
    path = stock_tool_path(name)
    cpu_group = False if torch.cuda.is_available() else setup_cpu_distributed(path)
    try:
        runpy.run_path(path, run_name='__main__')
    finally:
        if cpu_group and dist.is_initialized():
            dist.destroy_process_group()


def setup_cpu_distributed(path: str, argv: Optional[list] = None) -> bool:
    """For a ``--launcher pytorch`` command line of the stock tool at ``path``: create
    the gloo process group and append the ``--cfg-options`` for a CPU run to ``argv``
    (``sys.argv``). Returns whether it did (False for other launchers)."""
    argv = sys.argv if argv is None else argv
    if not any('pytorch' in arg for arg in argv[1:]):  # no launcher pytorch: no parse
        return False
    args = parse_stock_args(path, argv)
    if args.launcher != 'pytorch':
        return False
    from mmengine.config import Config
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    options = cpu_cfg_options(cfg)
    argv += ['--cfg-options'] + [f'{key}={value}' for key, value in options.items()]

    timeout = cfg.get('env_cfg', {}).get('dist_cfg', {}).get('timeout')
    kwargs = {} if timeout is None else dict(timeout=datetime.timedelta(seconds=timeout))
    # env:// from torchrun: MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE. (mmengine's
    # init_dist also sets the 'spawn' start method if none is set; Runner.setup_env has
    # already set the config's mp_start_method by then, so that never applies.)
    dist.init_process_group(backend='gloo', **kwargs)

    from mmengine.logging import print_log
    print_log(f'mmdet_moe: CUDA is not available: distributed run on CPU over gloo '
              f'(launcher pytorch, world size {dist.get_world_size()}), model wrapper '
              f'without device_ids; added --cfg-options '
              + ' '.join(f'{k}={v}' for k, v in options.items()), logger='current')
    return True


def parse_stock_args(path: str, argv: list):
    """The stock tool's own ``parse_args()`` on ``argv`` (its module body only defines
    functions; ``main()`` runs under ``__main__`` only)."""
    stock = runpy.run_path(path, run_name='mmdet_moe_stock_' + osp.basename(path)[:-3])
    saved = sys.argv
    sys.argv = list(argv)
    try:
        return stock['parse_args']()
    finally:
        sys.argv = saved


def cpu_cfg_options(cfg) -> dict:
    """The config changes for a distributed CPU run of ``cfg`` (see the module's
    docstring)."""
    options = {'env_cfg.dist_cfg.backend': 'gloo'}
    wrapper = cfg.get('model_wrapper_cfg')
    if wrapper is None:
        options.update({
            'model_wrapper_cfg.type': DEFAULT_WRAPPER,
            'model_wrapper_cfg.device_ids': None,
            'model_wrapper_cfg.broadcast_buffers': False,
            'model_wrapper_cfg.find_unused_parameters':
                bool(cfg.get('find_unused_parameters', False)),
        })
    elif 'device_ids' not in wrapper and takes_device_ids(wrapper.get('type',
                                                                      DEFAULT_WRAPPER)):
        options['model_wrapper_cfg.device_ids'] = None
    return options


def takes_device_ids(wrapper_type) -> bool:
    """Whether ``Runner.wrap_model`` gives this wrapper ``device_ids`` (it does for
    subclasses of torch's DistributedDataParallel)."""
    from mmengine.registry import MODEL_WRAPPERS
    from torch.nn.parallel import DistributedDataParallel
    cls = MODEL_WRAPPERS.get(wrapper_type) if isinstance(wrapper_type, str) else wrapper_type
    return isinstance(cls, type) and issubclass(cls, DistributedDataParallel)
