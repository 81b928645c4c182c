"""Bit-identical training: 20 steps of two tiny runs, their per-step losses and a digest of the final weights,
compared exactly with golden/training.json, which the trainer made before its objective moved into one object.

Any change to the numbers the trainer computes (the order of a sum, a fused kernel, a seed drawn at another place)
fails here. A change meant to alter them regenerates the file, saying why in its commit:

    OMP_NUM_THREADS=1 python -m tests.trainer.test_golden

The runs are on the CPU with one thread, so no reduction is split differently from one process to the next.
Equal numbers need the same kernels too: the golden file records the torch version and the CPU capability its
kernels were chosen for (AVX2, AVX512, ...), and the test says so, by name, when this machine differs.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.checkpoint import latest_checkpoint, load_checkpoint
from trainer.config import load_config
from trainer.train import train

GOLDEN = Path(__file__).with_name("golden") / "training.json"
STEPS = 20

# A tiny geometry (ViT depth 2, 16 patches of 8 px, a 64-prototype head, batch 4) on top of the smoke preset, spelt
# out here rather than taken from tiny_run.TINY, so that tuning the other tests' run cannot move these numbers.
TINY = ["model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.img_size=32", "crops.global_size=32",
        "crops.local_size=16", "head.out_dim=64", "head.hidden_dim=32", "head.bottleneck_dim=16",
        "optim.batch_size_per_gpu=4", "optim.base_lr=0.002", "optim.warmup_iters=4", "optim.freeze_last_layer_iters=2",
        "optim.warmup_teacher_temp_iters=6", "data.num_workers=0", "run.log_every=1", "run.save_initial=false"]

# Each case takes a different branch of the objective: Sinkhorn-Knopp targets with drop-path and local crops, and
# centred softmax targets (the EMA centres) with unit-norm prototypes, no LayerScale and no local crops.
CASES: dict[str, list[str]] = {
    "sinkhorn": ["loss.centering=sinkhorn_knopp", "model.drop_path_rate=0.1", "crops.n_local=2"],
    "centering": ["loss.centering=centering", "head.freeze_prototype_gain=true", "model.layerscale_init=null",
                  "crops.n_local=0"],
}


def environment() -> dict[str, str]:
    """What decides which kernels compute the numbers."""
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def make_images(root: Path) -> Path:
    """12 grey 40x40 PNGs of soft discs on a gradient, the same bytes on every machine (numpy's PCG64 stream)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(21)
    yy, xx = np.mgrid[:40, :40].astype(np.float64)
    for i in range(12):
        img = 0.2 * (yy + xx) / 80
        for _ in range(3):
            cy, cx, r, a = rng.uniform(0, 40), rng.uniform(0, 40), rng.uniform(3, 10), rng.uniform(0.3, 1.0)
            img = img + a * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        Image.fromarray(np.round(255 * img / img.max()).astype(np.uint8)).save(root / f"{i:02d}.png")
    return root


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def run_case(case: str, workdir: Path) -> dict:
    """Train one case for STEPS steps on one thread; its losses per step and digests of its last checkpoint."""
    cfg = load_config("smoke", TINY + CASES[case], steps=STEPS)
    cfg.data.sources = [str(make_images(workdir / "images"))]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, workdir / case)
    finally:
        torch.set_num_threads(threads)
    rows = [json.loads(line) for line in (workdir / case / "metrics.jsonl").read_text().splitlines()]
    tensors, optimizer_state, _ = load_checkpoint(latest_checkpoint(workdir / case))
    parts = {"student": {}, "teacher": {}, "centres": {}}
    for name, t in tensors.items():
        parts[name.split(".")[0] if name.startswith(("student.", "teacher.")) else "centres"][name] = t
    moments = {f"{p}.{k}": v for p, s in optimizer_state["state"].items() for k, v in s.items()}
    return {"losses": {key: [r[key] for r in rows] for key in ("loss", "dino", "ibot", "koleo")},
            "digests": {**{k: digest(v) for k, v in parts.items()}, "adamw_state": digest(moments)}}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_twenty_steps_repeat_the_golden_numbers_bit_for_bit(case, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    if golden["environment"] != environment():
        pytest.skip(f"golden numbers made with {golden['environment']}, this is {environment()}: other kernels, "
                    "other rounding; regenerate them on the unchanged code (python -m tests.trainer.test_golden)")
    got, want = run_case(case, tmp_path), golden["cases"][case]
    assert len(got["losses"]["loss"]) == STEPS
    for key, values in want["losses"].items():
        first = next((i for i, (a, b) in enumerate(zip(got["losses"][key], values)) if a != b), None)
        assert first is None, f"{case}: {key} differs first at step {first + 1}: {got['losses'][key][first]!r} " \
                              f"!= golden {values[first]!r}"
    assert got["digests"] == want["digests"]


def write_golden() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cases = {case: run_case(case, Path(tmp) / case) for case in CASES}
    GOLDEN.write_text(json.dumps({"environment": environment(), "steps": STEPS, "cases": cases}, indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    sys.exit(write_golden())
