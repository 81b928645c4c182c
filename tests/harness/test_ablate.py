"""harness.ablate: variants from axes, validation before training, end-to-end runs on tiny models, reruns that skip
finished variants, resuming after an interruption, the SLURM plan (dry run) and a real SLURM run where one answers."""
from __future__ import annotations

import json
import os

import polars as pl
import pytest
import yaml
from PIL import Image

from harness.ablate import main, subset_sources
from harness.figures.ablation import figure
from tests.conftest import slurm_unreachable
from trainer.checkpoint import list_checkpoints
from tests.trainer.tiny_run import TINY as TINY_RUN

WHY_NOT = slurm_unreachable()

TINY = [*TINY_RUN, "run.device=cpu"]
# One protocol keeps the evaluation short; 24 patients give every label of the phantom some test patients.
TASK = "demo:n_patients=24,size=64:linear"


# In-process training on one thread (the `one_thread` fixture of conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def argv(images, out, *axes: str, steps: int = 2) -> list[str]:
    return ["--config", "smoke", "--data", str(images), "--output", str(out), "--steps", str(steps),
            "--eval-task", TASK, "--bootstrap", "50", "--eval-device", "cpu", "--min-positive-patients", "1",
            *[f"--override={o}" for o in TINY], "--axes", *axes]


def checkpoint_times(run) -> dict[str, int]:
    return {str(p): p.joinpath("model.safetensors").stat().st_mtime_ns
            for p in [*list_checkpoints(run), *list_checkpoints(run / "init")]}


def ibot_terms(run) -> list[float]:
    return [json.loads(line)["ibot"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "ibot" in json.loads(line)]


@pytest.mark.slow
def test_two_variants_train_evaluate_and_write_table_section_and_figure_then_a_rerun_skips_them(
        blob_images, tmp_path, capsys):
    out = tmp_path / "abl"
    assert main(argv(blob_images, out, "mim=on,off")) == 0, capsys.readouterr().err
    base, off = out / "variants" / "base", out / "variants" / "mim-off"
    # The axis reached the trainer: no masks and no iBOT term without MIM, a real one with it.
    assert yaml.safe_load((off / "config.yaml").read_text())["loss"]["mask_sample_probability"] == 0
    assert ibot_terms(off) == [0.0, 0.0] and all(v > 0 for v in ibot_terms(base))

    table = pl.read_parquet(out / "ablation.parquet")
    assert table.equals(pl.read_csv(out / "ablation.csv", schema=table.schema))
    assert sorted(set(table["variant"])) == ["base", "init", "mim-off"]
    assert set(table["metric"]) == {"linear/auroc", "linear/auprc"}
    for r in table.iter_rows(named=True):
        assert r["lo"] <= r["hi"] and 0 <= r["point"] <= 1, r
        # Deltas are paired with the base (the reference), read from the harness's results JSON.
        assert (r["delta"] is None) == (r["variant"] == "base"), r
        if r["variant"] != "base":
            stem = {"mim-off": "variants_mim-off", "init": "variants_base_init"}[r["variant"]]
            result = json.loads(next((out / "eval" / "results").glob(f"*/ckpt_*{stem}.json")).read_text())
            paired = result["protocols"]["linear"]["paired_to_reference"][r["metric"].split("/")[1]]
            assert r["delta"] == pytest.approx(paired["delta"]) and r["p_holm"] == pytest.approx(paired["p_holm"])
    assert table.filter(pl.col("variant") == "mim-off")["axis"].to_list() == ["mim", "mim"]
    section = (out / "ablation.md").read_text()
    assert "## Ablation" in section and "mim-off (mim=off)" in section and "init (base, step 0)" in section

    png = out / "ablation.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.format == "PNG" and min(im.size) > 100
    # The figure's points are the table's: one errorbar per variant and metric, labelled with the variant.
    fig = figure(table.to_dicts(), {"mim": "on"})
    for ax in fig.axes:
        metric = ax.get_title().split(": ", 1)[1]
        plotted = {c.get_label(): c.lines[0].get_ydata()[0] for c in ax.containers}
        expected = dict(table.filter(pl.col("metric") == metric).select("variant", "point").iter_rows())
        assert plotted == pytest.approx(expected)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["on", "off", "step 0"]

    before = {**checkpoint_times(base), **checkpoint_times(off)}
    capsys.readouterr()
    assert main(argv(blob_images, out, "mim=on,off")) == 0
    printed = capsys.readouterr().out
    assert "variant base: finished, skipped" in printed and "variant mim-off: finished, skipped" in printed
    assert {**checkpoint_times(base), **checkpoint_times(off)} == before, "a finished variant was retrained"
    # Other settings in the same folder would mix two ablations: refused before anything trains.
    assert main(argv(blob_images, out, "mim=on,off", steps=3)) == 2
    assert "was trained with other settings (optim.total_iters: 2 -> 3" in capsys.readouterr().err
    assert {**checkpoint_times(base), **checkpoint_times(off)} == before


@pytest.mark.slow
def test_an_ablation_interrupted_after_its_first_variant_resumes_there(blob_images, tmp_path, monkeypatch, capsys):
    import trainer.train

    out = tmp_path / "abl"
    real_train, started = trainer.train.train, []

    def killed_at_second_variant(cfg, output, resume=None):
        started.append(output)
        if len(started) == 2:
            raise KeyboardInterrupt  # as a Ctrl-C (or a kill) between the two variants
        return real_train(cfg, output, resume)

    monkeypatch.setattr(trainer.train, "train", killed_at_second_variant)
    assert main(argv(blob_images, out, "loss.koleo_weight=0.1,0")) == 130
    assert capsys.readouterr().err.endswith("interrupted\n")
    base, other = out / "variants" / "base", out / "variants" / "loss.koleo_weight-0"
    assert list_checkpoints(base) and not list_checkpoints(other) and not (out / "ablation.parquet").exists()
    done = checkpoint_times(base)

    monkeypatch.setattr(trainer.train, "train", real_train)
    capsys.readouterr()
    assert main(argv(blob_images, out, "loss.koleo_weight=0.1,0")) == 0
    printed = capsys.readouterr().out
    assert "variant base: finished, skipped" in printed and "variant loss.koleo_weight-0: training" in printed
    assert checkpoint_times(base) == done
    assert yaml.safe_load((other / "config.yaml").read_text())["loss"]["koleo_weight"] == 0
    assert set(pl.read_parquet(out / "ablation.parquet")["variant"]) == {"base", "loss.koleo_weight-0", "init"}


@pytest.mark.parametrize("axis, words", [
    ("mim=on,maybe", ["axis 'mim': value 'maybe' is not accepted; accepted: on, off"]),
    ("resolution=32,36", ["axis 'resolution': value '36' is not accepted; accepted: a multiple of "
                          "model.patch_size=8"]),
    ("data=1.0,1.5", ["axis 'data': value '1.5' is not accepted; accepted: a fraction of the images in (0, 1]"]),
    ("loss.koleo_weight=0.1,lots", ["axis 'loss.koleo_weight': value 'lots' is not accepted (", "expected float",
                                    "accepted: values of type float"]),
    ("loss.centering=centering,kmeans", ["axis 'loss.centering': value 'kmeans' is not accepted (",
                                         "'centering' or 'sinkhorn_knopp'"]),
    ("sources=mine", ["axis 'sources': value 'mine' is not accepted; accepted: none: define mixes"]),
    ("optim.lr=1,2", ["axis 'optim.lr': value '1' is not accepted (", "unknown key 'optim.lr'"]),
    ("colour=red", ["axis 'colour': unknown; use mim, resolution, data, sources or a dotted trainer key"]),
])
def test_a_value_the_trainer_rejects_exits_2_before_anything_trains(blob_images, tmp_path, capsys, axis, words):
    out = tmp_path / "abl"
    axes = [axis] if axis.startswith("mim") else ["mim=on,off", axis]
    assert main(argv(blob_images, out, *axes)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and all(w in err for w in words), err
    assert not out.exists(), "nothing may be written before every variant is valid"


def test_data_fractions_are_seeded_nested_subsets_that_keep_weights(blob_images, tmp_path):
    quarter, files_q = subset_sources([f"{blob_images}@0.7"], 0.25, 0, tmp_path)
    half, files_h = subset_sources([f"{blob_images}@0.7"], 0.5, 0, tmp_path)
    assert quarter[0].endswith("@0.7") and half[0].endswith("@0.7")
    q, h = next(iter(files_q.values())), next(iter(files_h.values()))
    assert (len(q), len(h)) == (4, 8) and set(q) < set(h)
    assert subset_sources([str(blob_images)], 0.25, 0, tmp_path)[1] == files_q  # seeded: the same again
    assert next(iter(subset_sources([str(blob_images)], 0.25, 1, tmp_path)[1].values())) != q
    assert subset_sources([str(blob_images)], 1.0, 0, tmp_path) == ([str(blob_images)], {})


@pytest.mark.slow
def test_dry_run_prints_the_plan_and_the_slurm_scripts_and_writes_nothing(blob_images, tmp_path, capsys):
    out = tmp_path / "abl"
    base = argv(blob_images, out, "mim=on,off", "resolution=32,64", "data=1.0,0.5")
    assert main([*base, "--dry-run"]) == 0
    printed = capsys.readouterr().out
    for line in ["ablation", "base", "mim-off", "resolution-64", "data-0.5"]:
        assert line in printed
    assert "4 variants" in printed and "#SBATCH" not in printed
    assert main([*base, "--grid", "--dry-run"]) == 0
    assert "8 variants" in capsys.readouterr().out

    assert main([*base, "--slurm", "--dry-run", "--time", "30", "--cpus-per-task", "2"]) == 0
    printed = capsys.readouterr().out
    assert "# training array (4 variants: base, mim-off, resolution-64, data-0.5)" in printed
    assert "#SBATCH --array=0-3%4" in printed and "#SBATCH --time=30" in printed
    assert "#SBATCH --dependency='afterok:<array job id>'" in printed
    assert "#SBATCH --kill-on-invalid-dep=yes" in printed
    assert not out.exists(), "a dry run writes nothing"


def test_resolution_axis_scales_the_local_crops_on_the_patch_grid(blob_images, tmp_path):
    from harness.ablate import build_parser, build_plan

    args = build_parser().parse_args(argv(blob_images, tmp_path / "abl", "resolution=32,64"))
    variants, cfgs = build_plan(args)
    big = cfgs[[v.name for v in variants].index("resolution-64")]
    assert (big.crops.global_size, big.model.img_size, big.crops.local_size) == (64, 64, 32)


@pytest.mark.slow
@pytest.mark.slurm
@pytest.mark.skipif(WHY_NOT is not None, reason=f"no SLURM: {WHY_NOT}")
def test_slurm_trains_an_array_then_evaluates_in_a_dependent_job(blob_images, tmp_path, capsys):
    out = tmp_path / "abl"
    code = main([*argv(blob_images, out, "mim=on,off"), "--slurm", "--wait", "--time", "10", "--cpus-per-task", "1",
                 "--mem", "2G", "--folder", str(tmp_path / "slurm")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert "submitted training of base" in printed.out and "submitted training of mim-off" in printed.out
    assert set(pl.read_parquet(out / "ablation.parquet")["variant"]) == {"base", "mim-off", "init"}
    os.utime(out / "ablation.parquet", ns=(0, 0))
    # Everything is trained now: a rerun submits the evaluation only.
    assert main([*argv(blob_images, out, "mim=on,off"), "--slurm", "--wait", "--time", "10", "--cpus-per-task",
                 "1", "--mem", "2G", "--folder", str(tmp_path / "slurm")]) == 0
    printed = capsys.readouterr().out
    assert "submitted training" not in printed and (out / "ablation.parquet").stat().st_mtime_ns > 0


def test_a_sources_axis_trains_each_named_mix_and_data_fractions_subset_it(blob_images, tmp_path):
    from harness.ablate import build_parser, build_plan

    half = tmp_path / "half.txt"
    half.write_text("".join(f"{p}\n" for p in sorted(blob_images.glob("*.png"))[:8]))
    base = [a for a in argv(blob_images, tmp_path / "abl", "sources=all,mixed", "data=1.0,0.5") if a != "--data"
            and a != str(blob_images)]
    args = build_parser().parse_args([*base, "--mix", f"all={blob_images}",
                                      "--mix", f"mixed={blob_images}@0.3,{half}@0.7", "--grid"])
    variants, cfgs = build_plan(args)
    by_name = {v.name: (v, c) for v, c in zip(variants, cfgs)}
    assert sorted(by_name) == ["base", "data-0.5", "sources-mixed", "sources-mixed_data-0.5"]
    assert by_name["sources-mixed"][1].data.sources == [f"{blob_images}@0.3", f"{half}@0.7"]
    v, cfg = by_name["sources-mixed_data-0.5"]
    assert [s.rpartition("@")[2] for s in cfg.data.sources] == ["0.3", "0.7"]
    assert [len(lines) for lines in v.subsets.values()] == [8, 4]
    assert all("/data/mixed/data-0.5/" in p for p in v.subsets)
    with pytest.raises(ValueError, match="--data and a sources axis"):
        build_plan(build_parser().parse_args([*base, "--data", str(blob_images), "--mix", f"all={blob_images}",
                                              "--mix", f"mixed={half}"]))


@pytest.mark.slow
def test_slurm_training_jobs_get_the_trainer_arguments_of_the_validated_plan(blob_images, tmp_path):
    """What an array task runs (trainer.train's command line) resolves to exactly the config validated here."""
    import pickle

    from harness.ablate import build_parser, build_plan, variant_dir
    from slurm.pretrain import PretrainJob
    from trainer.config import load_config
    from trainer.train import parse_args

    args = build_parser().parse_args(argv(blob_images, tmp_path / "abl", "mim=on,off", "resolution=32,64",
                                          "data=1.0,0.5"))
    variants, cfgs = build_plan(args)
    for v, cfg in zip(variants, cfgs):
        # As submit_slurm makes it; pickled, as submitit sends it to the array task.
        job = pickle.loads(pickle.dumps(PretrainJob(args.config, variant_dir(tmp_path / "abl", v), v.sources,
                                                    args.steps, v.overrides)))
        targs = parse_args(job.argv())
        job_cfg = load_config(targs.config, targs.overrides, steps=targs.steps)
        job_cfg.data.sources = targs.data
        assert job_cfg.to_dict() == cfg.to_dict(), v.name
        assert targs.output == str(variant_dir(tmp_path / "abl", v)) and targs.resume == "auto"


def test_replot_redraws_only_the_chosen_metrics_from_the_saved_table_and_rejects_a_pattern_matching_none(
        tmp_path, capsys):
    # A saved ablation (plan.json + ablation.parquet) with three metrics; nothing is trained or evaluated.
    plan = {"config": "smoke", "steps": 2, "eval_tasks": ["demo"], "figure_metrics": [], "variants": [
        {"name": "base", "axis": "base", "value": "", "settings": {"mim": "on"}, "overrides": [], "sources": []},
        {"name": "mim-off", "axis": "mim", "value": "off", "settings": {"mim": "off"}, "overrides": [],
         "sources": []}]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    rows = [{"task": "demo", "axis": axis, "value": value, "variant": variant, "metric": metric, "point": point,
             "lo": point - 0.1, "hi": point + 0.1, "delta": delta, "delta_lo": None, "delta_hi": None,
             "p_holm": None if delta is None else 0.5, "significant": False}
            for metric, point in (("linear/auroc", 0.7), ("knn/auroc", 0.6), ("seg/dice", 0.8))
            for axis, value, variant, delta in (("base", "", "base", None), ("mim", "off", "mim-off", -0.05))]
    pl.DataFrame(rows).write_parquet(tmp_path / "ablation.parquet")

    assert main(["--output", str(tmp_path), "--replot", "--figure-metrics", "auroc"]) == 0
    png = tmp_path / "ablation.png"
    with Image.open(png) as im:
        assert im.format == "PNG"
    before = png.read_bytes()

    assert main(["--output", str(tmp_path), "--replot", "--figure-metrics", "iou"]) == 2
    assert "matches no metric" in capsys.readouterr().err
    assert png.read_bytes() == before  # a refused redraw leaves the figure as it was

    # What the figure draws: one visible panel per chosen metric.
    from harness.ablate import select_metrics

    fig = figure(select_metrics(rows, ["auroc"]), {"mim": "on"})
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["demo: linear/auroc", "demo: knn/auroc"]


def test_without_replot_the_training_flags_are_required_and_exit_2(tmp_path, capsys):
    assert main(["--output", str(tmp_path)]) == 2
    assert "--config, --axes, --eval-task required" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # over 2 s alone on a quiet 2-core machine (measured 2026-12-07: 2.1-4.0 s)
def test_the_plan_warns_when_the_pretraining_images_include_the_eval_tasks_test_images(tmp_path, capsys):
    """Copies of test-split images in --data are counted by content before anything trains; a manifest of the
    training patients' images gets no warning."""
    from harness.splits import make_split
    from harness.tasks.base import TaskContext, build_task

    from tests.harness.small_tasks import csv_set

    labels = csv_set(tmp_path / "task", n_patients=20)
    task = build_task("csv", str(labels), TaskContext(seed=0))
    split = make_split(task.table.patient_ids, 0, 0.3, task.table.split)
    files = {s: [labels.parent / i for i, t in zip(task.table.image_ids, split) if t == s] for s in ("train", "test")}
    copies = tmp_path / "copies"
    copies.mkdir()
    for f in files["test"][:3]:  # another folder, other names: only the bytes are the same
        (copies / f"copy-{f.name}").write_bytes(f.read_bytes())
    leaky, clean = tmp_path / "leaky.txt", tmp_path / "clean.txt"
    leaky.write_text("\n".join(map(str, [*files["train"], *copies.iterdir()])) + "\n")
    clean.write_text("\n".join(map(str, files["train"])) + "\n")

    def plan(manifest):
        args = argv(manifest, tmp_path / "abl", "mim=on,off")
        args[args.index("--eval-task") + 1] = f"csv:{labels}"
        assert main([*args, "--dry-run"]) == 0
        return capsys.readouterr().err

    assert f"warning: 3 of the {len(files['train']) + 3} pretraining image(s) in --data are byte-identical to " \
           "test-split images of csv-" in plan(leaky)
    assert "byte-identical" not in plan(clean)
