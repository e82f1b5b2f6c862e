"""Runtime check that an owner runs its tower MoE as one layer (``expert='subnet'``).

A :class:`~mmdet_moe.models.TowerMoE` put in place of a tower is right only if the
owner runs the tower as one layer, ``for layer in self.tower: x = layer(x)`` or
``x = self.tower(x)``, and, when the output conv joined the experts, calls that conv
(now an :class:`~mmdet_moe.models.OutputInExperts`) on the tower's output and uses that
output for nothing else. No source is read: hooks on the owner, the tower, the output
identity and the owner's other children watch the owner's forward calls (tensor
identity, no device work) until one completes having run the tower, then stop
checking. A misuse raises a ValueError naming the path, the owner class and what would
work instead, at the call that shows it:

- indexing or measuring the tower (``self.tower[i]``, ``len(self.tower)``);
- running the tower on its own output or twice on the same features;
- calling the output conv on anything but an output of the tower (once each), passing the
  tower's output to another module or returning it (the experts return the conv's
  output instead), or not calling the output conv on it.

An owner that keeps or combines what the tower returns without passing it to a
module usually fails in a later layer on the wrong shape: that error gets a note
naming the tower. mmdet heads known to do so are declared in :data:`KNOWN_MISUSES`
and refused at build (:meth:`TowerCallCheck.check_declared`).
"""
import functools
import sys
from typing import Any, List, Optional

import torch.nn as nn

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential)

# (owner class, tower) → what that owner's forward does with the tower
_PER_LEVEL = ('holds one conv stack per level, which its forward zips with the levels '
              '(a tower of levels, not of layers)')
KNOWN_MISUSES = {
    ('TOODHead', 'inter_convs'): 'keeps every intermediate feature of its loop (its task '
                                 'decomposition concatenates them)',
    ('SSDHead', 'cls_convs'): _PER_LEVEL,
    ('SSDHead', 'reg_convs'): _PER_LEVEL,
}


def _tensors(value: Any) -> List[Any]:
    """The objects in ``value``, through (nested) tuples, lists and dicts."""
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return [value]


def _contains(objects: List[Any], value: Any) -> bool:
    return any(o is value for o in objects)


class TowerCallCheck:
    """The hooks that check how ``owner`` runs the tower MoE at ``path``.

    Args:
        where: the spec's name for errors (e.g. ``moe_layers[0]``).
        path: the tower's path in the model.
        owner_cls: the owner's class name.
        tower_name, output_name: the tower's and the output conv's names in the owner.
        hint: what would work instead (appended to each refusal).
    """

    def __init__(self, where: str, path: str, owner_cls: str, tower_name: str,
                 output_name: Optional[str], hint: str):
        self.where, self.path, self.owner_cls = where, path, owner_cls
        self.tower_name, self.output_name, self.hint = tower_name, output_name, hint
        self.armed = True
        self._depth = 0
        self._reset()

    def _reset(self) -> None:
        self._inputs: List[Any] = []  # the tower's inputs and outputs in this owner call
        self._outputs: List[Any] = []
        self._unused: List[Any] = []  # outputs not yet passed to a module of the owner
        self._refused = False

    def _error(self, text: str) -> ValueError:
        self._refused = True
        return ValueError(f'{self.where} at {self.path!r}: {self.owner_cls} {text}')

    def refusal(self, what: str) -> ValueError:
        """The error for an owner that ``what`` with the tower."""
        return self._error(
            f'does not run the tower only as `for layer in self.{self.tower_name}: '
            f'x = layer(x)` or `x = self.{self.tower_name}(x)`: it {what}; a subnet expert '
            f'replaces the whole tower, which this code does not run as one{self.hint}')

    def _output_refusal(self, what: str) -> ValueError:
        return self._error(
            f'{what}: the output conv {self.output_name!r} must be called exactly once on '
            f'the output of {self.tower_name} and that output used for nothing else (the '
            "experts return the conv's output in its place); leave output unset to make "
            'the tower alone the expert')

    def check_declared(self, owner: nn.Module) -> None:
        """Refuse a tower that :data:`KNOWN_MISUSES` declares misused by ``owner``."""
        for cls in type(owner).__mro__:
            what = KNOWN_MISUSES.get((cls.__name__, self.tower_name))
            if what is not None:
                raise self.refusal(what)

    def install(self, owner: nn.Module) -> None:
        """Register the hooks on ``owner``, its tower, output identity and children."""
        tower = getattr(owner, self.tower_name)
        owner.register_forward_pre_hook(self._owner_starts)
        owner.register_forward_hook(self._owner_ends, always_call=True)
        tower.register_forward_pre_hook(self._tower_starts)
        tower.register_forward_hook(self._tower_ends)
        for name, child in owner.named_children():
            if child is tower:
                continue
            if name == self.output_name:
                child.register_forward_pre_hook(self._output_starts)
                continue
            grandchildren = child.named_children() if isinstance(child, _CONTAINERS) else ()
            for sub_name, module in [(name, child)] + [
                    (f'{name}.{n}', m) for n, m in grandchildren]:
                module.register_forward_pre_hook(functools.partial(self._child_starts,
                                                                   sub_name))
        tower.call_check = self

    def _owner_starts(self, module: nn.Module, args) -> None:
        if self.armed:
            self._depth += 1
            if self._depth == 1:
                self._reset()

    def _owner_ends(self, module: nn.Module, args, result) -> None:
        if not self.armed:
            return
        self._depth -= 1
        if self._depth:
            return
        error = sys.exc_info()[1]
        try:
            if error is not None:
                if self._unused and not self._refused:
                    error.add_note(self._note())
                return
            if self.output_name is not None:
                if self._unused:
                    raise self._output_refusal(
                        f'does not call {self.output_name!r} on the output of '
                        f'{self.tower_name}')
                if any(_contains(self._outputs, t) for t in _tensors(result)):
                    raise self._output_refusal(f'returns the output of {self.tower_name}')
            self.armed = not self._outputs  # checked once the tower has run
        finally:
            self._reset()

    def _note(self) -> str:
        return (f'mmdet_moe: {self.where} at {self.path!r}: {self.owner_cls} did not pass '
                f'the output of the tower MoE {self.tower_name} to a module as it is: '
                'it may keep or combine what the tower returns (e.g. every intermediate '
                'feature of its loop), which a tower run as one layer does not give'
                f'{self.hint}')

    def _tower_starts(self, module: nn.Module, args) -> None:
        if not (self.armed and self._depth and args):
            return
        x = args[0]
        if _contains(self._outputs, x):
            raise self.refusal('runs it on its own output (at several places or twice in '
                               'a row); a subnet MoE must run once per feature map')
        if _contains(self._inputs, x):
            raise self.refusal('runs it twice on the same features; a subnet MoE must '
                               'run once per feature map')
        self._inputs.append(x)

    def _tower_ends(self, module: nn.Module, args, result) -> None:
        if self.armed and self._depth:
            self._outputs.append(result)
            self._unused.append(result)

    def _use(self, args) -> bool:
        """Take the tower's outputs among ``args`` off the unused ones; True if any."""
        used = [x for x in self._unused if any(x is a for a in _tensors(args))]
        self._unused = [x for x in self._unused if not _contains(used, x)]
        return bool(used) or any(_contains(self._outputs, a) for a in _tensors(args))

    def _output_starts(self, module: nn.Module, args) -> None:
        if not (self.armed and self._depth):
            return
        if not (len(args) == 1 and _contains(self._unused, args[0])):
            raise self._output_refusal(f'calls {self.output_name!r} on other than an '
                                       f'output of {self.tower_name}')
        self._use(args)

    def _child_starts(self, name: str, module: nn.Module, args) -> None:
        if self.armed and self._depth and self._use(args) and self.output_name is not None:
            raise self._output_refusal(f'passes the output of {self.tower_name} to {name} '
                                       f'besides {self.output_name!r}')
