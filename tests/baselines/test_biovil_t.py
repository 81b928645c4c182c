"""biovil-t: hi-ml-multimodal's own BioViL-T ImageModel with random weights and randomised BatchNorm statistics,
saved as biovil_t_image_model_proj_size_128.pt, loaded through our re-implementation and checked against the
library's forward in eval mode; the training-mode trap and the constant half of the library's embedding."""
from __future__ import annotations

import copy

import pytest
import torch

import baselines.biovil_t as biovil_t
from baselines.registry import build_encoder
from tests.baselines.refs import assert_close, pixels, randomise_, reference


def _reference_model():
    reference("health_multimodal.image")
    from health_multimodal.image.model.model import ImageModel
    from health_multimodal.image.model.types import ImageEncoderType

    # What get_biovil_t_image_encoder() builds, minus the download.
    return ImageModel(img_encoder_type=ImageEncoderType.RESNET50_MULTI_IMAGE, joint_feature_size=128)


@pytest.mark.slow
def test_matches_hi_ml_multimodal(tmp_path):
    ref = _reference_model()
    assert ref.training, "hi-ml-multimodal's constructor leaves the model in training mode (the trap we avoid)"
    randomise_(ref)
    (tmp_path / "biovil-t").mkdir()
    torch.save(ref.state_dict(), tmp_path / "biovil-t" / "biovil_t_image_model_proj_size_128.pt")
    enc = build_encoder("biovil-t", weights_dir=tmp_path)
    x = pixels(2, 64) * 0.2 + 0.5  # BioViL-T sees [0, 1] pixels, no mean/std
    f = enc.encode(x)
    with torch.no_grad():
        # On a copy: a training-mode forward also overwrites the BatchNorm running statistics.
        train_mode = copy.deepcopy(ref)(x)
        ref.eval()
        out = ref(x)
        stages = ref.encoder.encoder(x, return_intermediate_layers=True)[1:]
    assert_close(f.global_, out.img_embedding[:, :256], "img_embedding[:, :256]")
    assert_close(f.patch, out.patch_embeddings[:, :256], "patch_embeddings[:, :256]")
    for i, (got, want) in enumerate(zip(f.layers, stages, strict=True)):
        assert_close(got, want, f"ResNet stage {i + 1}")
    # The dropped half is the learnt missing-prior embedding: identical for every image and position.
    rest = out.patch_embeddings[:, 256:]
    assert torch.equal(rest, ref.encoder.missing_previous_emb.expand_as(rest))
    # Batch statistics (training mode) give different features: what a caller forgetting .eval() would get.
    assert not torch.allclose(train_mode.img_embedding[:, :256], f.global_, atol=1e-3)
    assert enc.preprocess == biovil_t.NATIVE and enc.preprocess.mean == (0.0,) and enc.preprocess.std == (1.0,)


def test_real_biovil_t_shapes():
    with torch.device("meta"):
        f = biovil_t.biovil_t_features(biovil_t.BioViLTImage(), torch.empty(2, 3, 448, 448))
    assert f.global_.shape == (2, 256) and f.patch.shape == (2, 256, 14, 14)
    assert [tuple(t.shape[1:]) for t in f.layers] == [(256, 112, 112), (512, 56, 56), (1024, 28, 28), (2048, 14, 14)]


def test_rejects_biovil_v1_file(tmp_path):
    (tmp_path / "biovil-t").mkdir()
    torch.save({"encoder.encoder.conv1.weight": torch.zeros(64, 3, 7, 7)},
               tmp_path / "biovil-t" / "biovil_t_image_model_proj_size_128.pt")
    try:
        build_encoder("biovil-t", weights_dir=tmp_path)
    except ValueError as e:
        assert "backbone_to_vit" in str(e)
    else:
        raise AssertionError("a BioViL v1 state dict was accepted as BioViL-T")
