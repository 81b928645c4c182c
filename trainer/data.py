"""Unlabelled radiographs for pretraining: manifests, a deterministic resumable sample stream, and batches.

A manifest is a folder (searched recursively), a ``.txt`` list (one path a line), or a ``.csv``/``.parquet`` table
with a ``path`` column; relative paths are resolved against the manifest's own folder. Several manifests may be
mixed with weights: ``a.csv@0.7 b_folder@0.3`` draws 70 % of the samples from ``a``. Without weights every image
is seen once per pass, in a fresh random order each pass.

The sample stream is a pure function of (seed, position): position ``q`` always names the same image, whatever the
number of processes. A step of the run consumes ``batch_size_per_gpu * world_size`` consecutive positions and rank
``r`` takes its slice, so the checkpoint only needs the number of samples consumed (unlike DINOv2, whose sampler
is not advanced on resume: dinov2/train/train.py) and a run may resume on a different number of GPUs.

Every image is decoded by ``harness.common.imaging.load_radiograph`` to [0, 1] and resized to a ``load_size``
square, so that a batch is one tensor [B, 1, S, S]; the multi-crop augmentation then runs batched on the training
device (trainer.crops).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import multiprocessing
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from harness.common.errors import DataError, first_line
from harness.common.imaging import RASTER_SUFFIXES, ImageDecodeError, is_dicom, load_radiograph

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = RASTER_SUFFIXES | {".dcm", ".dicom"}
PATH_COLUMNS = ("path", "image", "file", "filename")
MAX_REPLACEMENTS = 100  # unreadable images replaced in a row before the run is stopped as hopeless


class BadImageError(DataError):
    """An image could not be read and --skip-bad is off; the message names the file."""


@dataclass(frozen=True)
class Source:
    path: Path
    weight: float | None


def parse_source(spec: str) -> Source:
    """``PATH`` or ``PATH@WEIGHT``."""
    head, sep, tail = spec.rpartition("@")
    if sep:
        try:
            weight = float(tail)
        except ValueError:
            weight = None
        if weight is not None:
            if not weight > 0:
                raise ValueError(f"data source {spec!r}: weight must be > 0")
            return Source(Path(head), weight)
    return Source(Path(spec), None)


def read_manifest(path: Path) -> list[Path]:
    """The image paths a folder or list file names, in a stable order."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _looks_like_image(p))
    elif not path.exists():
        relative = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
        raise FileNotFoundError(f"data manifest {path} does not exist{relative}: pass --data an existing folder, "
                                ".txt, .csv or .parquet list")
    elif path.suffix == ".txt":
        try:
            text = path.read_text()
        except UnicodeDecodeError as e:
            raise ValueError(f"data manifest {path}: not a text file ({e.reason} at byte {e.start}); a .txt "
                             "lists one image path a line") from None
        lines = (line.strip() for line in text.splitlines())
        files = [_resolve(path, line) for line in lines if line and not line.startswith("#")]
    elif path.suffix in (".csv", ".parquet"):
        files = [_resolve(path, p) for p in _path_column(path)]
    else:
        raise ValueError(f"data manifest {path}: use a folder, .txt, .csv or .parquet list")
    if not files:
        raise ValueError(f"data manifest {path} lists no images: a folder is searched recursively for PNG/JPEG/DICOM "
                         "files, a .txt lists one path a line, a .csv/.parquet in a path column")
    return files


def existing_files(manifest: Path, files: list[Path], skip_bad: bool) -> list[Path]:
    """The listed files that exist. Missing ones stop the run here, counted, before any model is built (rather than
    one at a time, hours in); with ``skip_bad`` they are left out with a warning, unless none is left."""
    missing = {p for p in files if not p.is_file()}
    if not missing:
        return files
    first = next(p for p in files if p in missing)
    what = (f"data manifest {manifest}: {len(missing)} of the {len(files)} images it lists do not exist (first: "
            f"{first}; relative paths are relative to the manifest's folder)")
    if len(missing) == len(files):
        raise ValueError(f"{what}: fix the paths or pass --data another manifest")
    if not skip_bad:
        raise ValueError(f"{what}: fix or remove them, or pass --skip-bad to leave them out")
    log.warning("%s: left out (--skip-bad)", what)
    return [p for p in files if p not in missing]


def _looks_like_image(p: Path) -> bool:
    # DICOMs are often named by UID with no image suffix: sniff the magic for unknown suffixes only.
    suffix = p.suffix.lower()
    return suffix in IMAGE_SUFFIXES or (suffix not in {".txt", ".csv", ".md", ".json", ".parquet"} and is_dicom(p))


def _resolve(manifest: Path, entry: str) -> Path:
    p = Path(entry)
    return p if p.is_absolute() else manifest.parent / p


def _path_column(path: Path) -> list[str]:
    import polars as pl

    try:
        df = pl.read_csv(path, infer_schema_length=0) if path.suffix == ".csv" else pl.read_parquet(path)
    except Exception as e:  # polars' own error types: whatever it is, this file is not a table it can read
        raise ValueError(f"data manifest {path}: cannot be read as {path.suffix} ({first_line(e)})") from None
    for name in PATH_COLUMNS:
        if name in df.columns:
            return [str(v) for v in df[name].drop_nulls().to_list()]
    raise ValueError(f"data manifest {path}: no image column; name one of {PATH_COLUMNS} (found {df.columns})")


class SampleStream:
    """Position -> image index, deterministic in (seed, position), for an unbounded run.

    Positions are grouped in passes of N (the number of images). Unweighted: each pass is a permutation, so every
    image appears once. Weighted: each pass draws N indices with replacement from the per-image probabilities
    ``weight_s / n_s`` (normalised).
    """

    def __init__(self, sources: list[str], seed: int, skip_bad: bool = False):
        parsed = [parse_source(s) for s in sources]
        if not parsed:
            raise ValueError("no data: pass --data MANIFEST (a folder, .txt, .csv or .parquet)")
        weighted = [s.weight is not None for s in parsed]
        if any(weighted) and not all(weighted):
            raise ValueError(f"data sources {sources}: give a weight (PATH@W) to every source or to none")
        self.paths: list[Path] = []
        probs = []
        for src in parsed:
            files = read_manifest(src.path)
            if not src.path.is_dir():  # a folder lists what it holds; a list file may name files that are gone
                files = existing_files(src.path, files, skip_bad)
            self.paths += files
            if src.weight is not None:
                probs.append(np.full(len(files), src.weight / len(files)))
        self.probs = np.concatenate(probs) / sum(p.sum() for p in probs) if probs else None
        self.seed = seed
        self._pass = (-1, np.empty(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.paths)

    def index_at(self, position: int) -> int:
        n = len(self.paths)
        pass_id, offset = divmod(position, n)
        if self._pass[0] != pass_id:
            rng = np.random.default_rng([self.seed, 0, pass_id])
            order = rng.permutation(n) if self.probs is None else rng.choice(n, size=n, p=self.probs)
            self._pass = (pass_id, order)
        return int(self._pass[1][offset])

    def replacement(self, position: int, attempt: int) -> int:
        """A stand-in for an unreadable image at this position, the same on every run."""
        rng = np.random.default_rng([self.seed, 1, position, attempt])
        return int(rng.choice(len(self.paths), p=self.probs))


def load_square(path: Path, size: int) -> torch.Tensor:
    """Decode to [0, 1] and resize the whole radiograph to [1, size, size] (antialiased).

    Stretching rather than cropping keeps all of the anatomy; the random resized crops vary the aspect ratio by
    3/4..4/3 anyway. The ``ckpt:`` encoder of the harness feeds evaluation images the same way (resize_stretch).
    """
    # min_side: a JPEG 2000 file may be decoded at a reduced resolution level that is still at least `size` on its
    # short side (4-47x faster on full-size radiographs), since it is resized to `size` right after anyway.
    img = torch.from_numpy(load_radiograph(path, min_side=size))[None, None]
    img = F.interpolate(img, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return img[0].clamp_(0.0, 1.0)


class RankBatches(IterableDataset):
    """This rank's batches from ``start_position`` on: one dict {"images": [B,1,S,S], "n_bad": int} per step.

    With several DataLoader workers, worker w produces steps w, w + n_workers, ...; the DataLoader hands results
    back in round-robin order, so the sequence does not depend on the number of workers.
    """

    def __init__(self, stream: SampleStream, batch_size: int, image_size: int, rank: int, world_size: int,
                 start_position: int, skip_bad: bool, cache: bool = False):
        self.stream, self.batch_size, self.image_size = stream, batch_size, image_size
        self.rank, self.world_size, self.start_position = rank, world_size, start_position
        self.skip_bad = skip_bad
        # Decoded, resized images by index, for data sets small enough to hold in memory (decoding a PNG costs
        # more than a tiny model's step). Each DataLoader worker fills its own copy.
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        step = worker
        while True:
            first = self.start_position + step * self.batch_size * self.world_size + self.rank * self.batch_size
            try:
                batch = self.batch(first)
            except BadImageError as e:
                if info is None:
                    raise
                # In a worker process, handed over as a value: a DataLoader re-raises a worker's exception with the
                # worker's traceback in its message, and `Batches` raises it again in the main process as it was.
                yield {"error": str(e)}
                return
            yield batch
            step += n_workers

    def batch(self, first: int) -> dict:
        images, n_bad = [], 0
        for position in range(first, first + self.batch_size):
            image, bad = self.load_position(position)
            images.append(image)
            n_bad += bad
        return {"images": torch.stack(images), "n_bad": n_bad}

    def load_position(self, position: int) -> tuple[torch.Tensor, int]:
        index = self.stream.index_at(position)
        for attempt in range(MAX_REPLACEMENTS):
            if self.cache is not None and index in self.cache:
                return self.cache[index], attempt
            path = self.stream.paths[index]
            try:
                image = load_square(path, self.image_size)
                if self.cache is not None:
                    self.cache[index] = image
                return image, attempt
            except ImageDecodeError as e:
                if not self.skip_bad:
                    raise BadImageError(f"{e}; fix or remove this file from the manifest, "
                                        "or pass --skip-bad to skip unreadable images") from e
                log.warning("skipping unreadable image %s (%s)", path, e)
                index = self.stream.replacement(position, attempt)
        raise BadImageError(f"{MAX_REPLACEMENTS} unreadable images in a row at sample {position} (--skip-bad): "
                            "check the manifest (is it the right folder? are these images?)")


def make_loader(stream: SampleStream, batch_size: int, image_size: int, rank: int, world_size: int,
                start_position: int, skip_bad: bool, num_workers: int, pin_memory: bool,
                cache: bool = False) -> Batches:
    """An endless iterator of this rank's batches; `Batches.close` when done with it."""
    dataset = RankBatches(stream, batch_size, image_size, rank, world_size, start_position, skip_bad, cache)
    return Batches(dataset, num_workers, pin_memory)


class Batches:
    """This rank's batches, decoded in the main process or by DataLoader worker processes.

    The workers ignore the signals that stop a run (SIGTERM and SIGUSR1, which SLURM sends to every process of a
    job step; SIGINT, which a terminal's Ctrl-C sends to the whole process group): a worker dead of them would
    fail the main process's next fetch before it could write its checkpoint. Ignoring SIGTERM for good would
    make them immortal, though: at exit Python's multiprocessing stops them with SIGTERM and then waits for them,
    forever. So `close` raises a flag the workers share, after which SIGTERM ends them; the trainer closes its
    batches whatever way its loop ends.
    """

    def __init__(self, dataset: RankBatches, num_workers: int, pin_memory: bool):
        self.closing: Any = None
        if num_workers == 0:
            self._batches: Iterator[dict] = iter(dataset)
            return
        # Lock-free shared memory: the workers read it in a signal handler.
        self.closing = multiprocessing.RawValue(ctypes.c_bool, False)
        loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                            prefetch_factor=2, worker_init_fn=functools.partial(_worker_signals, self.closing))
        self._batches = iter(loader)

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        batch = next(self._batches)
        if "error" in batch:
            raise BadImageError(batch["error"])
        return batch

    def close(self) -> None:
        """Let the worker processes go: the DataLoader stops them at once when nothing else holds it (a traceback
        being raised may), else multiprocessing's SIGTERM at exit does."""
        if self.closing is not None:
            self.closing.value = True
        self._batches = iter(())


def _worker_signals(closing: Any, worker_id: int) -> None:
    """A worker's signal handlers (see `Batches`): the stop signals are ignored until the loader is closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, functools.partial(_exit_once_closed, closing))


def _exit_once_closed(closing: Any, signum: int, frame: object) -> None:
    if closing.value:
        # Status 0: the main process's DataLoader reports a worker that ends by a signal as an error of its own.
        os._exit(0)
