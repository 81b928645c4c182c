"""A task made of a TaskTable only, and a named stand-in encoder, for protocols that read features, not images."""
from __future__ import annotations

import numpy as np

from harness.tasks.base import Task, TaskTable


class NamedEncoder:
    """What a protocol reads of an encoder when its features are given: the name."""

    def __init__(self, name: str) -> None:
        self.name = name


class TableTask(Task):
    def __init__(self, table: TaskTable) -> None:
        self.name, self.table, self.skipped = "synthetic", table, []

    def load_image(self, i: int) -> np.ndarray:
        raise AssertionError("a protocol on given global features must not read images")

    def content_digest(self) -> str:
        return "synthetic"
