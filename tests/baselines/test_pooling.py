"""--global-pool (issue 19 item 1): each pooling is what its name says on a real ViT, it is part of the features'
identity (so a cached run never serves another pooling's numbers), and a wrong value is a usage error."""
import polars as pl
import pytest
import torch

from baselines.floors import PIXELS_PREPROCESS, PixelsEncoder, ViTEncoder
from baselines.preprocess import Preprocess
from baselines.registry import DEFAULT_GLOBAL_POOL, GLOBAL_POOLS, build_encoder, pool_global
from harness.features import cache_key, encode_batch
from harness.run import main
from trainer.vit import vit_tiny

TASK = "demo:n_patients=24,size=64,p_effusion=0.4,p_nodule=0.4"
STEM = "demo-n_patients_24-p_effusion_0.4-p_nodule_0.4-size_64"


def tiny_vit_encoder(pool: str) -> ViTEncoder:
    torch.manual_seed(0)
    model = vit_tiny(patch_size=14, img_size=28, depth=2, layerscale_init=1.0)
    enc = ViTEncoder("tiny", model, Preprocess(size=28, policy="resize_stretch", mean=(0.5,), std=(0.25,),
                                               channels=3), "digest")
    enc.global_pool = pool
    return enc


@pytest.mark.parametrize("pool", GLOBAL_POOLS)
def test_each_pooling_equals_a_hand_computation_on_a_tiny_vit(pool):
    enc = tiny_vit_encoder(pool)
    x = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    got = encode_batch(enc, x, torch.device("cpu")).global_
    with torch.inference_mode():
        out = enc.model.forward_features(x)
    cls, patches = out["x_norm_clstoken"], out["x_norm_patchtokens"]  # [3, 192], [3, 4, 192]
    # by hand: the mean over the 2x2 patch tokens, token by token
    avg = (patches[:, 0] + patches[:, 1] + patches[:, 2] + patches[:, 3]) / 4
    want = {"cls": cls, "avg": avg, "cls+avg": torch.cat([cls, avg], dim=1)}[pool]
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_pixels_reads_its_thumbnail_under_every_pooling_and_says_so():
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    x = torch.rand(2, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    thumbs = []
    for pool in GLOBAL_POOLS:
        enc.global_pool = pool
        thumbs.append(encode_batch(enc, x, torch.device("cpu")).global_)
    assert all(torch.equal(t, thumbs[0]) for t in thumbs) and thumbs[0].shape == (2, 256)
    assert "thumbnail under every pooling" in enc.pooling_note


def test_the_feature_cache_key_differs_per_pooling():
    keys = {cache_key(tiny_vit_encoder(pool), "task-digest", "cpu") for pool in GLOBAL_POOLS}
    assert len(keys) == len(GLOBAL_POOLS)


def test_pool_global_rejects_an_unknown_pooling():
    enc = tiny_vit_encoder("cls")
    f = enc.encode(torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="choose one of cls, avg, cls\\+avg"):
        pool_global(f, "max")
    with pytest.raises(ValueError, match="unknown global pooling 'max'"):
        build_encoder("random-vit", global_pool="max")


def test_an_unknown_pooling_exits_2_with_the_choices_before_any_model_is_built(monkeypatch, capsys, tmp_path):
    import harness.evaluate

    monkeypatch.setattr(harness.evaluate, "build_encoder", lambda *a, **k: pytest.fail("a model was built"))
    with pytest.raises(SystemExit) as e:
        main(["--models", "random-vit", "--tasks", "demo", "--global-pool", "max", "--out", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--global-pool" in err and "'cls', 'avg', 'cls+avg'" in err


def _run(tmp_path, out, pool):
    return main(["--models", "random-vit", "--tasks", TASK, "--protocols", "linear", "--out", str(tmp_path / out),
                 "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "50", "--workers", "0",
                 "--min-positive-patients", "2", "--probe-jobs", "1", "--global-pool", pool])


@pytest.mark.slow
def test_another_pooling_on_a_cached_run_recomputes_and_is_written_down(tmp_path):
    """A run with avg pooling after a cls run (same cache) gets its own features, its own numbers, its own output
    name, and says which pooling it used in the header and the tidy table."""
    assert _run(tmp_path, "out", "cls") == 0
    assert _run(tmp_path, "out", "avg") == 0
    def stem(pool: str) -> str:  # the default pooling's outputs carry no suffix
        return STEM if pool == DEFAULT_GLOBAL_POOL else f"{STEM}-pool_{pool}"

    cls = pl.read_csv(tmp_path / "out" / "results" / f"{stem('cls')}.csv")
    avg = pl.read_csv(tmp_path / "out" / "results" / f"{stem('avg')}.csv")
    assert set(cls["global_pool"]) == {"cls"} and set(avg["global_pool"]) == {"avg"}
    joined = cls.join(avg, on=["model", "protocol", "metric", "label"], suffix="_avg")
    assert len(joined) == len(cls) and (joined["point"] != joined["point_avg"]).any()
    assert "- **Global pooling**: `avg`: the mean of each model's last-layer patch tokens" in (
        tmp_path / "out" / f"{stem('avg')}.md").read_text()
    # two feature entries in the one cache: the avg run did not read the cls features
    assert len([p for p in (tmp_path / "cache" / "features").rglob("manifest.json")]) == 2
