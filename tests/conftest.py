"""Shared test fixtures: where ../shared lives, deterministic torch settings, private caches, whether a SLURM
controller answers, and how tests are spread over pytest-xdist workers."""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# A git worktree checked out away from the main clone finds ../shared through $RADDINO_BENCH_SHARED.
SHARED = Path(os.environ.get("RADDINO_BENCH_SHARED") or REPO.parent / "shared")
SHARED_CXR = SHARED / "data" / "ieee8023-covid-cxr"


# Under pytest-xdist (`-n 2`, README) every worker is a process of its own, and torch's default intra-op pool is one
# thread per core in each: two workers on two cores would run four busy threads, and oversubscribed OpenMP threads
# spin instead of working. One thread per worker keeps the workers from stealing each other's cores. A serial run
# keeps torch's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Tests that must not run beside each other on two workers, by the marker that says what they share: every `slurm`
# test submits to the same one-node local cluster (two workers' jobs would queue behind each other past the tests'
# waits), and every `gloo` test starts two ranks on loopback ports picked free a moment before they are bound.
XDIST_GROUPS = ("slurm", "gloo")


def pytest_collection_modifyitems(config, items):
    """Put each group's tests on one worker (`--dist loadgroup`); a no-op without pytest-xdist, whose marker would
    not be registered."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        for group in XDIST_GROUPS:
            if item.get_closest_marker(group):
                item.add_marker(pytest.mark.xdist_group(group))
                break


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Tests never read or write the user's caches (file-digest memo, default feature cache, and the Hugging Face
    hub cache the encoders search for weights: a model cached there would otherwise load instead of a skip)."""
    monkeypatch.setenv("RADDINO_BENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-hub"))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to resolve a host name or open a connection fails the test (requests, urllib3 and httpx all go
    through these)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("a model loader tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.fixture
def shared_cxr() -> Path:
    """The real CXR subset in ../shared; skips the test with a reason when it is absent."""
    if not (SHARED_CXR / "labels.csv").exists():
        pytest.skip(f"../shared data not found at {SHARED_CXR}")
    return SHARED_CXR


@pytest.fixture(scope="module")
def blob_images(tmp_path_factory) -> Path:
    """16 small grey PNGs with random blobs (distinct images so KoLeo and the losses have something to see)."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    for i in range(16):
        img = np.zeros((48, 48))
        for _ in range(4):
            cy, cx, r = rng.uniform(0, 48, 2).tolist() + [rng.uniform(4, 14)]
            img += rng.uniform(0.3, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
        Image.fromarray((255 * img / img.max()).astype(np.uint8)).save(root / f"{i:02d}.png")
    return root


@pytest.fixture
def one_thread():
    """In-process training on one thread: on a busy 2-core machine two OpenMP threads can run 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def nothing_built(monkeypatch):
    """Fail the test if the evaluation builds an encoder or a task: what must be checked before any model loads."""
    import harness.evaluate
    import harness.outputs

    def refuse(*args, **kwargs):
        raise AssertionError(f"built before the command line was checked: {args}")

    monkeypatch.setattr(harness.evaluate, "build_encoder", refuse)
    monkeypatch.setattr(harness.outputs, "build_task", refuse)


@functools.lru_cache(maxsize=1)
def slurm_unreachable() -> str | None:
    """Why no SLURM controller with a usable node answers here, or None when ``sinfo`` shows one: the reason the
    tests that submit jobs skip."""
    if shutil.which("sinfo") is None:
        return "sinfo not found (for a local cluster: bash slurm/local-cluster/start.sh)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    if r.returncode != 0:
        return f"sinfo failed: {r.stderr.strip() or r.returncode}"
    states = {s.rstrip("*~#!%$@^-") for s in r.stdout.split()}
    if not states & {"idle", "mixed", "allocated", "completing"}:
        return f"no node is up (sinfo: {', '.join(sorted(states)) or 'no nodes'})"
    return None
