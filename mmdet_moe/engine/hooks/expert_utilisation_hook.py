"""ExpertUtilisationHook: expert usage during training, and router-collapse warnings."""
from collections import defaultdict

from mmengine.hooks import Hook

from mmdet.registry import HOOKS

from ...analysis import living_experts
from ...layers import assign_moe_names, is_moe_module
from .gate_recording import GateRecordingMixin, unwrap
from .scalar_names import moe_scalar_name

MAX_EXPERTS_LOGGED_ONE_BY_ONE = 16


@HOOKS.register_module()
class ExpertUtilisationHook(GateRecordingMixin, Hook):
    """Logs each MoE layer's importance share per expert and its living experts.

    The gate weights are computed by training anyway; the hook only sums their
    columns. Every ``interval`` iterations it puts ``share_e<i>`` (layers with at
    most 16 experts; else ``share_min`` / ``share_max``) and ``living_experts`` (mean
    gate weight > 0.01) of each layer in the message hub, logged as
    ``moe_train.<layer>.<key>`` (see :mod:`.scalar_names`), for LoggerHook and the
    visualizer backends. Layers with a ``capacity_factor`` also log
    ``dropped_share``: the share of their routed (row, expert) pairs dropped for
    exceeding an expert's capacity since the last report. An expert whose share stays
    below ``collapse_share`` for ``collapse_intervals`` intervals in a row is named
    in a warning (router collapse), once until it recovers.
    """
    priority = 'NORMAL'

    def __init__(self, interval: int = 50, collapse_share: float = 0.01,
                 collapse_intervals: int = 5):
        if interval < 1 or collapse_intervals < 1:
            raise ValueError(f'interval and collapse_intervals must be >= 1, got '
                             f'{interval!r} and {collapse_intervals!r}')
        self.interval, self.collapse_share = interval, collapse_share
        self.collapse_intervals = collapse_intervals
        self._training = False

    def before_train(self, runner) -> None:
        if not assign_moe_names(unwrap(runner.model)):
            raise ValueError('ExpertUtilisationHook: the model has no MoE layer; remove '
                             'the hook or add MoE layers')
        self._importance = defaultdict(float)
        self._rows = defaultdict(int)
        self._low_streak = defaultdict(int)
        self._training = True
        self.start_recording(runner)

    def before_val_epoch(self, runner) -> None:
        self.stop_recording()  # validation gates are not training utilisation

    def after_val_epoch(self, runner, metrics=None) -> None:
        if self._training:
            self.start_recording(runner)

    def after_train(self, runner) -> None:
        self._training = False
        self.stop_recording()

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self.recorder is None:
            return
        # summed on the device: read on the host once per interval, not per iteration
        for record in self.recorder.records:
            self._importance[record.name] = (self._importance[record.name] +
                                             record.weights.float().sum(0))
            self._rows[record.name] += record.weights.shape[0]
        self.recorder.clear()
        if self.every_n_train_iters(runner, self.interval):
            self._report(runner)

    def _report(self, runner) -> None:
        for module in unwrap(runner.model).modules():
            overflow = module.pop_overflow() if is_moe_module(module) else None
            if overflow is not None:
                dropped, routed = overflow.tolist()
                runner.message_hub.update_scalar(
                    moe_scalar_name('train', module.moe_name, 'dropped_share'),
                    dropped / max(routed, 1))
        for name, importance in self._importance.items():
            importance = importance.cpu().numpy()
            share = importance / max(importance.sum(), 1e-12)
            scalars = ({f'share_e{i}': value for i, value in enumerate(share)}
                       if len(share) <= MAX_EXPERTS_LOGGED_ONE_BY_ONE
                       else dict(share_min=share.min(), share_max=share.max()))
            scalars['living_experts'] = living_experts(importance, self._rows[name])
            for key, value in scalars.items():
                runner.message_hub.update_scalar(moe_scalar_name('train', name, key),
                                                 float(value))
            for i, value in enumerate(share):
                key = (name, i)
                low = value < self.collapse_share
                self._low_streak[key] = self._low_streak[key] + 1 if low else 0
                if self._low_streak[key] == self.collapse_intervals:
                    runner.logger.warning(
                        f'MoE layer {name}: expert {i} got {value:.2%} of the gate weight '
                        f'(< {self.collapse_share:.0%}) for {self.collapse_intervals} '
                        f'intervals of {self.interval} iterations: the router may be '
                        'collapsing; consider a balance loss or a hard constraint')
        self._importance.clear()
        self._rows.clear()
