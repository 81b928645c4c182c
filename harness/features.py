"""Batched feature extraction with a content-addressed, atomic on-disk cache.

One pass over a task's images feeds every encoder whose features are not cached yet: each image is decoded once
(float32 in [0, 1], in DataLoader workers), then put through each encoder's own preprocessing and `encode`.

Cache key = encoder identity (name, class, weights digest, preprocessing) + the task's content digest (the exact
image list and bytes) + FEATURE_FORMAT. An entry is a folder holding ``global.safetensors`` (float32 [N, D]),
optionally ``dense.safetensors`` (float16 patch grid and intermediate layers; fp16 halves the disk and is plenty
for linear heads) and ``manifest.json``, written last and atomically: an entry without its manifest is incomplete
and is recomputed, never read. An entry computed with dense features also serves global-only requests.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from baselines.preprocess import preprocess_batch
from baselines.registry import Encoder
from harness.io import atomic_path, atomic_write_json
from harness.tasks.base import Task, TaskError

FEATURE_FORMAT = 1


@dataclass
class FeatureSet:
    """Features of every image of a task, in the task's row order."""

    global_: np.ndarray                 # [N, D] float32
    patch: np.ndarray | None = None     # [N, C, h, w] float16
    layers: tuple[np.ndarray, ...] = ()  # each [N, C_i, h_i, w_i] float16
    key: str = ""
    from_cache: bool = False


def cache_key(encoder: Encoder, task_digest: str) -> str:
    blob = json.dumps({"format": FEATURE_FORMAT, "encoder": encoder.identity(), "task_digest": task_digest},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class _Images(Dataset):
    """Decodes image i in a worker. Errors come back as values so the main process raises the task's own
    message (naming the file), not a worker traceback."""

    def __init__(self, task: Task):
        self.task = task

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | str]:
        try:
            img = self.task.load_image(i)
        except Exception as e:  # noqa: BLE001 - re-raised with its message in the main process
            return i, f"{type(e).__name__}: {e}"
        if img.ndim != 2 or not np.isfinite(img).all():
            return i, f"TaskError: image {self.task.table.image_ids[i]!r} decoded to shape {img.shape} or non-finite values"
        return i, torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]


def _collate(batch: list) -> list:
    return batch


class FeatureCache:
    def __init__(self, root: Path):
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / "features" / key[:2] / key

    def has(self, key: str, dense: bool) -> bool:
        """A complete entry (its manifest written) holding the kinds asked for."""
        d = self.entry(key)
        return (d / "manifest.json").exists() and (not dense or (d / "dense.safetensors").exists())

    def load(self, key: str, dense: bool) -> FeatureSet | None:
        d = self.entry(key)
        if not self.has(key, dense):
            return None
        g = load_file(d / "global.safetensors")["global"]
        patch, layers = None, ()
        if dense:
            t = load_file(d / "dense.safetensors")
            patch = t["patch"]
            layers = tuple(t[f"layer{i}"] for i in range(sum(k.startswith("layer") for k in t)))
        return FeatureSet(g, patch, layers, key=key, from_cache=True)

    def save(self, key: str, fs: FeatureSet, manifest: dict) -> None:
        d = self.entry(key)
        if d.exists():  # an incomplete entry from a killed run, or a global-only one being extended: start clean
            shutil.rmtree(d)
        d.mkdir(parents=True)
        with atomic_path(d / "global.safetensors") as tmp:
            save_file({"global": np.ascontiguousarray(fs.global_)}, str(tmp))
        if fs.patch is not None:
            tensors = {"patch": np.ascontiguousarray(fs.patch)}
            tensors.update({f"layer{i}": np.ascontiguousarray(a) for i, a in enumerate(fs.layers)})
            with atomic_path(d / "dense.safetensors") as tmp:
                save_file(tensors, str(tmp))
        atomic_write_json(d / "manifest.json", manifest)  # last: marks the entry complete


def extract(
    task: Task,
    encoders: list[Encoder],
    cache: FeatureCache,
    *,
    dense: bool = False,
    batch_size: int = 16,
    workers: int = 1,
    device: str | torch.device = "cpu",
    log=print,
) -> dict[str, FeatureSet]:
    """Features of `task` for each encoder (by name), from the cache when present, else computed in one pass."""
    device = torch.device(device)
    digest = task.content_digest()
    out: dict[str, FeatureSet] = {}
    pending: list[tuple[Encoder, str]] = []
    for enc in encoders:
        key = cache_key(enc, digest)
        hit = cache.load(key, dense)
        if hit is not None:
            log(f"  {enc.name}: features cached ({key[:12]}), nothing to compute")
            out[enc.name] = hit
        else:
            pending.append((enc, key))
    if not pending:
        return out

    n = len(task)
    loader = DataLoader(_Images(task), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate, persistent_workers=False)
    parts: dict[str, dict[str, list]] = {e.name: {"global": [], "patch": [], "layers": []} for e, _ in pending}
    for enc, _ in pending:
        enc.to(device)
    names = ", ".join(e.name for e, _ in pending)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
    t0 = time.perf_counter()
    with tqdm(total=n, desc=f"features {task.name} [{names}]", unit="img", dynamic_ncols=True) as bar:
        for batch in loader:
            images = []
            for i, item in batch:
                if isinstance(item, str):
                    raise TaskError(f"task {task.name}: image {task.table.image_ids[i]!r} could not be read: {item}")
                images.append(item)
            for enc, _ in pending:
                x = preprocess_batch(images, enc.preprocess).to(device)
                with torch.inference_mode(), autocast:
                    f = enc.encode(x)
                p = parts[enc.name]
                p["global"].append(f.global_.float().cpu().numpy())
                if dense:
                    p["patch"].append(f.patch.to(torch.float16).cpu().numpy())
                    p["layers"].append([t.to(torch.float16).cpu().numpy() for t in f.layers])
            bar.update(len(images))
    seconds = time.perf_counter() - t0
    log(f"  computed features for {n} images in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} img/s, "
        f"{len(pending)} encoder(s))")

    for enc, key in pending:
        p = parts[enc.name]
        g = np.concatenate(p["global"]).astype(np.float32)
        if not np.isfinite(g).all():
            raise FloatingPointError(f"{enc.name}: non-finite features on task {task.name}; nothing was cached")
        fs = FeatureSet(g, key=key)
        if dense:
            fs.patch = np.concatenate(p["patch"])
            fs.layers = tuple(np.concatenate([b[j] for b in p["layers"]]) for j in range(len(p["layers"][0])))
        cache.save(key, fs, {"key": key, "encoder": enc.identity(), "task": task.name, "task_digest": digest,
                             "n_images": n, "global_shape": list(g.shape), "dense": dense,
                             "format": FEATURE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        out[enc.name] = fs
    return out

