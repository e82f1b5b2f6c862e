"""``benchmark.py iteration`` and ``hooks``: training (and test) runs of a config on
its own data through mmengine's Runner, as ``tools/train.py`` runs them.

``iteration`` splits the wall time of training iterations into data loading, data
preprocessor, forward (model and losses), backward, optimizer step and each hook.
``hooks`` measures the overhead of ExpertUtilisationHook on training iterations and
of ExpertSizeStatsHook on a test run, as the time inside the hook relative to the
rest."""
import argparse
import os.path as osp
import time

import torch
from mmengine.config import Config
from mmengine.hooks import Hook

from .cli import config_command


class PhaseTimer(Hook):
    """Wall time per phase of the training iterations of a Runner.

    Installed by ``before_train`` (the optimizer wrapper exists by then), it wraps the
    data preprocessor, the model's ``loss``, the optimizer wrapper's ``backward`` and
    ``step`` and every hook's per-iteration methods. What is left of an iteration's
    wall time (from one ``run_iter`` to the next) is data loading. An iteration
    counts once the next one starts, so every counted phase has its wall time.
    """

    def __init__(self, skip: int):
        self.skip, self.iters, self.timed_iters = skip, 0, 0
        self.seconds, self._current, self._iter_start = {}, {}, None

    def timed(self, phase: str, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._current[phase] = self._current.get(phase, 0.0) + \
                    time.perf_counter() - start
        return wrapper

    def before_train(self, runner) -> None:
        from mmengine.model import is_model_wrapper
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        preprocessor = model.data_preprocessor
        preprocessor.forward = self.timed('data preprocessor', preprocessor.forward)
        model.loss = self.timed('forward (model + losses)', model.loss)
        optim = runner.optim_wrapper
        optim.backward = self.timed('backward', optim.backward)
        optim.step = self.timed('optimizer step (grad clip included)', optim.step)
        for hook in runner.hooks:
            if hook is not self:
                for stage in ('before_train_iter', 'after_train_iter'):
                    setattr(hook, stage, self.timed(f'hook {type(hook).__name__}',
                                                    getattr(hook, stage)))
        loop = runner.train_loop
        loop.run_iter = self._iteration(loop.run_iter)

    def _iteration(self, run_iter):
        def wrapper(*args, **kwargs):
            now = time.perf_counter()
            if self._iter_start is not None and self.iters > self.skip:
                self._current['iteration (wall)'] = now - self._iter_start
                for phase, seconds in self._current.items():
                    self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
                self.timed_iters += 1
            self._current, self._iter_start = {}, now
            self.iters += 1
            return run_iter(*args, **kwargs)
        return wrapper

    def table(self) -> str:
        parts = dict(self.seconds)
        wall = parts.pop('iteration (wall)')
        parts['data loading (rest of the iteration)'] = wall - sum(parts.values())
        lines = [f'| {"phase":40s} | {"ms / iter":>9s} | {"share":>6s} |',
                 f'|{"-" * 42}|{"-" * 11}|{"-" * 8}|']
        for phase, seconds in sorted(parts.items(), key=lambda kv: -kv[1]):
            lines.append(f'| {phase:40s} | {seconds / self.timed_iters * 1e3:9.1f} | '
                         f'{seconds / wall:6.1%} |')
        lines.append(f'| {"iteration (wall)":40s} | '
                     f'{wall / self.timed_iters * 1e3:9.1f} | {1:6.0%} |')
        return '\n'.join(lines)


def training_config(args: argparse.Namespace, iters: int) -> Config:
    """The config of ``args.config`` (with ``--cfg-options``) for ``iters`` training
    iterations on its own data, without validation or checkpoints."""
    import mmdet_moe  # noqa: F401
    cfg = Config.fromfile(args.config)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    cfg.train_dataloader.dataset.indices = iters * cfg.train_dataloader.batch_size
    cfg.train_cfg.update(max_epochs=1, val_interval=10 ** 6)
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None  # training only
    cfg.default_hooks.checkpoint = dict(type='CheckpointHook', interval=10 ** 6)
    cfg.work_dir = args.work_dir
    return cfg


def profile_iteration(args: argparse.Namespace) -> None:
    """Profile training iterations of a config through the stock Runner."""
    from mmengine.runner import Runner
    # one more: an iteration is timed when the next one starts
    cfg = training_config(args, args.iters + args.warmup + 1)
    runner = Runner.from_cfg(cfg)
    timer = PhaseTimer(skip=args.warmup)
    runner.register_hook(timer, priority='LOWEST')
    runner.train()
    print(f'{args.config}: {args.iters} training iterations after {args.warmup} '
          f'warm-up, batch {cfg.train_dataloader.batch_size}, {torch.get_num_threads()} '
          'threads')
    print(timer.table())


class HookCost(Hook):
    """Seconds spent in the ``mode`` methods of the hooks of one class, and the wall
    time of the ``mode`` loop (``runner.train_loop.run`` / ``test_loop.run``)."""

    def __init__(self, mode: str, hook_type: str):
        self.mode, self.hook_type = mode, hook_type
        self.hook_seconds = self.loop_seconds = 0.0

    def _timed(self, fn, add):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                add(time.perf_counter() - start)
        return wrapper

    def _add_hook(self, seconds):
        self.hook_seconds += seconds

    def _add_loop(self, seconds):
        self.loop_seconds += seconds

    def before_run(self, runner) -> None:
        loop = getattr(runner, f'{self.mode}_loop')  # built before before_run
        loop.run = self._timed(loop.run, self._add_loop)
        hooks = [h for h in runner.hooks if type(h).__name__ == self.hook_type]
        if not hooks:
            raise ValueError(f'the config has no {self.hook_type} in custom_hooks')
        for hook in hooks:
            for stage in Hook.stages:
                if self.mode in stage:
                    setattr(hook, stage, self._timed(getattr(hook, stage), self._add_hook))

    def line(self) -> str:
        rest = self.loop_seconds - self.hook_seconds
        return (f'| {self.hook_type:22s} | {self.mode:5s} | {self.loop_seconds:8.2f} | '
                f'{self.hook_seconds * 1e3:9.1f} | {self.hook_seconds / rest:8.2%} |')


def bench_hooks(args: argparse.Namespace) -> None:
    """Overhead of the statistics hooks: ExpertUtilisationHook in training,
    ExpertSizeStatsHook in a test run, as the time inside their methods relative to
    the rest of the loop (what a run without the hook takes)."""
    from mmengine.runner import Runner
    train = HookCost('train', 'ExpertUtilisationHook')
    runner = Runner.from_cfg(training_config(args, args.iters))
    runner.register_hook(train, priority='LOWEST')
    runner.train()
    cfg = training_config(args, 1)
    cfg.test_dataloader.dataset.indices = args.test_images
    cfg.load_from = args.checkpoint
    cfg.work_dir = osp.join(args.work_dir, 'test')
    test = HookCost('test', 'ExpertSizeStatsHook')
    runner = Runner.from_cfg(cfg)
    runner.register_hook(test, priority='LOWEST')
    runner.test()
    print(f'{args.config}: {args.iters} training iterations, a test run over '
          f'{args.test_images} images ('
          + (f'weights of {args.checkpoint}' if args.checkpoint else 'random weights')
          + f'), {torch.get_num_threads()} threads; overhead = time in the hook / the '
          'rest of the loop')
    print(f'| {"hook":22s} | {"loop":5s} | {"loop s":>8s} | {"hook ms":>9s} | '
          f'{"overhead":>8s} |')
    print(f'|{"-" * 24}|{"-" * 7}|{"-" * 10}|{"-" * 11}|{"-" * 10}|')
    print(train.line())
    print(test.line())


def add_commands(sub) -> None:
    iteration = config_command(sub, 'iteration', 'where the time of a training '
                               'iteration of a config goes (stock Runner, the config\'s data)')
    iteration.add_argument('--iters', type=int, default=30, help='timed iterations')
    iteration.add_argument('--warmup', type=int, default=3)
    iteration.add_argument('--work-dir', default=osp.join('work_dirs', 'benchmark_iteration'))
    iteration.set_defaults(func=profile_iteration)
    hooks = config_command(sub, 'hooks', 'overhead of ExpertUtilisationHook in training '
                           'and ExpertSizeStatsHook in a test run of a config')
    hooks.add_argument('--checkpoint', help='weights for the test run (default: random)')
    hooks.add_argument('--iters', type=int, default=30, help='training iterations')
    hooks.add_argument('--test-images', type=int, default=100)
    hooks.add_argument('--work-dir', default=osp.join('work_dirs', 'benchmark_hooks'))
    hooks.set_defaults(func=bench_hooks)
