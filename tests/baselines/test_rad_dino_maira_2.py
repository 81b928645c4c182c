"""rad-dino-maira-2: RAD-DINO's factory on another checkpoint. A small random Dinov2Model saved as a transformers
folder, loaded through the registry and checked on real radiographs against transformers' Dinov2Model (global) and
its own Dinov2Backbone (patch grid and layers); the preprocessing against a BitImageProcessor with the hub values
(those of RAD-DINO); the config check; where its weights are looked for."""
from __future__ import annotations

import pytest
from transformers import BitImageProcessor, Dinov2Backbone, Dinov2Model

import baselines.rad_dino as rad_dino
from baselines._hf import ConfigMismatch
from baselines.registry import ENCODERS, WeightsMissing, build_encoder
from harness.listing import licence_cell
from tests.baselines.refs import assert_matches_model_and_backbone, assert_preprocessing_matches, radiographs
from tests.baselines.tiny_weights import tiny_dinov2, tiny_dinov2_reg

NAME = "rad-dino-maira-2"
# microsoft/rad-dino-maira-2's preprocessor_config.json values: RAD-DINO's.
PROCESSOR = dict(size={"shortest_edge": 518}, resample=3, do_center_crop=True, crop_size={"height": 518, "width": 518},
                 image_mean=[0.5307] * 3, image_std=[0.2583] * 3)


def test_matches_the_model_and_its_backbone(tmp_path, shared_cxr, no_network):
    tiny_dinov2(layers=4).save_pretrained(tmp_path / NAME)
    enc = build_encoder(NAME, weights_dir=tmp_path)
    ref = Dinov2Model.from_pretrained(tmp_path / NAME).eval()
    backbone = Dinov2Backbone.from_pretrained(tmp_path / NAME,
                                              out_features=["stage1", "stage2", "stage3", "stage4"]).eval()
    assert_matches_model_and_backbone(enc, ref, backbone, shared_cxr, (64, 37, 37), 'patch')
    assert enc.weights_folder == tmp_path / NAME


def test_same_factory_and_preprocessing_as_rad_dino_other_weights():
    entry, base = ENCODERS.get(NAME), ENCODERS.get("rad-dino")
    assert entry.target == base.target == "baselines.rad_dino:rad_dino"
    assert [r.repo_id for r in entry.weight_files.hub] == ["microsoft/rad-dino-maira-2"]
    assert licence_cell(entry) == "MSRLA"


def test_preprocessing_matches_the_hub_processor(shared_cxr):
    for path in radiographs(shared_cxr):
        assert_preprocessing_matches(rad_dino.NATIVE, BitImageProcessor(**PROCESSOR), path)


def test_its_own_folder_not_rad_dinos(tmp_path):
    tiny_dinov2().save_pretrained(tmp_path / "rad-dino")
    with pytest.raises(WeightsMissing, match="microsoft/rad-dino-maira-2"):
        build_encoder(NAME, weights_dir=tmp_path)


@pytest.mark.parametrize("name", [NAME, "rad-dino"])
def test_a_registers_or_other_patch_folder_is_refused(name, tmp_path):
    tiny_dinov2_reg().save_pretrained(tmp_path / name)
    with pytest.raises(ConfigMismatch, match="'dinov2_with_registers' model, not 'dinov2'"):
        build_encoder(name, weights_dir=tmp_path)
    tiny_dinov2(patch_size=16).save_pretrained(tmp_path / name)
    with pytest.raises(ConfigMismatch, match="patch_size=16"):
        build_encoder(name, weights_dir=tmp_path)
