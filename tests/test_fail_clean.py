"""Fail fast, fail clean (issue 23): a careless user's bad inputs end within seconds with one ``error:`` line, the
exit status of docs/cli.md#exit-status, no traceback and nothing half-written.

The trainer's cases run as ``python -m trainer.train`` in a subprocess with a DataLoader worker, as a user runs it:
they used to hang for ever after the error, because the workers ignored SIGTERM. The subprocess timeout is a hang
detector, not a speed assertion. The other cases need no model and run in-process.
"""
from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import harness.features
import harness.run
from harness.common.errors import DataError, UsageError, command
from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.config import RANGES, TrainConfig, load_config
from trainer.data import SampleStream
from trainer.train import main as train_main
from trainer.train import train

REPO = Path(__file__).resolve().parents[1]
HANG = 60  # seconds: a tool that has not exited by then is hung, not slow

# A tiny run (as tests/test_train.py): ViT depth 2 at 32 px globals (patch 8), 2 locals of 16 px, 64 prototypes.
TINY = ["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32", "crops.global_size=32",
        "crops.local_size=16", "crops.n_local=2", "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
        "optim.batch_size_per_gpu=4", "optim.base_lr=0.002", "optim.warmup_iters=2", "data.num_workers=0",
        "run.log_every=1", "optim.freeze_last_layer_iters=1", "optim.warmup_teacher_temp_iters=3",
        "run.device=cpu"]
WORKER = "data.num_workers=1"  # the loader of the presets: worker processes, the ones that kept a failed run alive


def run_tool(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` in its own session; one that has not exited within HANG seconds is killed with its
    whole process group (loader workers included) and fails the test as hung."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"python -m {module} {' '.join(args)} hung: no exit within {HANG} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def one_error_line(err: str) -> str:
    """The stderr of a clean failure: no traceback, exactly one ``error:`` line, and it comes last."""
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip("\n").splitlines()[-1] == errors[0], err[-3000:]
    return errors[0]


def not_an_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"these bytes are no PNG")
    return path


# ----------------------------------------------------------------------------------------------------------------
# The trainer never hangs


def _missing_image(tmp_path: Path, images: Path) -> list[str]:
    (tmp_path / "missing.txt").write_text("images/a.png\n")
    return ["--data", str(tmp_path / "missing.txt")]


def _none_readable(tmp_path: Path, images: Path) -> list[str]:
    for i in range(5):
        not_an_image(tmp_path / "junk" / f"{i}.png")
    return ["--data", str(tmp_path / "junk"), "--skip-bad"]


def _undecodable_mid_run(tmp_path: Path, images: Path) -> list[str]:
    """A list whose first sample decodes (it is checked before the models are built) and whose second does not:
    the loader worker meets it in the first step."""
    good, bad = images / "00.png", not_an_image(tmp_path / "bad.png")
    manifest = tmp_path / "mixed.txt"
    manifest.write_text(f"{good}\n{bad}\n")
    if SampleStream([str(manifest)], seed=0).index_at(0) != 0:  # the stream's order: the good image first
        manifest.write_text(f"{bad}\n{good}\n")
    return ["--data", str(manifest), "optim.batch_size_per_gpu=2"]


@pytest.mark.parametrize("case, status, words, folder_left", [
    ("a manifest naming a missing image", 2, "1 of the 1 images it lists do not exist", False),
    ("--skip-bad with no readable image", 1, "unreadable images in a row", False),
    ("optim.base_lr=nan", 2, "optim.base_lr=nan: must be a finite number > 0", False),
    # Without KoLeo, whose own check wants 2 images, a batch of 0 passed the config's checks.
    ("optim.batch_size_per_gpu=0 loss.koleo_weight=0", 2, "optim.batch_size_per_gpu=0: must be >= 1", False),
    ("an image a loader worker cannot decode mid-run", 1, "cannot decode", True),
])
@pytest.mark.slow
def test_the_trainer_exits_with_one_line_whatever_stops_it(case, status, words, folder_left, blob_images, tmp_path):
    data = {"a manifest naming a missing image": _missing_image, "--skip-bad with no readable image": _none_readable,
            "an image a loader worker cannot decode mid-run": _undecodable_mid_run}.get(case)
    extra = data(tmp_path, blob_images) if data else ["--data", str(blob_images), *case.split()]
    overrides = [a for a in extra if re.fullmatch(r"[a-z_]+\.[a-z_]+=.*", a)]  # after the flags, all together
    flags = [a for a in extra if a not in overrides]
    run = tmp_path / "run"
    proc = run_tool("trainer.train", "--config", "smoke", "--steps", "3", "--output", str(run), *flags, *TINY, WORKER,
                    *overrides, cwd=tmp_path)
    assert proc.returncode == status, proc.stderr[-3000:]
    assert words in one_error_line(proc.stderr)
    assert run.exists() == folder_left, "a run that fails its checks before starting leaves no folder"


@pytest.mark.slow
def test_a_library_caller_s_uncaught_error_still_ends_the_process(blob_images, tmp_path):
    """Without the command-line wrapper the exception reaches the interpreter's top level with the loader's frames
    in its traceback: the closed loader's workers must still let the interpreter exit."""
    manifest = _undecodable_mid_run(tmp_path, blob_images)[1]
    script = (f"from trainer.config import load_config\nfrom trainer.train import train\n"
              f"cfg = load_config('smoke', {TINY + [WORKER, 'optim.batch_size_per_gpu=2']!r}, steps=3)\n"
              f"cfg.data.sources = [{manifest!r}]\ntrain(cfg, {str(tmp_path / 'run')!r})\n")
    (tmp_path / "caller.py").write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "caller.py"], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the caller hung: no exit within {HANG} s")
    assert proc.returncode == 1 and "BadImageError" in err, err[-3000:]


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_exits_130(blob_images, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", "--config", "smoke", "--data", str(blob_images),
                             "--output", str(run), "--steps", "500", *TINY, WORKER, "run.checkpoint_every=1000"],
                            cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + HANG
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group, loader worker included
    try:
        _, err = proc.communicate(timeout=HANG)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("Ctrl-C did not stop the run")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "stopped by SIGINT" in err
    stopped_at = max(json.loads(line)["iteration"] for line in metrics.read_text().splitlines())
    assert stopped_at < 500, "the run finished before Ctrl-C: nothing was tested"
    assert [p.name for p in list_checkpoints(run)] == [f"ckpt_{stopped_at:07d}"]


# ----------------------------------------------------------------------------------------------------------------
# The trainer checks everything before it makes the run folder or builds a model


@pytest.fixture
def no_models(monkeypatch):
    import trainer.train

    def never(cfg):
        raise AssertionError("a model was built before the command line was checked")

    monkeypatch.setattr(trainer.train, "SSLMetaArch", never)


def _trainer_usage_error(argv: list[str], capsys) -> str:
    capsys.readouterr()
    assert train_main(argv) == 2
    return one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("case, words", [
    ("--output is a file", "is a file; give a folder"),
    ("--output under a file", "which is a file; give a folder"),
    ("--output holds a run and no --resume", "already has checkpoints: pass --resume auto"),
    ("--resume of a folder that does not exist", "no such directory"),
    ("--resume of a folder that is no checkpoint", "not a checkpoint directory (no state.json)"),
    ("run.device=gpu", "run.device='gpu'"),
    ("a list with some missing images", "2 of the 3 images it lists do not exist"),
    ("run.seed=-1", "run.seed=-1: must be >= 0"),
    ("a .txt list that is not text", "not a text file"),
    ("model.pretrained=/no/such/file", "model.pretrained=/no/such/file: no such file or folder"),
])
def test_trainer_usage_errors_come_before_any_folder_or_model(case, words, blob_images, tmp_path, capsys,
                                                               no_models):
    (tmp_path / "file").write_text("x")
    run, extra = tmp_path / "run", []
    if case == "--output is a file":
        run = tmp_path / "file"
    elif case == "--output under a file":
        run = tmp_path / "file" / "run"
    elif case == "--output holds a run and no --resume":
        (run / "checkpoints" / "ckpt_0000004").mkdir(parents=True)
    elif case == "--resume of a folder that does not exist":
        extra = ["--resume", str(tmp_path / "gone")]
    elif case == "--resume of a folder that is no checkpoint":
        extra = ["--resume", str(blob_images)]
    elif case == "a list with some missing images":
        (tmp_path / "list.txt").write_text(f"{blob_images / '00.png'}\nnope1.png\nnope2.png\n")
        extra = ["--data", str(tmp_path / "list.txt")]
    elif case == "a .txt list that is not text":
        (tmp_path / "list.txt").write_bytes(bytes(range(128, 256)))
        extra = ["--data", str(tmp_path / "list.txt")]
    else:
        extra = [case]
    before = sorted(tmp_path.rglob("*"))
    argv = ["--config", "smoke", "--data", str(blob_images), "--output", str(run), "--steps", "2", *TINY, *extra]
    assert words in _trainer_usage_error(argv, capsys)
    assert sorted(tmp_path.rglob("*")) == before, "a failed check wrote something"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_a_device_this_machine_lacks_is_a_usage_error(blob_images, tmp_path, capsys, no_models):
    argv = ["--config", "smoke", "--data", str(blob_images), "--output", str(tmp_path / "run"), *TINY,
            "run.device=cuda"]
    assert "run.device=cuda: no CUDA device on this machine" in _trainer_usage_error(argv, capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, words", [
    ("optim.base_lr=inf", "optim.base_lr=inf: must be a finite number > 0"),
    ("optim.base_lr=0", "optim.base_lr=0.0: must be > 0"),
    ("optim.total_iters=0", "optim.total_iters=0: must be >= 1"),
    ("optim.warmup_iters=-1", "optim.warmup_iters=-1: must be >= 0"),
    ("optim.warmup_iters=5000", "optim.warmup_iters=5000 exceeds optim.total_iters=1000"),
    ("optim.momentum_teacher=1.5", "optim.momentum_teacher=1.5: must be in [0, 1]"),
    ("optim.adamw_betas=[0.9,1.0]", "optim.adamw_betas=[0.9, 1.0]: must be in [0, 1) (each value)"),
    ("optim.teacher_temp=0", "optim.teacher_temp=0.0: must be > 0"),
    ("loss.student_temp=nan", "loss.student_temp=nan: must be a finite number > 0"),
    ("loss.koleo_weight=-0.1", "loss.koleo_weight=-0.1: must be >= 0"),
    ("crops.global_scale=[0.9,0.3]", "crops.global_scale=[0.9, 0.3]: the first value must not exceed"),
    ("crops.n_local=-2", "crops.n_local=-2: must be >= 0"),
    ("head.out_dim=0", "head.out_dim=0: must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("run.checkpoint_every=0", "run.checkpoint_every=0: must be >= 1"),
    ("eval.val_fraction=1", "eval.val_fraction=1.0: must be in (0, 1)"),
])
def test_every_number_of_the_config_is_range_checked(override, words):
    with pytest.raises(ValueError) as e:
        load_config("smoke", [override])
    assert words in str(e.value)


def test_the_range_table_covers_every_number_of_the_schema():
    numeric = set()
    for section in TrainConfig.__dataclass_fields__.values():
        for f in section.default_factory.__dataclass_fields__.values():
            hint = str(f.type)
            if re.search(r"\b(int|float)\b", hint) and "str" not in hint:
                numeric.add(f"{section.name}.{f.name}")
    assert numeric == set(RANGES)


# ----------------------------------------------------------------------------------------------------------------
# Damaged checkpoints are named and skipped


@pytest.fixture(scope="module")
def trained_run(blob_images, tmp_path_factory) -> Path:
    """A tiny run of 4 steps with checkpoints at 2 and 4."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    cfg = load_config("smoke", [*TINY, "run.checkpoint_every=2"], steps=4)
    cfg.data.sources = [str(blob_images)]
    run = tmp_path_factory.mktemp("trained") / "run"
    train(cfg, run)
    torch.set_num_threads(before)
    return run


def damage(path: Path, how: str) -> None:
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "not YAML":
        path.write_text("model: {arch: [")
    elif how == "another iteration":
        path.write_text(json.dumps({"iteration": 3, "samples_seen": 12, "seed": 0}))


def resume_argv(images: Path, run: Path, *extra: str) -> list[str]:
    return ["--config", "smoke", "--data", str(images), "--output", str(run), "--steps", "4", *TINY,
            "run.checkpoint_every=2", "--resume", "auto", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("file, how", [("model.safetensors", "truncated"), ("optimizer.pt", "truncated"),
                                       ("state.json", "truncated"), ("config.yaml", "not YAML"),
                                       ("state.json", "another iteration")])
def test_resume_skips_a_damaged_latest_checkpoint_naming_its_file(file, how, trained_run, blob_images, tmp_path,
                                                                   one_thread, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    bad = run / "checkpoints" / "ckpt_0000004" / file
    damage(bad, how)
    assert train_main(resume_argv(blob_images, run)) == 0
    log = (run / "train.log").read_text()
    assert f"skipped 1 damaged checkpoint(s): {bad}" in log
    assert f"resumed from {run / 'checkpoints' / 'ckpt_0000002'} at iteration 2" in log
    load_checkpoint(run / "checkpoints" / "ckpt_0000004")  # written again, whole
    assert [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.slow
def test_resume_with_every_checkpoint_damaged_names_them_all(trained_run, blob_images, tmp_path, one_thread,
                                                             capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for ckpt in list_checkpoints(run):
        damage(ckpt / "model.safetensors", "truncated")
    assert train_main(resume_argv(blob_images, run)) == 1
    line = one_error_line(capsys.readouterr().err)
    assert f"every checkpoint of {run} is damaged" in line
    assert all(str(c / "model.safetensors") in line for c in list_checkpoints(run))


@pytest.mark.slow
def test_resume_of_a_damaged_checkpoint_by_name_points_at_auto(trained_run, blob_images, tmp_path, one_thread,
                                                               capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    ckpt = run / "checkpoints" / "ckpt_0000004"
    damage(ckpt / "optimizer.pt", "truncated")
    argv = [a for a in resume_argv(blob_images, run) if a != "auto"]
    argv.insert(argv.index("--resume") + 1, str(ckpt))
    assert train_main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(ckpt / "optimizer.pt") in line and "is damaged or unreadable" in line and "--resume auto" in line


@pytest.mark.slow
def test_a_partial_last_metrics_line_is_trimmed_with_a_warning(trained_run, blob_images, tmp_path, one_thread,
                                                               capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints" / "ckpt_0000004")  # killed after step 4, before its checkpoint
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 5, "lo')  # and in the middle of a line
    assert train_main(resume_argv(blob_images, run)) == 0
    assert "dropped a partial last line" in (run / "train.log").read_text()
    assert [json.loads(x)["iteration"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


@pytest.mark.slow
def test_a_damaged_metrics_line_before_the_last_is_named(trained_run, blob_images, tmp_path, one_thread, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{damaged", *lines[1:]]) + "\n")
    assert train_main(resume_argv(blob_images, run)) == 1
    assert f"{run / 'metrics.jsonl'}:2: not a metrics line" in one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_export_and_ckpt_name_the_damaged_file_and_the_intact_checkpoint(trained_run, tmp_path, capsys):
    from trainer.export import main as export_main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    bad = run / "checkpoints" / "ckpt_0000004" / "model.safetensors"
    damage(bad, "truncated")
    intact = run / "checkpoints" / "ckpt_0000002"
    capsys.readouterr()
    assert export_main([str(run), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(bad) in line and f"the newest intact checkpoint of {run} is {intact}" in line
    assert not (tmp_path / "hf").exists()
    assert harness.run.main(["--models", f"ckpt:{run}", "--tasks", "demo", "--out", str(tmp_path / "lb")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(bad) in line and str(intact) in line
    assert not (tmp_path / "lb").exists()


# ----------------------------------------------------------------------------------------------------------------
# The evaluation checks its flags and folders before any model loads




@pytest.mark.parametrize("flag, value, words", [
    ("--seed", "-1", "--seed -1: must be >= 0"),
    ("--dense-cache-gb", "-1", "--dense-cache-gb -1: must be >= 0"),
    ("--knn-temperature", "inf", "--knn-temperature inf: must be a finite number > 0"),
    ("--knn-temperature", "nan", "--knn-temperature nan: must be a finite number > 0"),
])
def test_evaluation_numeric_flags_are_range_checked_naming_the_flag(flag, value, words, tmp_path, capsys,
                                                                    nothing_built):
    assert harness.run.main(["--models", "pixels", "--tasks", "demo", "--out", str(tmp_path / "lb"), flag,
                             value]) == 2
    assert words in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "lb").exists()


@pytest.mark.parametrize("case, words", [
    ("--out under a file", "lies under"),
    ("--out whose splits/ is a file", "splits: is a file; give a folder"),
    ("--cache-dir is a file", "--cache-dir"),
    ("--out not writable", "--out"),
    ("--cache-dir not writable", "--cache-dir"),
])
def test_evaluation_folders_are_checked_before_any_model(case, words, tmp_path, capsys, monkeypatch,
                                                         nothing_built):
    (tmp_path / "file").write_text("x")
    (tmp_path / "cache").mkdir()
    out, cache = tmp_path / "lb", tmp_path / "cache"
    if case == "--out under a file":
        out = tmp_path / "file" / "lb"
    elif case == "--out whose splits/ is a file":
        out.mkdir()
        (out / "splits").write_text("x")
    elif case == "--cache-dir is a file":
        cache = tmp_path / "file"
    else:  # as root, chmod stops no write: the permission check itself is what is tested
        denied = tmp_path if case.startswith("--out") else cache
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == denied else real(p, mode))
    before = sorted(tmp_path.rglob("*"))
    assert harness.run.main(["--models", "pixels", "--tasks", "demo", "--out", str(out), "--cache-dir",
                             str(cache)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert words in line and ("not writable" in line) == case.endswith("not writable"), line
    assert sorted(tmp_path.rglob("*")) == before


def test_a_task_folder_that_cannot_be_written_stops_before_any_feature(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("features were extracted before the task's output folders were checked")

    monkeypatch.setattr(harness.features, "extract", never)
    out = tmp_path / "lb"
    (out / "results").mkdir(parents=True)
    (out / "results" / "demo-n_patients_8").write_text("x")  # where this task's per-model results go
    assert harness.run.main(["--models", "pixels", "--tasks", "demo:n_patients=8", "--out", str(out)]) == 2
    assert "results/demo-n_patients_8: is a file" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.rglob("*")) == ["demo-n_patients_8", "results"], "nothing half-written"


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_evaluation_device_is_checked_before_any_model(tmp_path, capsys, nothing_built):
    assert harness.run.main(["--models", "pixels", "--tasks", "demo", "--out", str(tmp_path / "lb"),
                             "--device", "cuda"]) == 2
    assert "--device cuda: no CUDA device on this machine" in one_error_line(capsys.readouterr().err)


def test_skip_bad_with_every_image_missing_says_so_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("image,label_a,patient_id\nx1.png,1,p1\nx2.png,0,p2\n")
    assert harness.run.main(["--models", "pixels", "--tasks", f"csv:{tmp_path / 'data' / 'labels.csv'}",
                             "--skip-bad", "--out", str(tmp_path / "lb")]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "has no image to evaluate: all 2 it lists were skipped" in line and "x1.png: file not found" in line
    assert not (tmp_path / "lb").exists()


@pytest.mark.parametrize("tol", ["nan", "-1", "inf"])
def test_leaderboard_check_tolerance_must_be_a_finite_non_negative_number(tol, tmp_path, capsys):
    from harness.leaderboard import main

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert main(["check", str(tmp_path / "a"), str(tmp_path / "b"), "--tol", tol]) == 2
    assert f"--tol {float(tol):g}: must be" in one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------------------------
# A failed ablation leaves no plan.json


@pytest.mark.parametrize("case, status, words", [
    ("an empty folder", 2, "lists no images"),
    ("a list with a missing image", 2, "1 of the 2 images it lists do not exist"),
    ("a first image that is no image", 1, "cannot decode"),
    ("--seed -1", 2, "--seed -1: must be >= 0"),
    ("--array-parallelism 0", 2, "--array-parallelism 0: must be >= 1"),
])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_failed_ablation_leaves_nothing(case, status, words, dry_run, blob_images, tmp_path, capsys, one_thread):
    from harness.ablate import main

    data, extra = blob_images, []
    if case == "an empty folder":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "a list with a missing image":
        data = tmp_path / "list.txt"
        data.write_text(f"{blob_images / '00.png'}\n{tmp_path / 'gone.png'}\n")
    elif case == "a first image that is no image":
        data = not_an_image(tmp_path / "junk" / "0.png").parent
    else:
        extra = case.split()
    out = tmp_path / "abl"
    argv = ["--config", "smoke", "--data", str(data), "--output", str(out), "--steps", "2", "--eval-task",
            "demo:n_patients=24,size=64:linear", *[f"--override={o}" for o in TINY], "--axes", "mim=on,off", *extra]
    assert main([*argv, *(["--dry-run"] if dry_run else [])]) == status
    assert words in one_error_line(capsys.readouterr().err)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------------
# One error path for every tool


TOOLS = ["harness.run", "harness.ablate", "harness.leaderboard", "harness.plot", "harness.cli", "trainer.train",
         "trainer.export", "trainer.plot", "trainer.monitor", "slurm.pretrain", "slurm.sweep",
         "harness.figures.learning_curve"]


def test_every_command_line_tool_goes_through_the_one_error_path():
    mains = {str(p.relative_to(REPO).with_suffix("")).replace(os.sep, ".")
             for folder in ("harness", "trainer", "slurm", "baselines") for p in (REPO / folder).rglob("*.py")
             if 'if __name__ == "__main__":' in p.read_text()}
    assert mains == set(TOOLS)
    for name in TOOLS:
        assert hasattr(importlib.import_module(name).main, "__wrapped__"), f"{name}.main is not a @command"


@pytest.mark.parametrize("error, status, line", [
    (UsageError("--x 3: must be <= 2"), 2, "error: --x 3: must be <= 2"),
    (DataError("a.png: cannot decode;\n  fix it"), 1, "error: a.png: cannot decode; fix it"),
    (FileNotFoundError("b.csv not found"), 1, "error: b.csv not found"),
    (KeyError("k"), 1, "error: 'k'"),
    (type("SafetensorError", (Exception,), {})("header too small\nmore"), 1,
     "error: SafetensorError: header too small (an unexpected error; -v prints its traceback)"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
@pytest.mark.parametrize("verbose", [False, True])
def test_the_error_path_maps_each_failure_to_its_status_and_one_line(error, status, line, verbose, capsys):
    @command
    def tool(argv: list[str] | None = None) -> int:
        raise error

    assert tool(["-v"] if verbose else []) == status
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == line
    assert ("Traceback" in err) == verbose
