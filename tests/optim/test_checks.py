import pytest

from engine_opt.optim import checks


@pytest.mark.parametrize("value", [1, 7])
def test_positive_int_accepts(value):
    assert checks.positive_int("n", value) == value


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (-3, ValueError), (2.0, TypeError), (False, TypeError)])
def test_positive_int_refuses_with_the_name_and_value(value, error):
    with pytest.raises(error, match=rf"^n must be a positive int, got {value!r}"):
        checks.positive_int("n", value)


def test_mapping_and_known_keys():
    assert checks.mapping("cfg", {"a": 1}) == {"a": 1}
    with pytest.raises(TypeError, match=r"cfg must be a dict, got \[1\] of type list"):
        checks.mapping("cfg", [1])
    checks.known_keys("cfg", ["a"], ["a", "b"])
    with pytest.raises(ValueError, match=r"cfg got unknown key\(s\) \['c'\]; accepted: \['a', 'b'\]"):
        checks.known_keys("cfg", ["a", "c"], ["b", "a"])
