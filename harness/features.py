"""Batched feature extraction with a content-addressed, atomic on-disk cache whose dense entries are streamed.

One pass over a task's images feeds every encoder whose features are not cached yet: each image is decoded once
(float32 in [0, 1]) and put through each distinct preprocessing of those encoders in DataLoader workers, with
prefetch (and pinned memory on CUDA), so the main process only moves batches to the device and runs `encode`.

Cache key = encoder identity (name, class, weights digest, preprocessing, global pooling, and the digest of the encoder's sources
and forward libraries) + the sources of the decoding, preprocessing and extraction code (`EXTRACTION_CODE`) + the
compute precision (device type, autocast dtype, torch version: GPU bf16 and CPU fp32 features differ) + the task's
content digest (the exact image list and bytes) + FEATURE_FORMAT. An entry that cannot be read back (a damaged
file, a foreign one) is moved aside and recomputed, with a warning. An entry is a folder holding ``global.safetensors`` (float32
[N, D]) and ``manifest.json``; a dense entry also holds the float16 patch grid and intermediate layers as row
shards, ``dense-00000.safetensors``, ``dense-00001.safetensors``, ... (fp16 halves the disk and is plenty for
linear heads), written one shard at a time during extraction and read back by memory-mapping only the shards a
batch needs (`ShardedGrid`), so neither extraction nor the segmentation heads ever hold a task's dense features in
memory. (Entries written before sharding hold one ``dense.safetensors``: it is read as a single shard.) A
global-only and a dense entry of one key are two folders; a dense entry also serves global-only requests.

A dense entry larger than the disk budget (`dense_budget_gb`, ``--dense-cache-gb``) or than the free space of the
cache's disk is not written: its grids are then served by `ReencodedGrid`, which decodes, preprocesses and encodes
the requested rows again at each read (the segmentation heads re-encode every batch of every epoch), with the same
float16 values the cache would have held. On a CPU that is one to two orders of magnitude slower than streaming
the shards (``bench/bench_seg_heads.py``); on a GPU re-encoding can beat reading ~10 MB per image from disk, and
where the crossover lies must be measured on that machine (``bench/bench_scale.py`` reports both rates).

Several runs may share one cache directory: an entry is written in full into a temporary folder, flushed to disk
and renamed into place; if another process got there first, its entry is kept (same key, same features). A
complete entry is never modified or deleted, so a reader that found it can always read it: its shard files are
only ever opened read-only.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Callable, Union

import numpy as np
import torch
from safetensors.numpy import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from baselines.preprocess import Preprocess, preprocess_batch
from baselines.registry import Encoder, Features
from harness.common.atomic import fsync_path, temp_dir
from harness.common.devices import hardware
from harness.common.hashing import array_digest, sha256_text
from harness.common.sources import sources_digest
from harness.log import progress
from harness.tasks.base import Subset, Task, TaskError

_log = logging.getLogger(__name__)

FEATURE_FORMAT = 1
#: Dense rows are buffered until they fill a shard of about this size, then written: extraction holds at most one
#: shard (or one batch, if larger) per encoder in memory, whatever the size of the task.
SHARD_BYTES = 64 * 2**20
#: Default disk budget of one dense entry (one encoder, one task): a ViT-B/14 at 518 px (patch grid + 4 layers,
#: 10.5 MB per image) fits over CANDID-PTX (19,237 images, 202 GB) and RSNA (26,684, 281 GB), whose segmentation
#: heads would otherwise re-encode every batch of 24 epochs; an entry larger than the free disk is never written.
DEFAULT_DENSE_BUDGET_GB = 300.0
#: Batches each decoding worker prepares ahead, so the device never waits for the next batch while one is encoded.
PREFETCH = 4
_SAFETENSORS_DTYPES = {"F16": np.float16, "F32": np.float32}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The reduced precision features are computed in on `device` (bf16 on CUDA), or None for full fp32."""
    return torch.bfloat16 if device.type == "cuda" else None


def precision(device: torch.device) -> dict:
    """What, besides the encoder and the images, changes the feature values: where and how they are computed."""
    dtype = autocast_dtype(device)
    return {"device": device.type, "autocast": str(dtype).removeprefix("torch.") if dtype else "none",
            "torch": torch.__version__}


#: The code between an image's bytes and its features besides the encoder's own (`Encoder.code_digest`): the
#: decoding, the preprocessing, and the functions of this module that run the encoder and convert its output. The
#: rest of this module only moves bytes: an edit to it recomputes nothing.
EXTRACTION_CODE = ("harness.common.imaging", "baselines.preprocess", "baselines.pooling", "harness.features:autocast_dtype",
                   "harness.features:encode_batch", "harness.features:dense_grids", "harness.features:_Images")


def cache_key(encoder: Encoder, task_digest: str, device: str | torch.device) -> str:
    """sha256 of everything that makes an entry's features, one field each (adding one is a line here)."""
    fields = {"format": FEATURE_FORMAT,
              "encoder": encoder.identity(),  # name, class, weights, preprocessing and the encoder's code
              "extraction": sources_digest(EXTRACTION_CODE),
              "precision": precision(torch.device(device)),
              "task_digest": task_digest}
    return sha256_text(json.dumps(fields, sort_keys=True))


def encode_batch(encoder: Encoder, x: torch.Tensor, device: torch.device) -> Features:
    """`encoder.encode` under inference mode and the device's autocast: the one place features are computed, so
    extraction and re-encoding give the same values."""
    dtype = autocast_dtype(device)
    with torch.inference_mode(), torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
        return encoder.pooled(encoder.encode(x))


def dense_grids(f: Features) -> list[np.ndarray]:
    """The dense grids as the cache stores them: float16 patch grid, then the intermediate layers."""
    return [t.to(torch.float16).cpu().numpy() for t in (f.patch, *f.layers)]


# ------------------------------------------------------------------------------------------- dense row storage

def _rows(index: slice | np.ndarray | list[int], n: int) -> np.ndarray:
    """Row numbers of a slice or an integer array on `n` rows (negative counting from the end), range-checked."""
    idx = np.arange(n)[index] if isinstance(index, slice) else np.asarray(index, dtype=np.int64)
    if idx.ndim != 1:
        raise IndexError(f"dense grids are indexed by a slice or a 1-d array of rows, got shape {idx.shape}")
    idx = np.where(idx < 0, idx + n, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"row {int(idx.max()) if idx.max() >= n else int(idx.min())} out of range for {n} rows")
    return idx


class ShardedGrid:
    """A read-only [N, ...] array stored as consecutive row blocks in shard files. A read memory-maps only the
    shards holding the requested rows, copies those rows out and unmaps: the bytes come through the page cache, so
    a process streaming a 100 GB entry holds only the rows it asked for (a mapping kept open would add every page
    read so far to the process' resident memory)."""

    def __init__(self, parts: list[tuple[Path, int, int]], row_shape: tuple[int, ...], dtype: np.dtype):
        self.parts = parts  # (file, byte offset of this tensor in it, rows)
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.starts = np.cumsum([0] + [rows for _, _, rows in parts])
        self.shape = (int(self.starts[-1]), *self.row_shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | np.ndarray | list[int]) -> np.ndarray:
        idx = _rows(index, len(self))
        out = np.empty((len(idx), *self.row_shape), self.dtype)
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        for s in np.unique(shard):
            at = np.flatnonzero(shard == s)
            path, offset, rows = self.parts[s]
            mapped = np.memmap(path, dtype=self.dtype, mode="r", offset=offset, shape=(rows, *self.row_shape))
            out[at] = mapped[idx[at] - self.starts[s]]
            del mapped  # unmap now, see the class docstring
        return out

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        """Every row at once: for small tasks and tests only, the point of this class is not to do this."""
        a = self[:]
        return a if dtype is None else a.astype(dtype)


def _tensor_offsets(path: Path) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """name -> (dtype, shape, byte offset) of each tensor of a safetensors file, from its header: 8 bytes of
    little-endian header length, then a JSON header whose data_offsets count from the end of the header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t['dtype']}; dense shards hold float16 or float32")
        out[name] = (np.dtype(_SAFETENSORS_DTYPES[t["dtype"]]), tuple(t["shape"]), 8 + n + t["data_offsets"][0])
    return out


def open_shards(files: list[Path]) -> dict[str, ShardedGrid]:
    """The tensors of shard files that hold consecutive rows of the same named arrays, as lazy grids."""
    headers = [_tensor_offsets(f) for f in files]
    grids = {}
    for name, (dtype, shape, _) in headers[0].items():
        grids[name] = ShardedGrid([(f, h[name][2], h[name][1][0]) for f, h in zip(files, headers)], shape[1:], dtype)
    return grids


def write_safetensors(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` in the safetensors layout (8-byte little-endian header length, a JSON header padded to 8 bytes
    with spaces, then each tensor's bytes back to back) straight from their memory, and flush the file to disk:
    unlike `save_file`, no serialised copy of a 64 MB shard is ever made."""
    header, offset = {}, 0
    for name, a in arrays.items():
        dtype = next(k for k, v in _SAFETENSORS_DTYPES.items() if np.dtype(v) == a.dtype)
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for a in arrays.values():
            f.write(np.ascontiguousarray(a).data)
        f.flush()
        os.fsync(f.fileno())


class ShardWriter:
    """Appends batches of rows of named arrays to `folder` as ``<stem>-NNNNN.safetensors`` shards of about
    `shard_bytes` each. Rows are copied into one preallocated shard buffer that is written and reused: memory holds
    one shard, and the allocator sees the same few sizes over and over (a fresh list of batch arrays and their
    concatenation per shard fragmented the heap until the process grew with every shard written)."""

    def __init__(self, folder: Path, stem: str = "dense", shard_bytes: int = SHARD_BYTES):
        self.folder, self.stem, self.shard_bytes = Path(folder), stem, shard_bytes
        self.buffers: dict[str, np.ndarray] = {}
        self.filled = 0
        self.shards: list[dict] = []  # {"file", "rows"} of each shard written, in row order

    def add(self, arrays: dict[str, np.ndarray]) -> None:
        n = len(next(iter(arrays.values())))
        if not self.buffers:
            row_bytes = sum(a[:1].nbytes for a in arrays.values())
            capacity = max(1, self.shard_bytes // max(row_bytes, 1))
            self.buffers = {k: np.empty((capacity, *a.shape[1:]), a.dtype) for k, a in arrays.items()}
        capacity = len(next(iter(self.buffers.values())))
        done = 0
        while done < n:
            take = min(n - done, capacity - self.filled)
            for k, a in arrays.items():
                self.buffers[k][self.filled:self.filled + take] = a[done:done + take]
            self.filled += take
            done += take
            if self.filled == capacity:
                self.flush()

    def flush(self) -> None:
        if not self.filled:
            return
        name = f"{self.stem}-{len(self.shards):05d}.safetensors"
        write_safetensors(self.folder / name, {k: b[:self.filled] for k, b in self.buffers.items()})
        self.shards.append({"file": name, "rows": self.filled})
        self.filled = 0

    def grids(self) -> dict[str, ShardedGrid]:
        """Everything added so far, readable (writes the last partial shard first)."""
        self.flush()
        return open_shards([self.folder / s["file"] for s in self.shards])


# ------------------------------------------------------------------------------------------- re-encoded grids

class Reencoder:
    """Dense grids computed on demand: the requested rows of `task` are decoded, preprocessed and encoded again at
    every read, and cast to float16 exactly as the cache stores them. The last read is kept, so the patch grid and
    the layers of one batch (read one after the other) cost one encoder pass."""

    def __init__(self, task: Task, encoder: Encoder, device: torch.device):
        self.task, self.encoder, self.device = task, encoder, device
        encoder.to(device)  # its inputs go there; with cached global features nothing else has moved it
        self.last: tuple[bytes, list[np.ndarray]] = (b"", [])

    def read(self, rows: np.ndarray) -> list[np.ndarray]:
        key = rows.tobytes()
        if key != self.last[0]:
            images = [torch.from_numpy(np.ascontiguousarray(self.task.load_image(int(i)), dtype=np.float32))[None]
                      for i in rows]
            x = preprocess_batch(images, self.encoder.preprocess).to(self.device)
            self.last = (key, dense_grids(encode_batch(self.encoder, x, self.device)))
        return self.last[1]


class ReencodedGrid:
    """One dense grid (0 = patch grid, 1.. = layers) of a `Reencoder`, indexed like an array of N rows."""

    def __init__(self, source: Reencoder, level: int, row_shape: tuple[int, ...]):
        self.source, self.level = source, level
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(np.float16)
        self.shape = (len(source.task), *self.row_shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice | np.ndarray | list[int]) -> np.ndarray:
        idx = _rows(index, len(self))
        if idx.size == 0:
            return np.empty((0, *self.row_shape), self.dtype)
        return self.source.read(idx)[self.level]


Grid = Union[np.ndarray, ShardedGrid, ReencodedGrid]


@dataclass
class FeatureSet:
    """Features of every image of a task, in the task's row order."""

    global_: np.ndarray                 # [N, D] float32
    patch: Grid | None = None           # [N, C, h, w] float16
    layers: tuple[Grid, ...] = ()       # each [N, C_i, h_i, w_i] float16
    key: str = ""
    from_cache: bool = False
    #: where the dense grids come from: "memory" (arrays), "cache" (shards streamed from disk), "re-encode"
    dense_mode: str = "memory"
    #: the encoder's forward throughput over the pass that computed these features (`forward_throughput`), stored in
    #: the entry's manifest: a cached entry carries the rate measured when it was made; None for features made
    #: elsewhere or cached before rates were stored
    throughput: dict | None = None

    @cached_property
    def global_digest(self) -> str:
        """Digest of the global features' content (dtype, shape, bytes), computed once: what a results-cache
        entry is keyed by, so a result is found again only for the very features it was computed from."""
        return array_digest(self.global_)

    def global_only(self) -> FeatureSet:
        """These features without their dense grids: what the global protocols read (and are keyed by) when one
        pass extracted the task's global and dense features together."""
        return FeatureSet(self.global_, key=self.key, from_cache=self.from_cache, throughput=self.throughput)


# ------------------------------------------------------------------------------------------------------- cache

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
        """The entry's global features in memory; dense grids as lazy `ShardedGrid`s read batch by batch. None when
        there is no complete entry, or when it cannot be read back whole (a truncated, zeroed or foreign file, a
        missing shard): that one is moved aside, with a warning, so that it is recomputed and never crashes a run."""
        d = self._complete(key, dense)
        if d is None:
            return None
        try:
            return self._read(d, key, dense)
        except Exception as e:  # any damage, whatever the library reading it raises: recompute
            _log.warning(f"feature cache: entry {d} cannot be read ({type(e).__name__}: {e}); it is moved aside "
                         "and its features computed again")
            self._discard(d)
            return None

    @staticmethod
    def _read(d: Path, key: str, dense: bool) -> FeatureSet:
        """Read entry `d`, checking it is whole: its manifest names `key`, and every array holds its rows."""
        manifest = json.loads((d / "manifest.json").read_text())
        if not isinstance(manifest, dict) or manifest.get("key") != key:
            raise ValueError(f"manifest.json is not that of entry {key[:12]}")
        g = load_file(d / "global.safetensors")["global"]
        n = manifest.get("n_images")
        if g.ndim != 2 or g.dtype != np.float32 or (n is not None and len(g) != n):
            raise ValueError(f"global features of shape {g.shape} and dtype {g.dtype}, expected {n} float32 rows")
        throughput = manifest.get("throughput")
        if not dense:
            return FeatureSet(g, key=key, from_cache=True, throughput=throughput)
        shards = manifest.get("shards")
        grids = open_shards([d / s["file"] for s in shards] if shards else [d / "dense.safetensors"])
        for name, grid in grids.items():
            if len(grid) != len(g):
                raise ValueError(f"dense grid {name} has {len(grid)} rows, the global features {len(g)}")
            row_bytes = grid.dtype.itemsize * math.prod(grid.row_shape)
            for path, offset, rows in grid.parts:
                if path.stat().st_size < offset + rows * row_bytes:
                    raise ValueError(f"{path.name} is shorter than the rows its header lists (truncated)")
        layers = tuple(grids[f"layer{i}"] for i in range(sum(k.startswith("layer") for k in grids)))
        return FeatureSet(g, grids["patch"], layers, key=key, from_cache=True, dense_mode="cache",
                          throughput=throughput)

    @staticmethod
    def _discard(d: Path, why: str = "damaged") -> None:
        """Move an entry out of its place (one rename, so no reader sees half of it), then delete it."""
        aside = temp_dir(d.parent, f"{d.name}.{why}")
        try:
            os.rename(d, aside / "entry")
        except FileNotFoundError:
            pass  # another process moved it first
        shutil.rmtree(aside)

    def writer(self, key: str, dense: bool, shard_bytes: int = SHARD_BYTES) -> EntryWriter:
        return EntryWriter(self, key, dense, shard_bytes)

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
                FeatureCache._discard(final, "stale")
            elif final.exists():
                break  # a file in the way: not ours to remove
        raise OSError(f"cannot publish feature-cache entry {final}: {error}; is the cache directory writable?")


class EntryWriter:
    """Builds one cache entry in a private temporary folder beside its final place: global rows are kept in memory
    (small), dense rows go to shard files as they come. `publish` writes the rest, flushes everything and renames
    the folder into place; `discard` (always safe to call) removes what was not published."""

    def __init__(self, cache: FeatureCache, key: str, dense: bool, shard_bytes: int = SHARD_BYTES):
        self.key = key
        self.final = cache.entry(key, dense)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temp_dir(self.final.parent, self.final.name)
        self.dense = dense
        self.globals: list[np.ndarray] = []
        self.shards = ShardWriter(self.tmp, "dense", shard_bytes)

    def add(self, global_: np.ndarray, grids: list[np.ndarray] | None = None) -> None:
        """One batch: global features [b, D] and, for a dense entry, its grids (patch grid, then the layers)."""
        if self.dense != (grids is not None):
            raise ValueError(f"entry {self.final.name}: dense grids must be given for every batch of a dense entry "
                             "and for none of a global-only one")
        self.globals.append(np.asarray(global_, dtype=np.float32))
        if grids is not None:
            self.shards.add({"patch" if j == 0 else f"layer{j - 1}": g for j, g in enumerate(grids)})

    def global_features(self) -> np.ndarray:
        return np.concatenate(self.globals)

    def publish(self, manifest: dict) -> Path:
        """Another process having published the same key first is success: same key, same features."""
        try:
            self.shards.flush()
            save_file({"global": np.ascontiguousarray(self.global_features())}, str(self.tmp / "global.safetensors"))
            fsync_path(self.tmp / "global.safetensors")
            manifest = {**manifest, "key": self.key}  # checked on reading: a foreign manifest is not served
            if self.dense:
                manifest = {**manifest, "shards": self.shards.shards}
            (self.tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
            fsync_path(self.tmp / "manifest.json")
            fsync_path(self.tmp)
            FeatureCache._publish(self.tmp, self.final)
        finally:
            self.discard()
        return self.final

    def discard(self) -> None:
        if self.tmp.exists():  # not published (an error, or another process won): ours alone, never read
            shutil.rmtree(self.tmp)


# -------------------------------------------------------------------------------------------------- extraction

class _Images(Dataset):
    """Decodes image i and applies each of `preprocesses` to it, in a worker. Errors come back as values so the
    main process raises the task's own message (naming the file), not a worker traceback."""

    def __init__(self, task: Task, preprocesses: list[Preprocess]):
        self.task, self.preprocesses = task, preprocesses

    def __len__(self) -> int:
        return len(self.task)

    def __getitem__(self, i: int) -> tuple[int, list[torch.Tensor] | str]:
        try:
            img = self.task.load_image(i)
        except Exception as e:  # any error: re-raised with its message in the main process
            return i, f"{type(e).__name__}: {e}"
        if img.ndim != 2 or not np.isfinite(img).all():
            return i, f"TaskError: image {self.task.table.image_ids[i]!r} decoded to shape {img.shape} or non-finite values"
        x = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))[None]
        # preprocess_batch works image by image, so a batch of one gives exactly the values of any larger batch.
        return i, [preprocess_batch([x], pre)[0] for pre in self.preprocesses]


def _collate(batch: list[tuple[int, list[torch.Tensor] | str]]) -> tuple[list[tuple[int, str]], list[torch.Tensor]]:
    """(errors, one stacked input batch per preprocessing). Stacked here, in the worker, so that pinning (on CUDA)
    applies to the very tensors that are copied to the device."""
    errors = [(i, item) for i, item in batch if isinstance(item, str)]
    if errors:
        return errors, []
    return [], [torch.stack([item[j] for _, item in batch]) for j in range(len(batch[0][1]))]


def _dense_row_shapes(task: Task, encoder: Encoder, device: torch.device) -> list[tuple[int, ...]]:
    """[C, h, w] of each dense grid (patch grid, then layers), from one image: the preprocessing makes every image
    the same input size, so every row has these shapes."""
    return [g.shape[1:] for g in Reencoder(task, encoder, device).read(np.array([0]))]


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def dense_storage(n_bytes: int, budget_gb: float, root: Path, reserved: int = 0) -> str:
    """Why a dense entry of `n_bytes` must not be cached (the empty string when it may): it exceeds the budget or
    the free space on the cache's disk, less the `reserved` bytes of the entries this pass will write before it."""
    if n_bytes > budget_gb * 1e9:
        return f"more than the dense-cache budget of {budget_gb:g} GB (--dense-cache-gb)"
    free = shutil.disk_usage(_existing(root)).free - reserved
    if n_bytes > free:
        return f"more than the {free / 1e9:.1f} GB free on the disk of the cache ({root}; --cache-dir)"
    return ""


def extract(
    task: Task,
    encoders: list[Encoder],
    cache: FeatureCache,
    *,
    dense: bool = False,
    batch_size: int = 16,
    workers: int = 1,
    device: str | torch.device = "cpu",
    dense_budget_gb: float = DEFAULT_DENSE_BUDGET_GB,
    shard_bytes: int = SHARD_BYTES,
    log: Callable[[str], object] = _log.info,
) -> dict[str, FeatureSet]:
    """Features of `task` for each encoder (by name), from the cache when present, else computed in one pass.
    Dense grids come back lazy: streamed from the cache's shards, or re-encoded on demand when the entry would
    exceed `dense_budget_gb` (or the free disk)."""
    device = torch.device(device)
    digest = task.content_digest()
    n = len(task)
    out: dict[str, FeatureSet] = {}
    pending: list[tuple[Encoder, str, bool]] = []  # (encoder, key, write a dense entry)
    reencode: dict[str, list[tuple[int, ...]]] = {}  # encoder name -> row shapes of its dense grids
    reserved = 0  # bytes of the dense entries this pass will write, all on the same disk
    for enc in encoders:
        key = cache_key(enc, digest, device)
        hit = cache.load(key, dense)
        if hit is not None:
            log(f"  {enc.name}: features cached ({key[:12]}), nothing to compute"
                + ("; dense grids streamed from the cache's shards" if dense else ""))
            out[enc.name] = hit
            continue
        store_dense = dense
        if dense:
            shapes = _dense_row_shapes(task, enc, device)
            size = n * sum(2 * math.prod(s) for s in shapes)  # float16
            why = dense_storage(size, dense_budget_gb, cache.root, reserved)
            if why:
                log(f"  {enc.name}: dense features of {n} images would take {size / 1e9:.1f} GB, {why}: not cached; "
                    f"the segmentation heads re-encode each batch instead (same values, encoder time every epoch)")
                reencode[enc.name], store_dense = shapes, False
                hit = cache.load(key, False)
                if hit is not None:
                    out[enc.name] = hit
                    continue
            else:
                reserved += size
                log(f"  {enc.name}: dense features ({size / 1e9:.2f} GB) cached in shards and streamed in batches")
        pending.append((enc, key, store_dense))
    if pending:
        out.update(_compute(task, pending, cache, digest, batch_size, workers, device, shard_bytes, log))
    for name, shapes in reencode.items():
        source = Reencoder(task, next(e for e in encoders if e.name == name), device)
        grids = [ReencodedGrid(source, j, s) for j, s in enumerate(shapes)]
        out[name].patch, out[name].layers, out[name].dense_mode = grids[0], tuple(grids[1:]), "re-encode"
    return out


#: What a throughput times, as its records name it.
TIMED = "encoder forward passes"


def _wait(device: torch.device) -> None:
    """Block until the work queued on `device` is done (CUDA and MPS run asynchronously): the clock then stops
    on the forward pass finished, not on its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def forward_throughput(images: int, seconds: float, device: torch.device, measured: str) -> dict:
    """The record of an encoder's throughput over one extraction pass: `images` over the wall `seconds` of its own
    forward passes (`TIMED`), on `device` of this machine (`hardware`), at the time `measured`."""
    return {"timed": TIMED, "images": images, "seconds": seconds,
            "images_per_s": images / seconds if seconds > 0 else None, **hardware(device), "measured": measured}


#: glibc's mallopt parameter number of M_MMAP_THRESHOLD (malloc.h).
_M_MMAP_THRESHOLD = -3


def _large_allocations_via_mmap(threshold: int = 2**20) -> None:
    """Make glibc serve allocations of `threshold` bytes or more with mmap, so their memory goes back to the system
    when freed. By default glibc raises its threshold to the size of the largest block freed so far, after which
    every batch of features (MBs, allocated and freed once per batch) comes from the heap, whose freed holes it
    keeps: an extraction pass then grew by about the size of the dense grids it had written (16k images, 100 kB
    each: +1.3 GB; with this setting +60 MB, `bench/bench_scale.py`). A no-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


def _compute(task: Task, pending: list[tuple[Encoder, str, bool]], cache: FeatureCache, digest: str,
             batch_size: int, workers: int, device: torch.device, shard_bytes: int,
             log: Callable[[str], object]) -> dict[str, FeatureSet]:
    """One decoding pass feeding every pending encoder; each entry is written shard by shard as it goes."""
    n = len(task)
    # Encoders with the same preprocessing share its output; each distinct one runs once per image, in the workers.
    preprocesses = list(dict.fromkeys(enc.preprocess for enc, _, _ in pending))
    loader = DataLoader(_Images(task, preprocesses), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=_collate, pin_memory=device.type == "cuda",
                        prefetch_factor=PREFETCH if workers > 0 else None, persistent_workers=False)
    names = ", ".join(e.name for e, _, _ in pending)
    _large_allocations_via_mmap()
    writers = {enc.name: cache.writer(key, store, shard_bytes) for enc, key, store in pending}
    out: dict[str, FeatureSet] = {}
    # Each encoder's own forward time: the decoding and preprocessing run in the workers for every encoder of the
    # pass at once, overlapped with the forward passes, so only these seconds belong to one model.
    forward_seconds = {enc.name: 0.0 for enc, _, _ in pending}
    try:
        for enc, _, _ in pending:
            enc.to(device)
        t0 = time.perf_counter()
        with progress(None, f"features {task.name} [{names}]", total=n, unit="img") as bar:
            for errors, inputs in loader:
                if errors:
                    i, message = errors[0]
                    raise TaskError(f"task {task.name}: image {task.table.image_ids[i]!r} could not be read: {message}")
                on_device = [x.to(device, non_blocking=True) for x in inputs]
                for enc, _, store in pending:
                    x = on_device[preprocesses.index(enc.preprocess)]
                    _wait(device)  # the input's copy to the device is not the encoder's time
                    start = time.perf_counter()
                    f = encode_batch(enc, x, device)
                    _wait(device)
                    forward_seconds[enc.name] += time.perf_counter() - start
                    writers[enc.name].add(f.global_.float().cpu().numpy(), dense_grids(f) if store else None)
                bar.update(len(inputs[0]))
        seconds = time.perf_counter() - t0
        log(f"  computed features for {n} images in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} img/s, "
            f"{len(pending)} encoder(s))")
        created = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for enc, key, store in pending:
            w = writers[enc.name]
            g = w.global_features()
            if not np.isfinite(g).all():
                raise FloatingPointError(f"{enc.name}: non-finite features on task {task.name}; nothing was cached")
            rate = forward_throughput(n, forward_seconds[enc.name], device, created)
            w.publish({"encoder": enc.identity(), "task": task.name, "task_digest": digest,
                       "n_images": n, "global_shape": list(g.shape), "dense": store, "precision": precision(device),
                       "format": FEATURE_FORMAT, "created": created, "throughput": rate})
            fs = cache.load(key, store)  # ours, or an identical entry another run published first
            # The rate this run measured, even when another run's identical entry (and its rate) won the rename.
            fs.from_cache, fs.throughput = False, rate
            out[enc.name] = fs
    finally:
        for w in writers.values():
            w.discard()
    return out


# ----------------------------------------------------------------------------- the features of a task's protocols

def dense_view(task: Task, rows: np.ndarray) -> Task:
    """The images `rows` as a task: the task itself when that is every image (so one cache entry holds its global
    and dense features), else a Subset."""
    return task if len(rows) == len(task) else Subset(task, rows, "dense")


def _dense_views(task: Task, dense_rows: Sequence[np.ndarray]) -> list[tuple[np.ndarray, Task]]:
    """Each distinct non-empty row set of `dense_rows` and its view, in the order given."""
    views: dict[bytes, tuple[np.ndarray, Task]] = {}
    for rows in dense_rows:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size:
            views.setdefault(rows.tobytes(), (rows, dense_view(task, rows)))
    return list(views.values())


def feature_passes(task: Task, dense_rows: Sequence[np.ndarray]) -> list[tuple[Task, bool]]:
    """(task or subset, dense) of every extraction pass `extract_store` makes, dense ones first: one per distinct
    dense row set, then the global features of every image unless a dense pass over every image gave them."""
    views = [view for _, view in _dense_views(task, dense_rows)]
    return [(view, True) for view in views] + ([] if any(view is task for view in views) else [(task, False)])


class FeatureStore(Mapping[str, FeatureSet]):
    """The features the protocols of one task read, extracted before any of them runs: as a mapping, each model's
    global features of every image of the task (without dense grids); `dense(rows)`, each model's dense grids of the
    rows a protocol declared (`harness.probes.ProtocolEntry.dense_rows`), in the order of `rows`. `dense` here:
    (rows, model -> features) pairs."""

    def __init__(self, global_: Mapping[str, FeatureSet],
                 dense: Iterable[tuple[np.ndarray, Mapping[str, FeatureSet]]] = ()):
        self._global = dict(global_)
        self._dense = {np.asarray(rows, dtype=np.int64).tobytes(): dict(fs) for rows, fs in dense}

    def __getitem__(self, model: str) -> FeatureSet:
        return self._global[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._global)

    def __len__(self) -> int:
        return len(self._global)

    def dense(self, rows: np.ndarray) -> dict[str, FeatureSet]:
        """model -> the dense features of the task's images `rows`; KeyError when no protocol declared them."""
        key = np.asarray(rows, dtype=np.int64).tobytes()
        if key not in self._dense:
            raise KeyError(f"no dense features of these {len(rows)} rows were extracted: a protocol that reads "
                           "dense grids declares its rows (dense_rows= in harness/probes/__init__.py)")
        return self._dense[key]

    def entries(self, model: str) -> list[FeatureSet]:
        """Every feature set of `model` the store reads, dense passes first, one per feature-cache entry: the
        passes its extraction throughput was measured on."""
        out: dict[str, FeatureSet] = {}
        for fs in (*(d[model] for d in self._dense.values()), self._global[model]):
            out.setdefault(fs.key, fs)
        return list(out.values())

    def keys_by_pass(self) -> list[str]:
        """The feature-cache keys of every entry the store reads, dense passes first."""
        sets = [*(fs for d in self._dense.values() for fs in d.values()), *self._global.values()]
        return list(dict.fromkeys(fs.key for fs in sets))


def extract_store(task: Task, encoders: list[Encoder], cache: FeatureCache, dense_rows: Sequence[np.ndarray] = (),
                  **kwargs: object) -> FeatureStore:
    """Every feature the protocols of `task` will read, in as few passes as possible (`feature_passes`), each
    entry extracted once or read from the cache; `kwargs` are `extract`'s (batch size, workers, device, budget)."""
    dense = [(rows, view, extract(view, encoders, cache, dense=True, **kwargs))
             for rows, view in _dense_views(task, dense_rows)]
    whole = next((fs for _, view, fs in dense if view is task), None)
    global_ = ({name: fs.global_only() for name, fs in whole.items()} if whole is not None else
               extract(task, encoders, cache, dense=False, **kwargs))
    return FeatureStore(global_, [(rows, fs) for rows, _, fs in dense])
