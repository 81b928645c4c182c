"""Evaluation protocols on frozen features. Each registers itself on import; add one line per new file.

Order matters: protocols run, and their sections appear in a leaderboard, in registration order. The k-NN probe
and the label-efficiency curves follow the linear probe, whose section they are read beside; demographics reuses
the linear probe's predictions (its subgroup view) when the linear protocol has run first.
"""
from harness.probes import linear  # noqa: F401 (registers the linear probe)  isort: skip
from harness.probes import knn  # noqa: F401 (registers the k-NN probe)  isort: skip
from harness.probes import label_efficiency  # noqa: F401 (registers the label-efficiency curves)  isort: skip
from harness.probes import segmentation  # noqa: F401 (registers the segmentation heads)  isort: skip
from harness.probes import demographics  # noqa: F401 (registers the demographics protocol)  isort: skip
