"""harness.common stays cheap to import: only `devices` may load torch, and nothing loads the trainer, so the
trainer and the launchers can use it without pulling in the harness's heavy parts."""
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_common_modules_import_neither_torch_nor_the_trainer():
    code = ("import sys\n"
            "import harness.common.atomic, harness.common.hashing, harness.common.imaging, harness.common.options\n"
            "import harness.common.paths, harness.common.ranges\n"
            "print(sorted(m for m in ('torch', 'trainer', 'baselines', 'harness.tasks') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
