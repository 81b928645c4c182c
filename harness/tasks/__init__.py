"""Tasks (datasets with labels, masks, demographics and patient ids). Add one import line per new file."""
from harness.tasks.base import Task, TaskContext, TaskError, build_task, register_task  # noqa: F401 (the package's API)

from harness.tasks import csv_task  # noqa: F401 (registers csv:PATH)
from harness.tasks import demo  # noqa: F401 (registers demo)
from harness.tasks import candid, rsna, vindr  # noqa: F401 (registers the DICOM datasets, official layouts)
