"""The one registry behind encoders, tasks and protocols: lazy entries, did-you-mean errors, dependency order, and
imports that load no encoder family."""
import os
import subprocess
import sys

import pytest

from baselines.registry import ENCODERS, build_encoder
from harness.probes import PROTOCOLS
from harness.registry import Entry, Registry, RegistryError, UnknownName
from harness.run import main
from harness.taskspec import read_task
from harness.tasks.base import TaskContext, TaskError, build_task
from tests.conftest import REPO


def _protocols(*lines: tuple[str, tuple[str, ...]]) -> Registry[Entry]:
    table: Registry[Entry] = Registry("protocol", Entry)
    for name, after in lines:
        table.register(name, f"nowhere.{name.replace('-', '_')}:run", after=after)
    return table


def test_unknown_names_suggest_the_closest_in_one_line():
    with pytest.raises(UnknownName) as err:
        build_encoder("rad-dion")
    msg = str(err.value)
    assert msg.startswith("unknown encoder 'rad-dion' (did you mean 'rad-dino'?)") and "\n" not in msg
    assert "registered: pixels, random-vit, rad-dino" in msg  # table order
    with pytest.raises(TaskError, match=r"unknown task 'dmeo' \(did you mean 'demo'\?\)"):
        build_task("dmeo", None, TaskContext())
    with pytest.raises(UnknownName, match=r"unknown protocol 'linaer' \(did you mean 'linear'\?\)"):
        PROTOCOLS.get("linaer")
    # Nothing close: no suggestion, just what is registered.
    assert "did you mean" not in PROTOCOLS.unknown("zzz") and "; registered: linear, knn" in PROTOCOLS.unknown("zzz")


def test_the_cli_prints_the_suggestion_as_one_error_line(capsys):
    assert main(["--models", "pixles", "--tasks", "demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith("error: unknown encoder 'pixles' (did you mean 'pixels'?)")


def test_dependencies_come_first_and_ties_keep_table_order():
    table = _protocols(("linear", ()), ("knn", ()), ("demographics", ("linear",)), ("seg", ()),
                       ("report", ("seg", "demographics")))
    assert table.ordered(["demographics"]) == ("linear", "demographics")  # pulled in
    assert table.ordered(["seg", "knn", "linear"]) == ("linear", "knn", "seg")  # table order, not request order
    assert table.ordered(["report"]) == ("linear", "demographics", "seg", "report")
    assert table.ordered(table) == ("linear", "knn", "demographics", "seg", "report")
    # A dependency listed after its dependant in the table still runs first.
    late = _protocols(("summary", ("base",)), ("base", ()))
    assert late.ordered(["summary"]) == ("base", "summary")


def test_bad_dependencies_are_clear_errors():
    with pytest.raises(RegistryError, match=r"'demographics' runs after 'linaer', which is not registered "
                                            r"\(unknown protocol 'linaer' \(did you mean 'linear'\?\)"):
        _protocols(("linear", ()), ("demographics", ("linaer",))).ordered(["demographics"])
    with pytest.raises(RegistryError, match="'a', 'b' depend on each other in a cycle"):
        _protocols(("a", ("b",)), ("b", ("a",)), ("c", ())).ordered(["a", "c"])
    with pytest.raises(RegistryError, match="registered twice"):
        _protocols(("a", ()), ("a", ()))
    with pytest.raises(RegistryError, match="not of the form 'package.module:name'"):
        Registry("encoder", Entry).register("x", "baselines.floors.pixels")


def test_the_real_table_runs_demographics_after_the_linear_probe():
    assert PROTOCOLS.get("demographics").after == ("linear",)
    assert read_task("demo:demographics").protocols == ("linear", "demographics")
    assert read_task("demo").protocols == ("linear", "knn", "seg", "demographics")
    assert read_task("demo:label-efficiency").protocols == ("label-efficiency",)


def test_entries_are_loaded_on_first_use_only(tmp_path, monkeypatch):
    package = f"lazy_{tmp_path.name.replace('-', '_')}"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / "thing.py").write_text("LOADS = []\n\ndef make():\n    return 'made'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    table: Registry[Entry] = Registry("thing", Entry)
    table.register("thing", f"{package}.thing:make")
    assert f"{package}.thing" not in sys.modules  # registering imports nothing
    assert table.load("thing")() == "made" and f"{package}.thing" in sys.modules


# Modules that only building (or listing the weights of) a pretrained model may load, besides each encoder's own
# module (read from the table in the test, so a new encoder needs no line here): their shared helpers and the model
# libraries.
FAMILIES = ("baselines._hf", "baselines._common", "open_clip", "transformers", "timm", "health_multimodal", "matplotlib")


@pytest.mark.slow
@pytest.mark.parametrize("module", ["harness.stats", "harness.probes.linear", "harness.evaluate", "harness.run"])
def test_importing_the_harness_loads_no_encoder_family(module):
    """In a fresh interpreter: the statistics, a protocol and the CLI module import no model family, no model
    library and no other protocol's or task's module (each is imported when it is used)."""
    script = (f"import sys, {module}\n"
              "print('\\n'.join(sorted(sys.modules)))\n")
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert run.returncode == 0, run.stderr
    loaded = set(run.stdout.split())
    assert {m for m in loaded if any(m == f or m.startswith(f + ".") for f in FAMILIES)} == set(), module
    others = {m for m in loaded if m.startswith(("harness.probes.", "harness.tasks."))}
    assert others <= {module, "harness.tasks.base"}, others
    assert {e.target.partition(":")[0] for e in ENCODERS.entries.values()} & loaded == set()
