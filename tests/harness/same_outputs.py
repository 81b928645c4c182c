"""Comparing the files of two runs of the same evaluation, the second reading the first's cached features."""
import json
import re
from pathlib import Path

#: What the cost section adds to a rate the feature cache served (harness.cost): where it came from, and when.
CACHED = re.compile(r"; feature cache, \d{4}-\d{2}-\d{2}")


def _without_source(md: str) -> str:
    """The leaderboard without the cached-rate marker, and without the padding of its table cells and rules (a
    longer cell widens its whole column)."""
    return re.sub(r"-{2,}", "-", re.sub(r" {2,}", " ", CACHED.sub("", md)))


def assert_same_but_the_rate_source(first: Path, second: Path) -> None:
    """`first` and `second` hold the same bytes, except that a rate served by the feature cache says so: in the
    leaderboard's cost section and as the ``source`` of the results JSON's cost. The rate itself is the same
    number, the one measured when the features were computed."""
    a, b = first.read_bytes(), second.read_bytes()
    if first.suffix == ".md":
        assert _without_source(b.decode()) == _without_source(a.decode()), second
    elif first.suffix == ".json" and "cost" in json.loads(a):
        x, y = json.loads(a), json.loads(b)
        for d in (x, y):
            if d["cost"]["throughput"] is not None:
                d["cost"]["throughput"]["source"] = "either"
        assert x == y, second
    else:
        assert a == b, second


def assert_same_leaderboard(first: str, second: str) -> None:
    """Two runs' leaderboard texts are the same but for the second saying its rate came from the feature cache."""
    assert _without_source(second) == _without_source(first)
