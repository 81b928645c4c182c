"""Tasks (datasets with labels, masks, demographics and patient ids). Add one import line per new file."""
from harness.tasks.base import Task, TaskContext, TaskError, build_task, register_task  # noqa: F401

from harness.tasks import csv_task  # noqa: F401,E402
from harness.tasks import demo  # noqa: F401,E402
from harness.tasks import candid, rsna, vindr  # noqa: F401,E402  (DICOM datasets in their official layouts)
