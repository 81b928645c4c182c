"""Evaluation protocols on frozen features. Each registers itself on import; add one line per new file."""
from harness.probes import linear  # noqa: F401
