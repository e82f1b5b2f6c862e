"""A method run with some of its module's globals replaced, for one object only."""
import pytest

from mmdet_moe.models.rebinding import (method_global, method_seeing, method_wrapped,
                                        with_globals)

SCALE = 2


def scaled(x, offset=0, *, extra=0):
    return SCALE * x + offset + extra


class Scaler:
    def __init__(self, bias):
        self.bias = bias

    def apply(self, x):
        return scaled(x) + self.bias


def test_the_copy_sees_the_replacement_and_the_module_keeps_its_own():
    copy = with_globals(scaled, SCALE=10)
    assert copy(1) == 10 and copy(1, 1, extra=1) == 12  # defaults carried over
    assert scaled(1) == 2 and SCALE == 2
    assert copy.__qualname__ == scaled.__qualname__


def test_an_unknown_global_is_refused_by_name():
    with pytest.raises(NameError, match=r"has no globals \['SCAL'\]"):
        with_globals(scaled, SCAL=10)


def test_method_seeing_changes_one_object_for_the_block():
    a, b = Scaler(1), Scaler(1)
    assert method_global(a, 'apply', 'scaled') is scaled
    with method_seeing(a, 'apply', scaled=lambda x: -x):
        assert a.apply(3) == -2 and b.apply(3) == 7
    assert a.apply(3) == 7 and 'apply' not in vars(a)


def test_method_wrapped_wraps_one_objects_method_for_the_block():
    a, b = Scaler(1), Scaler(1)
    seen = []

    def noting(stock, x):
        seen.append(x)
        return -stock(x)

    with method_wrapped(a, 'apply', noting):
        assert a.apply(3) == -7 and b.apply(3) == 7
    assert seen == [3] and a.apply(3) == 7 and 'apply' not in vars(a)
