"""harness.common.ranges: one age limit for every task (CSV and DICOM alike)."""
import math

import pytest
from PIL import Image

from harness.common.ranges import MAX_PLAUSIBLE_AGE, plausible_age
from harness.tasks.csv_task import CsvTask
from harness.tasks.dicom_meta import parse_age


@pytest.mark.parametrize("years, kept", [(0.0, True), (0.5, True), (121.0, True), (124.9, True),
                                         (125.0, False), (155.0, False), (-0.1, False), (math.nan, False)])
def test_plausible_age(years, kept):
    got = plausible_age(years)
    assert (got == years) if kept else math.isnan(got)


def test_dicom_and_csv_tasks_share_the_limit(tmp_path):
    assert MAX_PLAUSIBLE_AGE == 125.0
    assert parse_age("122Y") == 122.0 and math.isnan(parse_age("125"))  # the DICOM reader
    for i in range(3):
        Image.new("L", (8, 8), 40 * i).save(tmp_path / f"{i}.png")
    (tmp_path / "labels.csv").write_text("image,patient_id,label_x,age\n0.png,p0,0,122\n1.png,p1,1,125\n2.png,p2,0,\n")
    age = CsvTask(tmp_path / "labels.csv").table.age  # the CSV reader
    assert age[0] == 122.0 and math.isnan(age[1]) and math.isnan(age[2])
