"""Tasks (datasets with labels, masks, demographics and patient ids): one table line per task, in the order of
``--list``. A task's module is imported only when it is built."""
from harness.tasks.base import TASKS, Task, TaskContext, TaskError, build_task  # noqa: F401

TASKS.register("csv", "harness.tasks.csv_task:csv_task", takes_arg=True,
               description="any labels.csv: image, label_*, patient_id[, mask, sex, age, split]")
TASKS.register("demo", "harness.tasks.demo:demo",
               description="synthetic chest-radiograph phantom, no download; 120 patients by default, a first run in "
                           "minutes (demo:n_patients=50,size=128 to resize): effusion, nodule, pneumothorax, "
                           "cardiomegaly; lung masks; sex, age")
TASKS.register("candid", "harness.tasks.candid:candid",
               description="CANDID-PTX: pneumothorax, chest tube, rib fracture labels; pneumothorax and chest-tube "
                           "masks; patient ids from the filename prefix")
TASKS.register("rsna", "harness.tasks.rsna:rsna",
               description="RSNA Pneumonia stage 2: pneumonia target and box masks; seeded patient split, or "
                           "published lists with rsna:splits=DIR")
TASKS.register("vindr", "harness.tasks.vindr:vindr",
               description="VinDr-CXR 1.0.0: 20 findings (6 global + 14 local), official test split; options "
                           "agg=majority|any|all, labels=default|all")
