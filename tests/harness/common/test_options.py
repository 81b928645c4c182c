"""harness.common.options: the KEY=VALUE parser every task's argument goes through."""
import pytest

from harness.common.options import parse_options
from harness.tasks.base import TaskError

ALLOWED = {"agg": ("any", "majority"), "splits": None, "n": int, "p": float}


def test_values_are_checked_and_converted():
    assert parse_options("t", "agg=any, splits=/a/b.csv ,n=3,p=0.5", ALLOWED) == {
        "agg": "any", "splits": "/a/b.csv", "n": 3, "p": 0.5}
    assert parse_options("t", None, ALLOWED) == {} == parse_options("t", "", ALLOWED)
    assert parse_options("t", "n=1,,n=2,", ALLOWED) == {"n": 2}  # empty pieces are skipped; the last value wins


@pytest.mark.parametrize("arg, message", [
    ("agg=mean", r"task 'vindr': agg='mean' is not one of \['any', 'majority'\]"),
    ("n=big", r"task 'vindr': n='big' is not a valid int"),
    ("p=", r"task 'vindr': p='' is not a valid float"),
    ("nn=3", r"task 'vindr': unknown option 'nn=3'; options are agg=<any\|majority>, splits=<value>, n=<int>, "
             r"p=<float>"),
    ("agg", r"unknown option 'agg'"),  # no '=': named as given, with the options it could have meant
])
def test_errors_name_the_task_the_key_and_the_choices(arg, message):
    with pytest.raises(ValueError, match=message):
        parse_options("vindr", arg, ALLOWED)


def test_the_callers_error_type_and_no_options():
    with pytest.raises(TaskError, match="task 'candid': unknown option 'x=1'; it takes no options"):
        parse_options("candid", "x=1", {}, TaskError)
