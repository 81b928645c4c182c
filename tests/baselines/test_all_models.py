"""``python -m harness.run --models all`` end to end, with an empty weights folder and with a full one.

The models expected are the registry's (every encoder of the table but the parametrised ``ckpt:DIR``), so a model
added to the table is expected here too: it must then get its files in tests/baselines/tiny_weights.py. Empty: only
the weight-free floors (pixels, random-vit) run; every pretrained model is listed as skipped, naming its folder and
the files to put there.
Full: every family's folder holds a small random model written in that model's published file layout, and every
encoder gets a leaderboard row and a results file carrying the digest of the weight files it loaded. An encoder
registered by one table line from a package of its own shows up in ``--list`` and ``--models all`` with no other
edit.

The weight files (tests/baselines/tiny_weights.py) are written without the reference libraries, so this runs in any
environment; that their parameter names are the official ones is checked against the reference libraries themselves
(timm, open_clip, hi-ml-multimodal) by the test that needs them (CI).
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
from baselines.registry import ENCODERS
from harness.probes import PROTOCOLS
from harness.run import main
from tests.baselines.refs import reference
from tests.baselines.tiny_weights import WRITERS, biomedclip_visual, dinov2_state, mrm_encoder

# What --models all means, read from the table: the weight-free floors and the models with weight files.
ALL = tuple(n for n, e in ENCODERS.entries.items() if not e.takes_arg)
FLOORS = tuple(n for n in ALL if ENCODERS.get(n).weight_files is None)
PRETRAINED = tuple(n for n in ALL if n not in FLOORS)
# Every file name a skip message must mention: the documented layout, plus the alternative layouts where a loader
# accepts more than one. Written out here, not read from the loaders, so a loader that changes them fails this test.
SKIP_MENTIONS = {
    "rad-dino": ("config.json", "model.safetensors"),
    "dinov2-base": ("config.json", "model.safetensors", "dinov2_vitb14_pretrain.pth"),
    "clip": ("config.json", "model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
    "biomedclip": ("open_clip_config.json", "open_clip_pytorch_model.bin"),
    "biovil-t": ("biovil_t_image_model_proj_size_128.pt",),
    "mrm": ("MRM.pth",),
}
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

def test_every_registered_model_has_its_expectations_here():
    """A model added to the table needs its skip message's file names and a writer in tests/baselines/tiny_weights.py."""
    assert FLOORS == ("pixels", "random-vit")  # the leaderboards' floors, weight-free
    assert set(SKIP_MENTIONS) == set(PRETRAINED) == set(WRITERS)


def test_empty_weights_folder_runs_the_floors_and_lists_every_skip(tmp_path, capsys):
    empty = tmp_path / "weights"
    empty.mkdir()
    assert _run(tmp_path, empty) == 0
    table = _encoder_table(capsys.readouterr().out)
    assert set(table) == set(FLOORS) | set(PRETRAINED)  # ckpt:DIR is parametrised, never part of `all`
    for name in FLOORS:
        assert table[name].split()[1] == "ready", table[name]
    for name in PRETRAINED:
        line = table[name]
        assert line.split()[1] == "skipped", line
        assert f"weights not found in {empty / name};" in line, line
        # A model published on the Hugging Face hub is searched in its cache too (conftest points it at tmp).
        assert (os.environ["HF_HUB_CACHE"] in line) == bool(ENCODERS.get(name).weight_files.hub), line
        for f in SKIP_MENTIONS[name]:
            assert f in line, f"{name}: skip reason does not name {f}: {line}"

    lb = tmp_path / "lb"
    rows = _linear_rows((lb / f"{OUT_NAME}.md").read_text())
    assert list(rows) == list(FLOORS)
    assert all(CELL.match(r["macro AUROC"]) for r in rows.values()), rows
    assert sorted(p.stem for p in (lb / "results" / OUT_NAME).glob("*.json")) == sorted(FLOORS)


def test_full_weights_folder_runs_and_ranks_every_model(tmp_path, capsys):
    weights = tmp_path / "weights"
    files = {name: write(weights / name) for name, write in WRITERS.items()}
    assert _run(tmp_path, weights) == 0
    table = _encoder_table(capsys.readouterr().out)
    assert {n: line.split()[1] for n, line in table.items()} == {n: "ready" for n in FLOORS + PRETRAINED}

    lb = tmp_path / "lb"
    rows = _linear_rows((lb / f"{OUT_NAME}.md").read_text())
    assert sorted(rows) == sorted(FLOORS + PRETRAINED)
    for name, row in rows.items():
        assert CELL.match(row["macro AUROC"]) and CELL.match(row["macro AUPRC"]), (name, row)

    for name in FLOORS + PRETRAINED:
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
    WRITERS["rad-dino"](weights / "rad-dino")
    assert main(["--list", "--weights-dir", str(weights)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert f"present in {weights / 'rad-dino'}" in lines["rad-dino"]
    for name in PRETRAINED:
        if name != "rad-dino":
            assert "missing" in lines[name] and f"--models {name}" in lines[name], lines[name]
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
"""


def test_an_encoder_added_by_one_table_line_is_listed_and_part_of_all(tmp_path, monkeypatch, capsys):
    package = f"toy_{tmp_path.name.replace('-', '_')}"  # its own name: the registry caches what it imported
    (tmp_path / "src" / package).mkdir(parents=True)
    (tmp_path / "src" / package / "__init__.py").write_text("")
    (tmp_path / "src" / package / "toy.py").write_text(textwrap.dedent(TOY_ENCODER))
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    monkeypatch.setattr(ENCODERS, "entries", dict(ENCODERS.entries))  # the table as it was, after the test
    ENCODERS.register("toy", f"{package}.toy:build", description="a test's own encoder")

    assert main(["--list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "a test's own encoder" in lines["toy"] and "none needed" in lines["toy"]

    empty = tmp_path / "weights"
    empty.mkdir()
    assert _run(tmp_path, empty) == 0
    table = _encoder_table(capsys.readouterr().out)
    assert table["toy"].split()[1] == "ready"
    rows = _linear_rows((tmp_path / "lb" / f"{OUT_NAME}.md").read_text())
    assert list(rows) == [*FLOORS, "toy"] and CELL.match(rows["toy"]["macro AUROC"])
