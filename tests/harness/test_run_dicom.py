"""End to end: `python -m harness.run` on generated VinDr-CXR, CANDID-PTX and RSNA look-alikes, in their
distributed layouts under one --data-root, with no conversion step."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import polars as pl
import pytest

from harness.splits import pseudonym
from tests.conftest import REPO
from tests.harness.tasks.dicom_fixtures import make_all


@pytest.mark.slow
def test_cli_runs_the_three_dicom_datasets(tmp_path):
    vindr, candid, rsna = make_all(tmp_path / "data", extra=16)
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "RADDINO_BENCH_CACHE": str(tmp_path / "digests")}
    cmd = [sys.executable, "-m", "harness.run", "--models", "pixels", "--tasks", "vindr,candid,rsna",
           "--data-root", str(tmp_path / "data"), "--out", str(out), "--cache-dir", str(cache), "--bootstrap", "50"]
    run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for task, n_images in (("vindr", len(vindr.train_ids) + len(vindr.test_ids)), ("candid", len(candid.uids)),
                           ("rsna", len(rsna.ids))):
        assert (out / f"{task}.md").is_file(), task
        result = json.loads((out / "results" / task / "pixels.json").read_text())
        assert result["dataset"]["images"] == n_images
    # VinDr keeps its official test split: exactly the test images are in the test split.
    split = {row.split(",")[0]: row.split(",")[2] for row in (out / "splits" / "vindr.csv").read_text().splitlines()
             if row and not row.startswith("#") and not row.startswith("image_id")}
    assert {i for i, s in split.items() if s == "test"} == set(vindr.test_ids)
    # No patient identifier anywhere in what was written: CANDID patient ids, RSNA patientIds (= DICOM PatientID).
    files = [p for p in out.rglob("*") if p.suffix in (".md", ".json", ".csv", ".parquet")]
    assert {p.suffix for p in files} == {".md", ".json", ".csv", ".parquet"}
    written = "".join(str(pl.read_parquet(p).to_dicts()) if p.suffix == ".parquet" else p.read_text()
                      for p in files)
    for secret in set(candid.patients.values()) | set(rsna.ids):
        assert secret not in written, secret
    assert pseudonym(rsna.ids[0], "rsna") in written  # the RSNA rows are there, under their pseudonyms
    # Second run (linear protocol only, to keep the test short): nothing changed, so the content digests
    # match and every feature comes from the cache.
    cmd[cmd.index("vindr,candid,rsna")] = "vindr:linear,candid:linear,rsna:linear"
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "computed features" not in again.stdout
