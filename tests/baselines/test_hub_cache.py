"""Weights found in the user's Hugging Face cache: a fake hub cache in tmp_path laid out as huggingface_hub writes
it (``models--ORG--NAME/blobs``, ``snapshots/<commit>/`` symlinks, ``refs/main``) holds small random models in the
official formats; the encoders load from it when ``--weights-dir/<model>`` is empty, ``--weights-dir`` wins when both
hold weights, and a model in neither place is reported with both places and the fetch command. Importing and
building never changes ``os.environ`` nor reaches the network."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Dinov2Config, Dinov2Model

from baselines.registry import WeightsMissing, build_encoder, weights_status
from harness.common.hashing import sha256_files
from tests.baselines.refs import assert_close, pixels, randomise_
from tests.baselines.tiny_weights import WRITERS
from tests.conftest import REPO

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=128, image_size=56,
            patch_size=14)
RAD_DINO = "microsoft/rad-dino"
BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def hub_cache() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])  # a fresh tmp folder per test (conftest)


def publish(staged: Path, repo_id: str, revision: str, ref: str | None = "main") -> Path:
    """The files of `staged` as a download of `repo_id` at commit `revision` leaves them in the hub cache:
    content-addressed blobs, a snapshot folder of relative symlinks, and ``refs/<ref>`` naming the commit."""
    repo = hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(staged.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(revision)
    return snap


def tiny_dinov2(folder: Path, seed: int = 0) -> Dinov2Model:
    model = randomise_(Dinov2Model(Dinov2Config(**TINY)), seed=seed).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture
def empty_weights(tmp_path) -> Path:
    folder = tmp_path / "weights"
    folder.mkdir()
    return folder


def test_rad_dino_loads_from_the_hf_cache_offline(tmp_path, empty_weights, no_network):
    ref = tiny_dinov2(tmp_path / "stage")
    snap = publish(tmp_path / "stage", RAD_DINO, "a" * 40)
    enc = build_encoder("rad-dino", weights_dir=empty_weights)
    assert enc.weights_folder == snap
    assert enc.weights_digest == sha256_files([snap / "config.json", snap / "model.safetensors"])
    x = pixels(1, 56)
    with torch.no_grad():
        assert_close(enc.encode(x).global_, ref(pixel_values=x).pooler_output, "global from the cached snapshot")
    assert weights_status("rad-dino", empty_weights) == f"present in {snap}"


def test_weights_dir_wins_over_the_hf_cache(tmp_path, empty_weights):
    tiny_dinov2(tmp_path / "stage", seed=0)
    snap = publish(tmp_path / "stage", RAD_DINO, "a" * 40)
    tiny_dinov2(empty_weights / "rad-dino", seed=1)
    enc = build_encoder("rad-dino", weights_dir=empty_weights)
    assert enc.weights_folder == empty_weights / "rad-dino"
    own = sha256_files([empty_weights / "rad-dino" / f for f in ("config.json", "model.safetensors")])
    assert enc.weights_digest == own != sha256_files([snap / "config.json", snap / "model.safetensors"])


def test_newest_complete_snapshot_is_taken(tmp_path, empty_weights):
    """refs/main names a snapshot whose weights blob is missing (an interrupted download): it is passed over for the
    newest complete one, which is neither the first nor the last by name."""
    snapshots = hub_cache() / "models--microsoft--rad-dino" / "snapshots"
    for i, (rev, mtime) in enumerate((("a", 1_000_000), ("b", 3_000_000), ("c", 2_000_000), ("d", None))):
        tiny_dinov2(tmp_path / f"stage{i}", seed=i)
        publish(tmp_path / f"stage{i}", RAD_DINO, rev * 40, ref="main" if rev == "d" else None)
        if mtime is not None:
            os.utime(snapshots / (rev * 40), (mtime, mtime))
    (snapshots / ("d" * 40) / "model.safetensors").resolve().unlink()  # the symlink now dangles
    enc = build_encoder("rad-dino", weights_dir=empty_weights)
    assert enc.weights_folder == snapshots / ("b" * 40)


def test_missing_everywhere_names_both_places_and_the_command(empty_weights):
    with pytest.raises(WeightsMissing) as e:
        build_encoder("rad-dino", weights_dir=empty_weights)
    msg = str(e.value)
    for part in (str(empty_weights / "rad-dino"), str(hub_cache()), RAD_DINO, "model.safetensors",
                 "hf download microsoft/rad-dino"):
        assert part in msg, (part, msg)
    assert weights_status("rad-dino", empty_weights) == f"missing: {msg}"
    # MRM is not on a hub: its message names only the folder.
    with pytest.raises(WeightsMissing) as e:
        build_encoder("mrm", weights_dir=empty_weights)
    assert str(empty_weights / "mrm") in str(e.value) and "Hugging Face cache" not in str(e.value)
    assert weights_status("pixels") == "none needed" and weights_status("ckpt") == "given as ckpt:ARG"


def test_other_repos_and_incomplete_snapshots_do_not_count(tmp_path, empty_weights):
    """A snapshot of another repo, or of the right repo without every file, is not taken for the model."""
    tiny_dinov2(tmp_path / "stage")
    publish(tmp_path / "stage", "facebook/dinov2-base", "a" * 40)  # dinov2-base's repo, not rad-dino's
    (tmp_path / "stage" / "model.safetensors").unlink()
    publish(tmp_path / "stage", RAD_DINO, "b" * 40)
    with pytest.raises(WeightsMissing):
        build_encoder("rad-dino", weights_dir=empty_weights)
    assert build_encoder("dinov2-base", weights_dir=empty_weights).weights_folder.parent.parent.name == \
        "models--facebook--dinov2-base"


def test_biomedclip_open_clip_folder_loads_from_the_hf_cache(tmp_path, empty_weights, no_network):
    files = WRITERS["biomedclip"](tmp_path / "stage")
    snap = publish(tmp_path / "stage", BIOMEDCLIP, "d" * 40)
    enc = build_encoder("biomedclip", weights_dir=empty_weights)
    assert enc.weights_folder == snap
    assert enc.weights_digest == sha256_files(files)  # the same bytes, read through the snapshot's symlinks
    assert enc.encode(pixels(1, 224)).global_.shape == (1, 48)
    # --weights-dir wins here too.
    WRITERS["biomedclip"](empty_weights / "biomedclip")
    assert build_encoder("biomedclip", weights_dir=empty_weights).weights_folder == empty_weights / "biomedclip"


def test_clip_transformers_folder_loads_from_the_hf_cache(tmp_path, empty_weights, no_network):
    WRITERS["clip"](tmp_path / "stage")
    snap = publish(tmp_path / "stage", "openai/clip-vit-base-patch16", "e" * 40)
    assert build_encoder("clip", weights_dir=empty_weights).weights_folder == snap


@pytest.mark.slow
def test_import_and_build_leave_the_environment_alone(tmp_path):
    """In a fresh interpreter (imports happen once per process): importing every registered encoder family, task
    and protocol, then building an encoder from --weights-dir and from the hub cache, changes no environment
    variable and opens no connection."""
    tiny_dinov2(tmp_path / "weights" / "rad-dino")
    tiny_dinov2(tmp_path / "stage")
    publish(tmp_path / "stage", RAD_DINO, "a" * 40)
    script = f"""
import os, socket, sys
from pathlib import Path

def refuse(*args, **kwargs):
    raise SystemExit("network access")

socket.socket.connect = socket.create_connection = socket.getaddrinfo = refuse
# Third-party libraries the linear probe imports set their own variables at import (polars its allocator's, sklearn
# OpenMP's): imported before the snapshot, so that only our modules are under test.
import polars, sklearn.linear_model
before = dict(os.environ)
from baselines.registry import ENCODERS, build_encoder
from harness.probes import PROTOCOLS
from harness.tasks import TASKS
# Every module a table line points at (each imported on first use), not only those a run happens to load.
for table in (ENCODERS, TASKS, PROTOCOLS):
    for name in table:
        table.load(name)
own = build_encoder("rad-dino", weights_dir=Path({str(tmp_path / "weights")!r}))
cached = build_encoder("rad-dino", weights_dir=Path({str(tmp_path / "empty")!r}))
assert own.weights_folder != cached.weights_folder
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print("changed:", changed)
sys.exit(1 if changed else 0)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = str(REPO)
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
