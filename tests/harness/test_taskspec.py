"""The task mini-language: the documented --tasks syntax, --task-arg, --protocols and their one-line errors.
Pure functions over given names: nothing here imports torch or builds a task."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.taskspec import (TaskSpec, UsageError, apply_task_args, parse_protocols, parse_task_arg,
                              parse_task_list, parse_task_spec, suggest)

PROTOCOLS = ("linear", "knn", "label-efficiency", "seg", "demographics")
DEFAULT = ("linear", "knn", "seg", "demographics")
PATH_TASKS = {"csv"}


def specs(text: str, default: tuple[str, ...] = DEFAULT) -> list[tuple[str, str | None, tuple[str, ...]]]:
    return [(s.name, s.arg, s.protocols) for s in parse_task_list(text, PROTOCOLS, default)]


@pytest.mark.parametrize("text, expected", [
    ("demo", [("demo", None, DEFAULT)]),
    ("demo:linear", [("demo", None, ("linear",))]),
    ("demo:n_patients=50,size=128", [("demo", "n_patients=50,size=128", DEFAULT)]),
    ("demo:n_patients=8,size=64:linear,rsna", [("demo", "n_patients=8,size=64", ("linear",)), ("rsna", None, DEFAULT)]),
    ("demo:n_patients=50,size=128,csv:/a.csv,vindr",
     [("demo", "n_patients=50,size=128", DEFAULT), ("csv", "/a.csv", DEFAULT), ("vindr", None, DEFAULT)]),
    ("csv:/a/b/labels.csv:label-efficiency", [("csv", "/a/b/labels.csv", ("label-efficiency",))]),
    ("csv:/a/b:c.csv", [("csv", "/a/b:c.csv", DEFAULT)]),  # a ':' in a path is the path's when no protocol follows
    ("vindr:agg=any, rsna:splits=/x/RSNA ,", [("vindr", "agg=any", DEFAULT), ("rsna", "splits=/x/RSNA", DEFAULT)]),
    ("demo:n_patients=8,size=64:lineer", [("demo", "n_patients=8,size=64:lineer", DEFAULT)]),  # judged by the checks
])
def test_documented_syntax(text, expected):
    assert specs(text) == expected


def test_text_is_the_spec_as_written():
    assert [s.text for s in parse_task_list("demo:n_patients=8, size=64:linear,csv:/a.csv", PROTOCOLS, DEFAULT)] == [
        "demo:n_patients=8,size=64:linear", "csv:/a.csv"]


@pytest.mark.parametrize("text, words", [
    ("demo:linear,size=64", ["option 'size=64' comes after the protocol of 'demo:linear'", "demo:...,size=64:linear"]),
    ("n_patients=5,demo", ["'n_patients=5' is a KEY=VALUE option with no task before it", "TASK:n_patients=5"]),
    ("demo,n_patients=5", ["option 'n_patients=5' follows 'demo', which has no ':'", "demo:n_patients=5"]),
    (":linear", ["no task name"]),
    (" , ,", ["names no task"]),
])
def test_malformed_task_lists_are_one_line_errors(text, words):
    with pytest.raises(UsageError) as e:
        parse_task_list(text, PROTOCOLS, DEFAULT)
    assert "\n" not in str(e.value)
    for w in words:
        assert w in str(e.value)


def _regex_split(tasks: str) -> list[str]:
    """The splitter this parser replaced (harness.run.split_task_list before issue 12): the reference its
    behaviour on well-formed input is compared with."""
    out: list[str] = []
    for piece in (t.strip() for t in tasks.split(",")):
        if not piece:
            continue
        if out and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=[^:]*(:[A-Za-z_-]+)?", piece):
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def _old_spec(spec: str) -> tuple[str, str | None, tuple[str, ...]]:
    """The spec reader it replaced (harness.run.parse_task_spec before issue 12)."""
    name, _, rest = spec.partition(":")
    protocols = DEFAULT
    if rest:
        head, _, tail = rest.rpartition(":")
        if tail in PROTOCOLS:
            protocols, rest = (tail,), head
    return name, rest or None, protocols


PIECES = st.sampled_from(["demo", "csv", "vindr", "demo:linear", "csv:/d/labels.csv", "csv:/d/x:y.csv",
                          "n_patients=8", "size=64:linear", "agg=any:knn", "size=64:lineer", "a=b:c:d", "x=1",
                          "demo:n=1", "rsna:splits=/x/RSNA", " seg ", "", "csv:/d/l.csv:seg", "k=v:label-efficiency"])


@pytest.mark.slow
@settings(max_examples=400, derandomize=True, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=6))
def test_same_specs_as_the_regex_splitter_on_every_input_it_accepts(pieces):
    text = ",".join(pieces)
    try:
        new = specs(text)
    except UsageError:
        # Refused input: the old splitter handed it on as a task the harness could not read (an option-like
        # name, or options after a protocol, which the task then failed to parse).
        old = [_old_spec(s) for s in _regex_split(text)]
        assert not old or any("=" in n or any(p.rpartition(":")[2] in PROTOCOLS for p in (a or "").split(","))
                              for n, a, _ in old), (text, old)
        return
    assert new == [_old_spec(s) for s in _regex_split(text)], text


def test_one_spec_keeps_commas_in_its_argument():
    s = parse_task_spec("csv:/data/a,b/labels.csv:linear", PROTOCOLS, DEFAULT)
    assert (s.name, s.arg, s.protocols) == ("csv", "/data/a,b/labels.csv", ("linear",))


def test_protocols_flag_sets_the_default_in_registry_order():
    default = parse_protocols("knn, linear", PROTOCOLS)
    assert default == ("linear", "knn")  # the order they run in, whatever the order given
    assert specs("demo,csv:/a.csv:seg", default) == [("demo", None, ("linear", "knn")), ("csv", "/a.csv", ("seg",))]
    with pytest.raises(UsageError, match=r"unknown protocol 'knnn' \(did you mean 'knn'\?\)"):
        parse_protocols("linear,knnn", PROTOCOLS)
    with pytest.raises(UsageError, match="names no protocol"):
        parse_protocols(",", PROTOCOLS)


def test_task_arg_gives_a_path_with_a_comma_and_adds_options():
    base = parse_task_list("csv,demo:size=64:linear", PROTOCOLS, DEFAULT)
    out = apply_task_args(base, ["csv.path=/data/a,b/labels.csv", "demo.n_patients=50"], PATH_TASKS)
    assert out[0] == TaskSpec("csv", "/data/a,b/labels.csv", DEFAULT)
    assert out[1] == TaskSpec("demo", "size=64,n_patients=50", ("linear",))
    assert out[0].text == "csv --task-arg csv.path=/data/a,b/labels.csv"
    assert base[0].arg is None  # the input list is not changed
    # Every task of that name gets it.
    both = apply_task_args(parse_task_list("demo,demo:knn", PROTOCOLS, DEFAULT), ["demo.size=32"], PATH_TASKS)
    assert [s.arg for s in both] == ["size=32", "size=32"]


@pytest.mark.parametrize("task_arg, tasks, words", [
    ("demo", "demo", ["expected NAME.KEY=VALUE"]),
    ("demo.n_patients", "demo", ["expected NAME.KEY=VALUE"]),
    ("n_patients=5", "demo", ["expected NAME.KEY=VALUE"]),
    ("demo.=5", "demo", ["expected NAME.KEY=VALUE"]),
    ("demo.size=", "demo", ["the value is empty"]),
    ("dmeo.size=5", "demo,csv:/a.csv", ["task 'dmeo' is not in --tasks (did you mean 'demo'?)"]),
    ("csv.file=/a.csv", "csv", ["takes one argument, its file: --task-arg csv.path=FILE"]),
    ("csv.path=/b.csv", "csv:/a.csv", ["already has its file '/a.csv'"]),
    ("demo.size=64", "demo:size=32", ["already sets size"]),
    ("rsna.splits=/x,y", "rsna", ["cannot hold a comma"]),
])
def test_task_arg_errors_are_one_line(task_arg, tasks, words):
    with pytest.raises(UsageError) as e:
        apply_task_args(parse_task_list(tasks, PROTOCOLS, DEFAULT), [task_arg], PATH_TASKS)
    assert "\n" not in str(e.value) and f"--task-arg {task_arg!r}" in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_task_arg_value_is_verbatim():
    assert parse_task_arg("csv.path=/d/x=1:2,3.csv") == ("csv", "path", "/d/x=1:2,3.csv")


def test_suggest_names_the_closest_registered_name_or_nothing():
    assert suggest("lineer", PROTOCOLS) == " (did you mean 'linear'?)"
    assert suggest("demographic", PROTOCOLS) == " (did you mean 'demographics'?)"
    assert suggest("zzz", PROTOCOLS) == ""
