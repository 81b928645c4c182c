"""Batched feature extraction with a content-addressed, atomic on-disk cache.

One pass over a task's images feeds every encoder whose features are not cached yet: each image is decoded once
(float32 in [0, 1], in DataLoader workers), then put through each encoder's own preprocessing and `encode`.

Cache key = encoder identity (name, class, weights digest, preprocessing, code version) + the compute precision
(device type, autocast dtype, torch version: GPU bf16 and CPU fp32 features differ) + the task's content digest
(the exact image list and bytes) + FEATURE_FORMAT. An entry is a folder holding ``global.safetensors`` (float32
[N, D]), for a dense entry also ``dense.safetensors`` (float16 patch grid and intermediate layers; fp16 halves the
disk and is plenty for linear heads), and ``manifest.json``. A global-only and a dense entry of one key are two
folders; a dense entry also serves global-only requests.

Several runs may share one cache directory: an entry is written in full into a temporary folder, flushed to disk
and renamed into place; if another process got there first, its entry is kept (same key, same features). A
complete entry is never modified or deleted, so a reader that found it can always read it.
"""
from __future__ import annotations

import hashlib
import json
import os
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
from harness.io import fsync_path, temp_dir
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


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision features are computed in on `device` (bf16 on CUDA), or None for full fp32."""
    return torch.bfloat16 if device.type == "cuda" else None


def precision(device: torch.device) -> dict:
    """What, besides the encoder and the images, changes the feature values: where and how they are computed."""
    dtype = autocast_dtype(device)
    return {"device": device.type, "autocast": str(dtype).removeprefix("torch.") if dtype else "none",
            "torch": torch.__version__}


def cache_key(encoder: Encoder, task_digest: str, device: str | torch.device) -> str:
    blob = json.dumps({"format": FEATURE_FORMAT, "encoder": encoder.identity(),  # includes its code_version
                       "precision": precision(torch.device(device)), "task_digest": task_digest}, sort_keys=True)
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

    def entry(self, key: str, dense: bool = False) -> Path:
        """The folder of the global-only (or the dense) entry of `key`."""
        return self.root / "features" / key[:2] / (f"{key}.dense" if dense else key)

    def _complete(self, key: str, dense: bool) -> Path | None:
        """A complete entry (manifest present) holding the kinds asked for: a dense entry serves both."""
        for d in ((True,) if dense else (False, True)):
            if (self.entry(key, d) / "manifest.json").is_file():
                return self.entry(key, d)
        return None

    def has(self, key: str, dense: bool) -> bool:
        return self._complete(key, dense) is not None

    def load(self, key: str, dense: bool) -> FeatureSet | None:
        d = self._complete(key, dense)
        if d is None:
            return None
        g = load_file(d / "global.safetensors")["global"]
        patch, layers = None, ()
        if dense:
            t = load_file(d / "dense.safetensors")
            patch = t["patch"]
            layers = tuple(t[f"layer{i}"] for i in range(sum(k.startswith("layer") for k in t)))
        return FeatureSet(g, patch, layers, key=key, from_cache=True)

    def save(self, key: str, fs: FeatureSet, manifest: dict) -> None:
        """Write the entry in a private folder, flush it, then rename it into place. Another process having
        published the same key first is success: same key, same features."""
        final = self.entry(key, dense=fs.patch is not None)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_dir(final.parent, final.name)
        try:
            save_file({"global": np.ascontiguousarray(fs.global_)}, str(tmp / "global.safetensors"))
            fsync_path(tmp / "global.safetensors")
            if fs.patch is not None:
                tensors = {"patch": np.ascontiguousarray(fs.patch)}
                tensors.update({f"layer{i}": np.ascontiguousarray(a) for i, a in enumerate(fs.layers)})
                save_file(tensors, str(tmp / "dense.safetensors"))
                fsync_path(tmp / "dense.safetensors")
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
            fsync_path(tmp / "manifest.json")
            fsync_path(tmp)
            self._publish(tmp, final)
        finally:
            if tmp.exists():  # not published (an error, or another process won): ours alone, never read
                shutil.rmtree(tmp)

    @staticmethod
    def _publish(tmp: Path, final: Path) -> None:
        error: OSError | None = None
        for _ in range(10):
            try:
                os.rename(tmp, final)
                fsync_path(final.parent)
                return
            except OSError as e:
                error = e
            if (final / "manifest.json").is_file():
                return  # a complete entry of the same key: keep it, a reader may hold it open
            if final.is_dir():
                # No manifest: a folder left by an older harness that wrote entries in place and was killed. No
                # reader uses it (readers need the manifest): move it aside, remove it, try again.
                aside = temp_dir(final.parent, final.name + ".stale")
                try:
                    os.rename(final, aside / "entry")
                except FileNotFoundError:
                    pass  # another process moved it first
                shutil.rmtree(aside)
            elif final.exists():
                break  # a file in the way: not ours to remove
        raise OSError(f"cannot publish feature-cache entry {final}: {error}; is the cache directory writable?")


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
        key = cache_key(enc, digest, device)
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
    dtype = autocast_dtype(device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
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
                             "precision": precision(device),
                             "format": FEATURE_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        out[enc.name] = fs
    return out

