"""What each model costs (issue 22 item 4): the counts against independent ones on small random models of every
family, the extraction rate as measured and as the feature cache serves it again, the section, and the check that
compares the counts exactly and never the rate."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from baselines.biovil_t import UNUSED
from baselines.floors import PIXELS_PREPROCESS, PixelsEncoder
from baselines.registry import ENCODERS, build_encoder
from harness import cost, tidy
from harness.features import TIMED, FeatureCache, FeatureSet, extract
from harness.leaderboard import check_dirs, render
from harness.tidy import TidyRow
from tests.baselines.tiny_weights import WRITERS
from tests.harness.small_tasks import TinyTask

#: Families whose published weight file holds exactly the encoder's parameters: the file's own count is the truth.
WHOLE_FILE = ("rad-dino", "rad-dino-maira-2", "cxformer-base", "cxformer-small", "dinov2-base-reg4", "dinov3-vitb16",
              "dinov2-base")
#: Families shipped as an image-text model: only the vision tower's tensors are the encoder's.
VISION_TOWER = {"clip": ("vision_model.", "visual_projection."), "medsiglip-448": ("vision_model.",)}


def _file_tensors(path):
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state.get("model", state)


def _sequence_length(model, x):
    """How many tokens the model itself runs its blocks on for input `x`, from its own embedding or outputs."""
    vit = getattr(model, "vit", model)
    if hasattr(vit, "prepare_tokens_with_masks"):  # trainer.vit: CLS, registers, patches
        return vit.prepare_tokens_with_masks(x).shape[1]
    with torch.inference_mode():
        return model(pixel_values=x).last_hidden_state.shape[1]


@pytest.fixture(scope="module")
def tiny_encoders(tmp_path_factory):
    """Every family `tests.baselines.tiny_weights` can fake, built from its small random weights: name -> (encoder,
    weight files)."""
    root = tmp_path_factory.mktemp("weights")
    out = {}
    for name, write in WRITERS.items():
        files = write(root / (ENCODERS.get(name).folder or name))
        out[name] = (build_encoder(name, root), files)
    return out


@pytest.mark.slow  # builds and runs a small model of every family (BioViL-T's is a whole ResNet-50 at 448 px)
@pytest.mark.parametrize("name", sorted(WRITERS))
def test_counts_equal_independent_counts(tiny_encoders, name):
    enc, files = tiny_encoders[name]
    c = cost.static_cost(enc)
    model = enc.model
    buffers = {k for k, _ in model.named_buffers()}
    # The state dict's tensors less its buffers (BatchNorm statistics, position ids), counted one by one.
    assert c["parameters"] == sum(v.numel() for k, v in model.state_dict().items() if k not in buffers) > 0
    weights = _file_tensors(files[-1])
    if name in WHOLE_FILE:
        assert c["parameters"] == sum(v.numel() for v in weights.values())
    elif name in VISION_TOWER:
        assert c["parameters"] == sum(v.numel() for k, v in weights.items() if k.startswith(VISION_TOWER[name]))
    elif name == "biovil-t":  # the file less the parts a single image never runs, and less the BatchNorm statistics
        assert c["parameters"] == sum(v.numel() for k, v in weights.items() if not k.startswith(UNUSED)
                                      and not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    pre = enc.preprocess
    assert c["input_size"] == pre.size
    x = torch.rand(1, pre.channels, pre.size, pre.size)
    f = enc.pooled(enc.encode(x))
    assert c["feature_dim"] == f.global_.shape[1] and c["patch_grid"] == list(f.patch.shape[-2:])
    if name == "biovil-t":
        assert c["tokens"] is None and c["prefix_tokens"] is None  # a CNN: no tokens
    else:
        assert c["tokens"] == _sequence_length(model, x)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "num_register_tokens"):
        h, w = c["patch_grid"]
        assert c["tokens"] == h * w + 1 + config.num_register_tokens  # the grid, the CLS and the registers


def test_pixels_costs_nothing_and_says_its_real_input():
    c = cost.static_cost(build_encoder("pixels"))
    assert (c["parameters"], c["input_size"], c["input_channels"], c["feature_dim"], c["tokens"]) == (
        0, 224, 1, 256, None)


def test_the_rate_is_measured_stored_and_served_again_from_the_cache(tmp_path):
    enc = PixelsEncoder(PIXELS_PREPROCESS)
    cache = FeatureCache(tmp_path)
    first = extract(TinyTask(), [enc], cache, batch_size=4, workers=0)["pixels"]
    rate = first.throughput
    assert not first.from_cache and rate["timed"] == TIMED and rate["images"] == len(TinyTask())
    assert rate["seconds"] > 0 and rate["images_per_s"] == rate["images"] / rate["seconds"]
    assert rate["device"] == "cpu" and rate["threads"] == torch.get_num_threads() and rate["processor"]
    manifest = json.loads((cache.entry(first.key) / "manifest.json").read_text())
    assert manifest["throughput"] == rate
    again = extract(TinyTask(), [enc], cache, batch_size=4, workers=0)["pixels"]
    assert again.from_cache and again.throughput == rate
    served = cost.model_cost(enc, [again])["throughput"]
    assert served["source"] == "feature cache" and served["images_per_s"] == rate["images_per_s"] > 0
    assert served["measured"] == rate["measured"] and served["processor"] == rate["processor"]
    assert cost.model_cost(enc, [first])["throughput"]["source"] == "this run"
    # An entry cached before rates were stored has none: null and said so, never a zero.
    del manifest["throughput"]
    (cache.entry(first.key) / "manifest.json").write_text(json.dumps(manifest))
    old = extract(TinyTask(), [enc], cache, batch_size=4, workers=0)["pixels"]
    c = cost.model_cost(enc, [old])
    assert old.from_cache and c["throughput"] is None
    assert [r.metric for r in cost.cost_rows("t", {"pixels": c})] == ["parameters", "input_size", "feature_dim"]
    assert "not recorded" in render("t", [], [cost.cost_section({"pixels": c})])


def _set(images, seconds, cached, name="AMD EPYC", measured="2026-12-01T10:00:00+0000"):
    record = {"timed": TIMED, "images": images, "seconds": seconds, "images_per_s": images / seconds,
              "device": "cpu", "processor": name, "threads": 2, "measured": measured}
    return FeatureSet(np.zeros((images, 2), np.float32), key=f"{images}-{cached}-{name}", from_cache=cached,
                      throughput=record)


def test_the_rate_is_the_largest_pass_of_this_run_else_of_the_cache():
    fresh = cost.throughput([_set(10, 2.0, False), _set(30, 4.0, False), _set(100, 1.0, True)])
    assert (fresh["images"], fresh["seconds"], fresh["images_per_s"], fresh["source"]) == (30, 4.0, 7.5, "this run")
    cached = cost.throughput([_set(20, 1.0, True, name="other CPU"), _set(100, 5.0, True),
                              _set(100, 9.0, True, measured="2026-12-02T09:00:00+0000")])
    assert (cached["images"], cached["images_per_s"], cached["source"]) == (100, 20.0, "feature cache")
    assert cached["processor"] == "AMD EPYC" and cached["measured"] == "2026-12-01T10:00:00+0000"
    assert cost.throughput([FeatureSet(np.zeros((3, 2), np.float32))]) is None


def _costs(parameters=1234567, rate=(50.0, "this run")):
    return {"m": {"parameters": parameters, "input_size": 518, "input_channels": 3, "patch_grid": [37, 37],
                  "prefix_tokens": 5, "tokens": 1374, "feature_dim": 768,
                  "throughput": {"images_per_s": rate[0], "images": 100, "seconds": 100 / rate[0], "timed": TIMED,
                                 "device": "cpu", "processor": "AMD EPYC", "threads": 2,
                                 "measured": "2026-12-01T10:00:00+0000", "source": rate[1]}}}


def test_the_section_renders_every_number_as_text():
    md = render("t", [], [cost.cost_section(_costs(rate=(3.14159, "feature cache")))])
    row = next(line for line in md.splitlines() if line.startswith("| m "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == ["m", "3.14", "cpu, AMD EPYC, 2 threads; feature cache, 2026-12-01", "1.2 M", "518×518",
                     "1,374 = 37×37 + 5", "768"]
    assert "**" not in row  # a cost is not a score: nothing is bold


def _board(folder, rows):
    (folder / "results").mkdir(parents=True)
    (folder / "t.md").write_text("# t\n")
    (folder / "results" / "t.csv").write_text(tidy.csv_text(rows))
    return folder


def test_the_check_compares_the_counts_exactly_and_never_the_rate(tmp_path):
    committed = _board(tmp_path / "a", cost.cost_rows("t", _costs()))
    other_machine = cost.cost_rows("t", _costs(rate=(7.5, "this run")))
    other_machine = [r._replace(label="cuda: NVIDIA A100, 8 threads") if r.metric == tidy.RATE_METRIC else r
                     for r in other_machine]
    assert check_dirs(committed, _board(tmp_path / "b", other_machine)) == []
    not_recorded = [r for r in cost.cost_rows("t", _costs()) if r.metric != tidy.RATE_METRIC]
    assert check_dirs(committed, _board(tmp_path / "c", not_recorded)) == []
    # One parameter more is stale, though it is far within the tolerance of the scores.
    bad = check_dirs(committed, _board(tmp_path / "d", cost.cost_rows("t", _costs(parameters=1234568))))
    assert [(m.where, m.committed, m.fresh) for m in bad] == [
        ("task='t' model='m' protocol='cost' metric='parameters' label='', point", "1234567.0", "1234568.0")]
    # The tolerance still applies to the scores.
    score = TidyRow("t", "m", "linear", "auroc", "macro", 0.8, 0.7, 0.9, None, None, 100)
    assert check_dirs(_board(tmp_path / "e", [score]), _board(tmp_path / "f", [score._replace(point=0.801)])) == []


@pytest.mark.slow  # two runs of the command
def test_a_one_protocol_run_writes_its_own_cost_never_the_earlier_one(tmp_path, monkeypatch):
    """The cost section is computed by every run for the models that ran: a merge keeps earlier sections, never an
    earlier cost (here the parameter count changes under the same features, as an edit to the counting would)."""
    from harness.run import main

    def run(task):
        return main(["--models", "pixels", "--tasks", task, "--out", str(tmp_path / "lb"), "--cache-dir",
                     str(tmp_path / "cache"), "--bootstrap", "20", "--workers", "0", "--min-positive-patients", "2",
                     "--probe-jobs", "1"])

    stem = "demo-n_patients_16-size_64"
    assert run("demo:n_patients=16,size=64:linear") == 0
    monkeypatch.setattr(PixelsEncoder, "parameter_count", lambda self: 7)
    assert run("demo:n_patients=16,size=64:knn") == 0
    md = (tmp_path / "lb" / f"{stem}.md").read_text()
    assert "kept from an earlier run" in md and md.count("## Cost") == 1
    cost_row = next(line for line in md.split("## Cost")[1].splitlines() if line.startswith("| pixels"))
    assert [c.strip() for c in cost_row.strip("|").split("|")][3] == "7"
    rows = tidy.read(tmp_path / "lb" / "results" / f"{stem}.csv")
    assert [r.point for r in rows if r.protocol == "cost" and r.metric == "parameters"] == [7.0]
    record = json.loads((tmp_path / "lb" / "results" / stem / "pixels.json").read_text())
    assert record["cost"]["parameters"] == 7 and record["cost"]["throughput"]["source"] == "feature cache"
