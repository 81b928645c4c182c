"""``raddino-bench eval --models all`` end to end, with an empty weights folder and with a full one.

Every expectation is read from the encoder table (every encoder but the parametrised ``ckpt:DIR``) and from each
model's declared `WeightFiles`, so an encoder added by one table line needs no edit here. Empty: only the
weight-free floors run; every pretrained model is one ``skipped  weights missing`` row, and the note under the table
names the folder searched, the Hugging Face cache when a model is published there, and each model's fetch command.
Full: every family `tests.baselines.tiny_weights` can fake holds a small random model in its published file layout,
and every such encoder gets a leaderboard row and a results file carrying the digest of the weight files it loaded
(a family it cannot fake yet stays a listed skip). An encoder registered by one table line from a package of its
own shows up in ``ls`` and ``--models all`` with no other edit, with or without weight files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import textwrap
from pathlib import Path

import pytest
import torch

from baselines.biovil_t import BioViLTImage
from baselines.registry import ENCODERS, weights_status
from harness.listing import WEIGHTS_DIR_PLACEHOLDER
from harness.probes import PROTOCOLS
from harness.run import main
from tests.baselines.refs import reference
from tests.baselines.tiny_weights import WRITERS, biomedclip_visual, dinov2_state, mrm_encoder

# What --models all means, read from the table: the weight-free floors and the models with weight files.
ALL = tuple(n for n, e in ENCODERS.entries.items() if not e.takes_arg)
FLOORS = tuple(n for n in ALL if ENCODERS.get(n).weight_files is None)
PRETRAINED = tuple(n for n in ALL if n not in FLOORS)
# One task spec, no commas: 8 patients (17 images) at the default phantom size, linear probe only.
TASK = "demo:n_patients=8:linear"
OUT_NAME = "demo-n_patients_8"  # the task's options are part of its output names
CELL = re.compile(r"^(\*\*)?-?\d+\.\d{3}(\*\*)? \[-?\d+\.\d{3}, -?\d+\.\d{3}\]( †)?$")


def _run(tmp_path: Path, weights: Path) -> int:
    return main(["--models", "all", "--weights-dir", str(weights), "--tasks", TASK, "--out", str(tmp_path / "lb"),
                 "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "20", "--workers", "0", "--device", "cpu",
                 # a handful of test patients: every label with a patient of each class is scored
                 "--min-positive-patients", "1"])


def _linear_rows(md: str) -> dict[str, dict[str, str]]:
    """model -> {column: cell} of the leaderboard's linear-probe table."""
    section = md.split("## Linear probe", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:  # past the header and its |---| rule
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header[1:], cells[1:]))
    return rows


def _encoder_table(out: str) -> dict[str, str]:
    """model -> its whole line in the encoder status table printed before any task runs."""
    table = out.split("\n\n", 1)[0]
    # stdout holds only this table and the final 'wrote PATH' lines (progress goes to stderr)
    return {line.split()[0]: line for line in table.splitlines()[2:] if line.strip() and not line.startswith("wrote ")}


def _sha256(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- the tests

def _folder(weights: Path, name: str) -> Path:
    return weights / (ENCODERS.get(name).folder or name)


def _note(out: str) -> str:
    """The paragraph under the encoder status table (stdout's second block)."""
    return out.split("\n\n", 2)[1]


def test_the_leaderboards_floors_need_no_weights_and_every_writer_is_a_registered_model():
    assert {"pixels", "random-vit"} <= set(FLOORS)  # leaderboards/refresh.sh runs them on any machine
    assert set(WRITERS) <= set(PRETRAINED)  # a writer for a model the table lost is dead test code


def test_what_models_name_prints_names_every_accepted_file_and_every_place_searched(tmp_path):
    """``--models NAME`` with NAME's weights absent: its folder, every file of every layout it accepts, and the
    Hugging Face cache when it is published there (conftest points the cache at tmp)."""
    empty = tmp_path / "weights"
    empty.mkdir()
    for name in PRETRAINED:
        status = weights_status(name, empty)
        assert status.startswith(f"missing: {name}: weights not found in {_folder(empty, name)};"), status
        declared = ENCODERS.get(name).weight_files
        for f in {f for layout in declared.layouts for f in layout}:
            assert f in status, f"{name}: the message does not name {f}: {status}"
        assert (os.environ["HF_HUB_CACHE"] in status) == bool(declared.hub), status


@pytest.mark.slow
def test_empty_weights_folder_runs_the_floors_and_lists_every_skip(tmp_path, capsys):
    empty = tmp_path / "weights"
    empty.mkdir()
    assert _run(tmp_path, empty) == 0
    out = capsys.readouterr().out
    table = _encoder_table(out)
    assert set(table) == set(FLOORS) | set(PRETRAINED)  # ckpt:DIR is parametrised, never part of `all`
    for name in FLOORS:
        assert table[name].split()[1] == "ready", table[name]
    for name in PRETRAINED:
        assert table[name].split()[1:] == ["skipped", "weights", "missing"], table[name]
    note = _note(out)
    assert f"{empty}/<model>/" in note, note
    assert (os.environ["HF_HUB_CACHE"] in note) == any(ENCODERS.get(n).weight_files.hub for n in PRETRAINED)
    for name in PRETRAINED:
        assert name in note
        download = ENCODERS.get(name).weight_files.download
        assert download.replace(WEIGHTS_DIR_PLACEHOLDER, str(empty)) in note, f"{name}: no fetch command\n{note}"

    lb = tmp_path / "lb"
    rows = _linear_rows((lb / f"{OUT_NAME}.md").read_text())
    assert list(rows) == list(FLOORS)
    assert all(CELL.match(r["macro AUROC"]) for r in rows.values()), rows
    assert sorted(p.stem for p in (lb / "results" / OUT_NAME).glob("*.json")) == sorted(FLOORS)


@pytest.mark.slow
def test_full_weights_folder_runs_and_ranks_every_model(tmp_path, capsys):
    weights = tmp_path / "weights"
    files = {name: write(_folder(weights, name)) for name, write in WRITERS.items()}
    ready = FLOORS + tuple(n for n in PRETRAINED if n in WRITERS)
    assert _run(tmp_path, weights) == 0
    table = _encoder_table(capsys.readouterr().out)
    assert {n: line.split()[1] for n, line in table.items()} == \
        {n: "ready" if n in ready else "skipped" for n in FLOORS + PRETRAINED}

    lb = tmp_path / "lb"
    rows = _linear_rows((lb / f"{OUT_NAME}.md").read_text())
    assert sorted(rows) == sorted(ready)
    for name, row in rows.items():
        assert CELL.match(row["macro AUROC"]) and CELL.match(row["macro AUPRC"]), (name, row)

    for name in ready:
        res = json.loads((lb / "results" / OUT_NAME / f"{name}.json").read_text())
        assert res["model"] == name
        digest = res["encoder"]["weights_digest"]
        if name in files:  # the bytes of exactly the files written above, in the loader's order
            assert digest == _sha256(files[name]), name
        else:
            assert re.fullmatch(r"[0-9a-f]{64}", digest), (name, digest)
        assert table[name].split()[2] == digest[:12], table[name]
        macro = res["protocols"]["linear"]["metrics"]["auroc"]["macro"]
        assert 0.0 <= macro["lo"] <= macro["point"] <= macro["hi"] <= 1.0, (name, macro)


def _names_and_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dinov2-base", "biomedclip", "biovil-t", "mrm"])
def test_written_files_use_the_official_parameter_names(family):
    """The formats tiny_weights writes without the reference libraries hold exactly the names and shapes the reference
    implementations save (a loader could otherwise be tested against a layout only this file believes in)."""
    if family == "dinov2-base":
        reference("timm")
        from timm.models.vision_transformer import VisionTransformer as TimmViT

        # timm's DINOv2 ViT keeps the official parameter names; the official file adds the iBOT mask token.
        ref = TimmViT(img_size=518, patch_size=14, embed_dim=128, depth=2, num_heads=2, init_values=1.0,
                      num_classes=0).state_dict() | {"mask_token": torch.zeros(1, 128)}
        ours = dinov2_state()
    elif family == "biomedclip":
        reference("open_clip")
        timm = reference("timm")
        from open_clip.timm_model import TimmModel

        tower = TimmModel("vit_base_patch16_224", embed_dim=48, image_size=224, pool="", proj="linear")
        tower.trunk = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=128, depth=2,
                                        num_heads=2, num_classes=0)
        tower.head.proj = torch.nn.Linear(128, 48, bias=False)
        ref = {f"visual.{k}": v for k, v in tower.state_dict().items()}
        ours = biomedclip_visual()
    elif family == "biovil-t":
        reference("health_multimodal.image")
        from baselines.biovil_t import UNUSED
        from health_multimodal.image.model.model import ImageModel
        from health_multimodal.image.model.types import ImageEncoderType

        full = ImageModel(img_encoder_type=ImageEncoderType.RESNET50_MULTI_IMAGE, joint_feature_size=128)
        ref = {k: v for k, v in full.state_dict().items() if not k.startswith(UNUSED)}
        ours = BioViLTImage().state_dict()
    else:
        reference("timm")
        from functools import partial

        from timm.models.vision_transformer import VisionTransformer as TimmViT

        ref = TimmViT(img_size=224, patch_size=16, embed_dim=128, depth=2, num_heads=2, qkv_bias=True,
                      norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_classes=0).state_dict()
        ours = mrm_encoder()
    assert _names_and_shapes(ours) == _names_and_shapes(ref)


def test_list_says_whose_weights_are_present_and_where_and_shows_the_protocols(tmp_path, capsys):
    weights = tmp_path / "weights"
    WRITERS["rad-dino"](_folder(weights, "rad-dino"))
    assert main(["--list", "--weights-dir", str(weights)]) == 0
    encoders, note, *others = capsys.readouterr().out.split("\n\n")  # the encoder table, its note, the rest
    lines = {line.split()[0]: line for block in (encoders, *others) for line in block.splitlines() if line.strip()}
    assert f"present in {_folder(weights, 'rad-dino')}" in lines["rad-dino"]
    missing = [n for n in PRETRAINED if n != "rad-dino"]
    for name in missing:
        assert re.search(r"\smissing\s", lines[name]), lines[name]
    assert f"Weights missing for {', '.join(missing)}:" in " ".join(note.split()), note
    for name in FLOORS:
        assert "none needed" in lines[name]
    for name, p in PROTOCOLS.entries.items():
        assert name in lines and ("yes" in lines[name]) == p.default, lines[name]
    assert lines["demographics"].split()[2] == "linear"  # the protocol it runs after


TOY_ENCODER = """
import torch
import torch.nn.functional as F

from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, Features


class Toy(Encoder):
    def __init__(self, name):
        self.name, self.weights_digest = name, "0" * 64
        self.preprocess = Preprocess(size=32, policy="resize_stretch", interpolation="area", mean=(0.5,),
                                     std=(0.25,), channels=1)

    def encode(self, pixels):
        grid = F.avg_pool2d(pixels, 4)
        return Features(global_=grid.flatten(1), patch=grid)


def build(spec: EncoderSpec) -> Encoder:
    return Toy(spec.name)


def build_pretrained(spec: EncoderSpec) -> Encoder:
    spec.require_weights()
    return Toy(spec.name)
"""


@pytest.mark.slow
def test_an_encoder_added_by_one_table_line_is_listed_and_part_of_all(tmp_path, monkeypatch, capsys):
    """Two encoders of a package of its own, one weight-free and one declaring a weight file: each is listed and
    part of `all` by its table line alone, the second a listed skip until its file is in its folder."""
    package = f"toy_{tmp_path.name.replace('-', '_')}"  # its own name: the registry caches what it imported
    (tmp_path / "src" / package).mkdir(parents=True)
    (tmp_path / "src" / package / "__init__.py").write_text("")
    (tmp_path / "src" / package / "toy.py").write_text(textwrap.dedent(TOY_ENCODER))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setattr(ENCODERS, "entries", dict(ENCODERS.entries))  # the table as it was, after the test
    ENCODERS.register("toy", f"{package}.toy:build", description="a test's own encoder")
    ENCODERS.register("toy-pretrained", f"{package}.toy:build_pretrained", weights=("toy.pt",),
                      description="a test's own encoder with a weight file")

    empty = tmp_path / "weights"
    empty.mkdir()
    assert main(["--list", "--weights-dir", str(empty)]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "a test's own encoder" in lines["toy"] and "none needed" in lines["toy"]
    assert "toy.pt" in lines["toy-pretrained"] and re.search(r"\smissing\s", lines["toy-pretrained"])

    assert _run(tmp_path, empty) == 0
    out = capsys.readouterr().out
    table = _encoder_table(out)
    assert table["toy"].split()[1] == "ready"
    assert table["toy-pretrained"].split()[1:] == ["skipped", "weights", "missing"]
    assert "toy-pretrained" in _note(out)
    rows = _linear_rows((tmp_path / "lb" / f"{OUT_NAME}.md").read_text())
    assert list(rows) == [*FLOORS, "toy"] and CELL.match(rows["toy"]["macro AUROC"])

    (empty / "toy-pretrained").mkdir()
    (empty / "toy-pretrained" / "toy.pt").write_bytes(b"toy")
    assert _run(tmp_path, empty) == 0
    assert _encoder_table(capsys.readouterr().out)["toy-pretrained"].split()[1] == "ready"
    rows = _linear_rows((tmp_path / "lb" / f"{OUT_NAME}.md").read_text())
    assert list(rows) == [*FLOORS, "toy", "toy-pretrained"]
