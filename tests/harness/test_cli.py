"""The `raddino-bench` console script: light top-level help, dispatch to the python -m tools (same parsers, with
their examples), plot's choice of tool by folder, and clear exits for unknown commands."""
from __future__ import annotations

import subprocess
import sys
import tomllib
import types

import pytest

from harness import cli
from tests.conftest import REPO


def test_pyproject_declares_the_console_script():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"raddino-bench": "harness.cli:main"}


@pytest.mark.slow
def test_top_level_help_imports_nothing_heavy():
    code = ("import sys\nfrom harness.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
            "    code = e.code\nheavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', "
            "'baselines', 'sklearn', 'polars', 'trainer', 'slurm', 'tqdm'))\nprint('exit', code, heavy)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "exit 0 []", proc.stdout
    for name in cli.COMMANDS:
        assert f"\n  {name} " in proc.stdout  # every command listed with its summary


def test_unknown_command_suggests_one(capsys):
    assert cli.main(["evl", "--models", "pixels"]) == 2
    assert capsys.readouterr().err == ("error: unknown command 'evl' (did you mean 'eval'?); commands: "
                                       + ", ".join(cli.COMMANDS) + "\n")


@pytest.mark.parametrize("name", [n for n in cli.COMMANDS if n != "plot"])
def test_every_command_has_its_tools_help_with_examples(name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: raddino-bench {name} ")
    examples = out[out.index("\nexamples:\n"):].splitlines()[2:]
    assert len([line for line in examples if line.startswith(f"  raddino-bench {name}")]) >= 2, out


def test_eval_is_harness_run(capsys):
    assert cli.main(["eval", "--models", "no-such-model", "--tasks", "demo"]) == 2
    assert "unknown encoder 'no-such-model'" in capsys.readouterr().err


def test_ls_lists_encoders_tasks_and_protocols(tmp_path, capsys):
    assert cli.main(["ls", "--weights-dir", str(tmp_path)]) == 0
    first = {line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert {"encoder", "pixels", "task", "demo", "csv", "protocol", "linear"} <= first
    assert cli.main(["ls", "--weights-dir", str(tmp_path / "gone")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_check_is_the_leaderboard_check(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "demo.md").write_text("# Leaderboard\n")
    assert cli.main(["check", str(tmp_path / "a"), str(tmp_path / "b")]) == 1  # committed folder lacks demo.md
    assert "demo.md" in capsys.readouterr().out


def test_plot_picks_the_tool_by_what_the_folder_holds(tmp_path, monkeypatch, capsys):
    import trainer.plot

    calls = []
    monkeypatch.setattr(trainer.plot, "main", lambda argv, prog: calls.append(("trainer", argv, prog)) or 0)
    fake = types.ModuleType("harness.plot")
    fake.main = lambda argv: calls.append(("harness", argv)) or 0  # prog is optional for a tool
    monkeypatch.setitem(sys.modules, "harness.plot", fake)
    run, out = tmp_path / "run", tmp_path / "out"
    run.mkdir()
    out.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    assert cli.main(["plot", str(run), "--out", "x.png"]) == 0
    assert cli.main(["plot", "--task", "demo", str(out)]) == 0
    assert calls == [("trainer", [str(run), "--out", "x.png"], "raddino-bench plot"),
                     ("harness", ["--task", "demo", str(out)])]

    monkeypatch.setitem(sys.modules, "harness.plot", None)  # as when the module is not installed
    capsys.readouterr()
    assert cli.main(["plot", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs harness.plot" in err and len(err.splitlines()) == 1
    assert cli.main(["plot", str(tmp_path / "gone")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert cli.main(["plot", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: raddino-bench plot FOLDER")


def test_an_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(name, argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_command", interrupted)
    assert cli.main(["eval"]) == 130
    assert capsys.readouterr().err == "interrupted\n"
