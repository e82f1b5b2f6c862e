"""Run one object's method with some of its module's global names replaced, for the
duration of a ``with`` block, without changing the module.

The expert tagging needs what mmdet's decode code computes and drops (the prior
indices ``filter_scores_and_topk`` keeps, the RoIs ``multiclass_nms`` keeps). Swapping
those names in mmdet's module namespaces would change them for every thread; instead
the method's code runs on a copy of its globals in which the name is replaced, bound
to this object only. Where what is needed is a method's own argument or result (the
RoIs and scores of a Sparse R-CNN stage), :func:`method_wrapped` wraps that method of
one object alike.
"""
import functools
from contextlib import contextmanager
from types import FunctionType, MethodType
from typing import Any, Callable, Iterator, Sequence


def method_global(obj: Any, method: str, name: str) -> Any:
    """The object the method ``method`` of ``obj``'s class sees as the global ``name``
    (None if its module has none, or the method is no plain function)."""
    return getattr(getattr(type(obj), method), '__globals__', {}).get(name)


def uses_stock_methods(obj: Any, cls: type, names: Sequence[str]) -> bool:
    """Whether ``obj`` is a ``cls`` whose methods ``names`` are ``cls``'s own (not
    overridden by a subclass), i.e. code whose internals the tagging may rely on."""
    return isinstance(obj, cls) and all(getattr(type(obj), name) is getattr(cls, name)
                                        for name in names)


def with_globals(func: FunctionType, **names: Any) -> FunctionType:
    """A copy of ``func`` (same code, defaults and closure) that sees ``names`` in
    place of the globals of the same names; ``func`` and its module are unchanged."""
    missing = sorted(set(names) - set(func.__globals__))
    if missing:
        raise NameError(f'{func.__module__}.{func.__qualname__} has no globals {missing}; '
                        f'it has e.g. {sorted(func.__globals__)[:8]}')
    copy = FunctionType(func.__code__, {**func.__globals__, **names}, func.__name__,
                        func.__defaults__, func.__closure__)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__qualname__ = func.__qualname__
    copy.__doc__ = func.__doc__
    return copy


@contextmanager
def method_seeing(obj: Any, method: str, **names: Any) -> Iterator[None]:
    """Within the block, ``obj.<method>`` (the method of its class) sees ``names`` in
    place of its module's globals; other objects and threads see the stock method.

    Concurrent calls on one object are not supported (the override is an attribute
    of the object, as the decode's own state is)."""
    func = getattr(type(obj), method)
    obj.__dict__[method] = MethodType(with_globals(func, **names), obj)
    try:
        yield
    finally:
        del obj.__dict__[method]


@contextmanager
def method_wrapped(obj: Any, method: str,
                   wrapper: Callable[..., Any]) -> Iterator[None]:
    """Within the block, ``obj.<method>(*args, **kwargs)`` runs as ``wrapper(stock,
    *args, **kwargs)``, ``stock`` the method of its class bound to ``obj``; other
    objects see the stock method (same caveat as :func:`method_seeing`)."""
    stock = getattr(type(obj), method).__get__(obj)
    obj.__dict__[method] = functools.partial(wrapper, stock)
    try:
        yield
    finally:
        del obj.__dict__[method]
