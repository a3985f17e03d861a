import math

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


@pytest.mark.parametrize(
    ("value", "is_int", "is_real"),
    [(3, True, True), (True, False, False), (2.5, False, True), ("3", False, False), (None, False, False)],
)
def test_is_int_and_is_real_refuse_bool(value, is_int, is_real):
    assert (checks.is_int(value), checks.is_real(value)) == (is_int, is_real)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (-1, ValueError, r"^warmup must be an int >= 0, got -1$"),
        (1.0, TypeError, r"^warmup must be an int >= 0, got 1.0 of type float$"),
        (False, TypeError, r"^warmup must be an int >= 0, got False of type bool$"),
    ],
)
def test_int_at_least_names_the_argument_the_value_and_the_minimum(value, error, message):
    assert checks.int_at_least("warmup", 0, 0) == 0
    with pytest.raises(error, match=message):
        checks.int_at_least("warmup", value, 0)


@pytest.mark.parametrize("value", [-1, "3", True, 2.0, None])
def test_saved_int_refuses_anything_but_an_int_with_a_value_error(value):
    assert checks.saved_int("state_dict['position']", 4, 0) == 4
    with pytest.raises(ValueError, match=rf"^state_dict\['position'\] must be an int >= 0, got {value!r}$"):
        checks.saved_int("state_dict['position']", value, 0)


def test_real_number_and_number_in():
    assert checks.real("gamma", 2) == 2
    with pytest.raises(TypeError, match=r"^gamma must be a number, got True of type bool$"):
        checks.real("gamma", True)
    with pytest.raises(ValueError, match=r"^gamma must be a finite number, got inf$"):
        checks.real("gamma", math.inf)
    assert checks.number("growth", math.inf) == math.inf  # the range is the caller's to check
    with pytest.raises(TypeError, match=r"^growth must be a number > 1, got '2' of type str$"):
        checks.number("growth", "2", "a number > 1")
    assert checks.number_in("z", 3, "a finite number > 0", lambda value: value > 0) == 3.0
    for bad, error in ((0, ValueError), (math.nan, ValueError), (math.inf, ValueError), ("1", TypeError)):
        with pytest.raises(error, match=r"^z must be a finite number > 0, got "):
            checks.number_in("z", bad, "a finite number > 0", lambda value: value > 0)


@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_flag_takes_true_or_false_only(value):
    assert checks.flag("sync", True) is True
    with pytest.raises(TypeError, match=rf"^sync must be True or False, got {value!r} of type"):
        checks.flag("sync", value)
