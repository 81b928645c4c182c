"""trainer.train and trainer.config: the loop, DDP on gloo, kill-and-resume, preemption, a smoke run on real CXRs."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import save_file

from trainer.checkpoint import latest_checkpoint, list_checkpoints, load_backbone
from trainer.config import load_config
from trainer.losses import DINOLoss
from trainer.meta_arch import SSLMetaArch
from trainer.train import main, train

from tests.conftest import REPO
from tests.trainer.tiny_run import TINY, read_metrics, tiny_cfg


# In-process training on one thread (the `one_thread` fixture of conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------------------------
# Config


def test_presets_follow_the_reference():
    rd = load_config("rad-dino")
    assert (rd.model.arch, rd.model.patch_size, rd.crops.global_size, rd.head.out_dim) == ("vit_base", 14, 518, 65536)
    assert (rd.loss.dino_weight, rd.loss.ibot_weight, rd.loss.koleo_weight) == (1.0, 1.0, 0.1)
    assert rd.optim.scaled_lr(world_size=16) == pytest.approx(4e-3 * (64 * 16 / 1024) ** 0.5)
    smoke = load_config("smoke")
    assert smoke.model.arch == "vit_tiny" and smoke.crops.global_size == 112


def test_yaml_overrides_and_steps(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"base": "smoke", "optim": {"base_lr": 1e-4}, "crops.n_local": 4}))
    cfg = load_config(str(path), ["optim.weight_decay=0", "crops.global_scale=[0.5, 1]"], steps=100)
    assert cfg.optim.base_lr == 1e-4 and cfg.crops.n_local == 4 and cfg.optim.weight_decay == 0.0
    assert cfg.crops.global_scale == (0.5, 1.0)
    smoke = load_config("smoke")
    assert cfg.optim.total_iters == 100  # --steps keeps each warm-up's share of the run
    assert cfg.optim.warmup_iters == round(smoke.optim.warmup_iters * 100 / smoke.optim.total_iters)
    assert load_config("smoke", ["optim.warmup_iters=7"], steps=100).optim.warmup_iters == 7  # explicit wins
    for bad, message in [("optim.lr=1", "unknown key 'optim.lr'"), ("optim.base_lr=fast", "expected float"),
                         ("crops.global_size=100", "multiple of model.patch_size"),
                         ("loss.centering=kmeans", "sinkhorn_knopp")]:
        with pytest.raises(ValueError, match=message):
            load_config("smoke", [bad])
    with pytest.raises(ValueError, match="neither a preset"):
        load_config(str(tmp_path / "missing.yaml"))


# ----------------------------------------------------------------------------------------------------------------
# Optimiser pieces


def test_param_groups_decay_rules():
    model = SSLMetaArch(tiny_cfg("optim.layerwise_decay=0.5", "optim.patch_embed_lr_mult=0.2"))
    student, groups = model.student, model.param_groups()
    where = {id(p): g for g in groups for p in g["params"]}
    bb, head = student.backbone, student.dino_head
    n = bb.n_blocks  # 2 -> multipliers 0.5^(3 - layer_id)
    assert where[id(bb.blocks[0].attn.qkv.weight)]["lr_multiplier"] == pytest.approx(0.5 ** 2)
    assert where[id(bb.blocks[1].mlp.fc1.weight)]["lr_multiplier"] == pytest.approx(0.5 ** 1)
    assert where[id(bb.norm.weight)]["lr_multiplier"] == pytest.approx(1.0)
    assert where[id(bb.cls_token)]["lr_multiplier"] == pytest.approx(0.5 ** (n + 1))
    assert where[id(bb.patch_embed.proj.weight)]["lr_multiplier"] == pytest.approx(0.2 * 0.5 ** (n + 1))
    for no_decay in (bb.blocks[0].attn.qkv.bias, bb.blocks[0].norm1.weight, bb.blocks[0].ls1.gamma, bb.norm.bias):
        assert where[id(no_decay)]["wd_multiplier"] == 0.0
    assert where[id(bb.blocks[0].attn.qkv.weight)]["wd_multiplier"] == 1.0
    assert where[id(head.last_layer.weight_v)]["is_last_layer"] and where[id(head.last_layer.weight_g)]["is_last_layer"]
    assert not where[id(head.mlp[0].weight)]["is_last_layer"]
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))


def test_continue_from_a_dinov2_backbone_and_head_file(tmp_path):
    from trainer.convert import save_dinov2

    cfg = tiny_cfg()
    torch.manual_seed(5)
    source = SSLMetaArch(cfg).student
    save_dinov2(source.backbone, tmp_path / "backbone.safetensors")
    save_file({f"dino_head.{k}": v.contiguous() for k, v in source.dino_head.state_dict().items()},
              str(tmp_path / "head.safetensors"))
    cfg.model.pretrained = str(tmp_path / "backbone.safetensors")
    cfg.model.pretrained_head = str(tmp_path / "head.safetensors")
    torch.manual_seed(6)
    built = SSLMetaArch(cfg)
    for model in (built.student, built.teacher):
        assert torch.equal(model.backbone.pos_embed, source.backbone.pos_embed)
        assert torch.equal(model.dino_head.last_layer.weight_v, source.dino_head.last_layer.weight_v)
    cfg.model.depth = 3
    with pytest.raises(RuntimeError, match="does not fit model.arch"):
        SSLMetaArch(cfg)


# ----------------------------------------------------------------------------------------------------------------
# The loop in-process


@pytest.mark.slow
def test_cli_run_logs_checkpoints_and_exports_the_teacher(blob_images, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--config", "smoke", "--data", str(blob_images), "--output", str(out), "--steps", "4", *TINY,
            "run.checkpoint_every=2"]
    assert main(argv) == 0
    rows = read_metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    for key in ("loss", "dino", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp", "images_per_s", "memory_mb",
                "wall_s", "cpu_s"):
        assert all(np.isfinite(r[key]) for r in rows), key
    assert all(r["cpu_s"] > 0 and r["wall_s"] > 0 for r in rows)
    assert rows[0]["lr"] < rows[1]["lr"]  # linear warm-up over 2 iterations
    assert [p.name for p in list_checkpoints(out)] == ["ckpt_0000002", "ckpt_0000004"]
    assert yaml.safe_load((out / "config.yaml").read_text())["model"]["depth"] == 2
    assert "it 4/4" in (out / "train.log").read_text()
    teacher, cfg = load_backbone(out)
    assert cfg["optim"]["total_iters"] == 4 and teacher.n_blocks == 2
    capsys.readouterr()
    assert main(argv) == 2  # never silently overwrite a run
    assert "already has checkpoints: pass --resume auto" in capsys.readouterr().err


@pytest.mark.slow
def test_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(blob_images, tmp_path, monkeypatch):
    from trainer.losses import iBOTPatchLoss

    calls = {"n": 0}
    real = iBOTPatchLoss.forward_masked

    def poisoned(self, *args, **kwargs):  # the 3rd step's iBOT loss is NaN
        calls["n"] += 1
        value = real(self, *args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(iBOTPatchLoss, "forward_masked", poisoned)
    cfg = tiny_cfg("run.checkpoint_every=2", steps=6)
    cfg.data.sources = [str(blob_images)]
    with pytest.raises(FloatingPointError, match=r"iteration 3 .*ckpt_0000002"):
        train(cfg, tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_0000002"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    load_backbone(tmp_path)  # intact and loadable


# ----------------------------------------------------------------------------------------------------------------
# Subprocess runs: SIGKILL and SIGTERM, then resume; compared with an uninterrupted run


def launch(images: Path, out: Path, *extra: str) -> subprocess.Popen:
    """The CLI in its own process group (signals can go to the whole group, as SLURM sends them)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # same threads -> same float sums
    cmd = [sys.executable, "-m", "trainer.train", "--config", "smoke", "--data", str(images), "--output", str(out),
           "--steps", "16", *TINY, "run.checkpoint_every=2", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_iteration(proc: subprocess.Popen, run: Path, iteration: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if (run / "metrics.jsonl").exists() and any(r["iteration"] >= iteration for r in read_metrics(run)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    raise AssertionError("run made no progress")


def finish(proc: subprocess.Popen) -> int:
    _, err = proc.communicate(timeout=180)
    assert proc.returncode in (0, -signal.SIGKILL), err[-3000:]
    return proc.returncode


@pytest.fixture(scope="module")
def uninterrupted(blob_images, tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert finish(launch(blob_images, out)) == 0
    return read_metrics(out)


@pytest.mark.slow
def test_sigkill_then_resume_repeats_the_uninterrupted_losses(blob_images, tmp_path, uninterrupted):
    proc = launch(blob_images, tmp_path)
    wait_for_iteration(proc, tmp_path, 4)
    proc.send_signal(signal.SIGKILL)
    assert finish(proc) == -signal.SIGKILL
    killed_at = max(r["iteration"] for r in read_metrics(tmp_path))
    assert killed_at < 16, "the run finished before it was killed: nothing was tested"
    resumed_from = int(json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["iteration"])
    assert resumed_from >= 2
    assert finish(launch(blob_images, tmp_path, "--resume", "auto")) == 0
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == list(range(1, 17))
    for mine, ref in zip(rows, uninterrupted):
        assert (mine["iteration"], mine["loss"], mine["dino"], mine["ibot"], mine["koleo"], mine["lr"]) == \
            (ref["iteration"], ref["loss"], ref["dino"], ref["ibot"], ref["koleo"], ref["lr"])


@pytest.mark.slow
def test_sigterm_checkpoints_before_exit_and_resumes_identically(blob_images, tmp_path, uninterrupted):
    # With a DataLoader worker, signalled together with the main process as SLURM does on preemption.
    proc = launch(blob_images, tmp_path, "data.num_workers=1")
    wait_for_iteration(proc, tmp_path, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    assert finish(proc) == 0
    stopped_at = max(r["iteration"] for r in read_metrics(tmp_path))
    assert stopped_at < 16, "the run finished before the signal: nothing was tested"
    # The checkpoint is the step it stopped at, not the last periodic one.
    assert json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["iteration"] == stopped_at
    assert "stopped by SIGTERM" in (tmp_path / "train.log").read_text()
    assert finish(launch(blob_images, tmp_path, "--resume", "auto")) == 0
    assert [r["loss"] for r in read_metrics(tmp_path)] == [r["loss"] for r in uninterrupted]


# ----------------------------------------------------------------------------------------------------------------
# DDP: 2 processes on gloo


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_worker(rank: int, port: int, images: str, out: str, logits: torch.Tensor) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = tiny_cfg("loss.centering=sinkhorn_knopp", "optim.batch_size_per_gpu=3", steps=3)
        cfg.data.sources = [images]
        state = train(cfg, out)
        flat = {name: torch.cat([p.detach().flatten() for p in m.parameters()])
                for name, m in (("student", state.model.student), ("teacher", state.model.teacher))}
        half = logits.chunk(2)[rank]
        sk = DINOLoss(logits.shape[1]).sinkhorn_knopp_teacher(half, teacher_temp=0.07)
        torch.save({**flat, "sk": sk}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.gloo
def test_ddp_two_ranks_stay_identical_and_sinkhorn_uses_the_global_batch(blob_images, tmp_path):
    logits = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 3
    mp.spawn(ddp_worker, args=(free_port(), str(blob_images), str(tmp_path), logits), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for name in ("student", "teacher"):
        assert torch.equal(r0[name], r1[name]), name
    single = SSLMetaArch(tiny_cfg()).student
    assert not torch.equal(r0["student"], torch.cat([p.flatten() for p in single.parameters()]))  # it trained
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    # Sinkhorn-Knopp over two ranks' halves == over the whole batch in one process, and != per-rank halves.
    whole = DINOLoss(64).sinkhorn_knopp_teacher(logits, teacher_temp=0.07)
    assert torch.allclose(torch.cat([r0["sk"], r1["sk"]]), whole, atol=1e-6)
    local = DINOLoss(64).sinkhorn_knopp_teacher(logits[:4], teacher_temp=0.07)
    assert not torch.allclose(r0["sk"], local, atol=1e-3)


@pytest.mark.slow
@pytest.mark.gloo
def test_torchrun_cli_trains_on_two_gloo_ranks(blob_images, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
           "-m", "trainer.train", "--config", "smoke", "--data", str(blob_images), "--output", str(tmp_path),
           "--steps", "2", *TINY]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world size 2, 8 images per step" in (tmp_path / "train.log").read_text()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2]
    assert json.loads((latest_checkpoint(tmp_path) / "state.json").read_text())["samples_seen"] == 16


# ----------------------------------------------------------------------------------------------------------------
# Real radiographs


@pytest.mark.slow
def test_smoke_run_on_shared_cxr_lowers_the_loss(shared_cxr, tmp_path):
    # Cheap on purpose: depth 2, 64 px globals with 16 px patches (16 tokens), 2 locals of 32 px, batch 8.
    cfg = load_config("smoke", ["model.depth=2", "model.patch_size=16", "model.img_size=64", "crops.global_size=64",
                                "crops.local_size=32", "crops.n_local=2", "head.out_dim=256", "head.hidden_dim=128",
                                "head.bottleneck_dim=32", "data.num_workers=0", "run.checkpoint_every=200",
                                "run.log_every=1"], steps=200)
    cfg.data.sources = [str(shared_cxr / "images")]
    train(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    assert len(rows) == 200
    for key in ("loss", "dino", "ibot", "koleo"):
        assert np.isfinite([r[key] for r in rows]).all(), key
    losses = np.array([r["loss"] for r in rows])
    assert losses[-10:].mean() < losses[:10].mean()


def test_cpu_seconds_counts_a_live_child_process():
    """The loader's workers are live children: their CPU time is in the learning curve's compute axis before they
    exit (RUSAGE_CHILDREN alone would miss it)."""
    import subprocess
    import sys

    from trainer.meter import cpu_seconds

    burn = ("import time, sys\nwhile time.process_time() < 0.5: pass\n"
            "print('burnt', flush=True)\nsys.stdin.read()")
    before = cpu_seconds()
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "burnt"
        assert cpu_seconds() - before >= 0.4  # /proc counts whole clock ticks: a little under 0.5 s
    finally:
        child.communicate("")
