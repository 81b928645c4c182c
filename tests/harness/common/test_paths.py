"""harness.common.paths: the one cache default, read when asked, and file-name-safe names."""
from pathlib import Path

from harness.common.paths import DEFAULT_CACHE, cache_dir, safe_name
from harness.flags import build_parser
from harness.tasks.dicom_meta import digest_cache_file


def test_cache_dir_follows_the_environment_at_each_call(monkeypatch, tmp_path):
    monkeypatch.delenv("RADDINO_BENCH_CACHE", raising=False)
    assert cache_dir() == DEFAULT_CACHE == Path(".cache/raddino-bench")
    monkeypatch.setenv("RADDINO_BENCH_CACHE", "")  # set but empty: as if unset, not the working directory
    assert cache_dir() == DEFAULT_CACHE
    monkeypatch.setenv("RADDINO_BENCH_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path


def test_feature_cache_and_digest_memo_share_the_default(monkeypatch, tmp_path):
    for value in (None, str(tmp_path / "c")):
        if value is None:
            monkeypatch.delenv("RADDINO_BENCH_CACHE", raising=False)
        else:
            monkeypatch.setenv("RADDINO_BENCH_CACHE", value)
        assert build_parser().parse_args([]).cache_dir == cache_dir()
        assert digest_cache_file() == cache_dir() / "file-digests.json"


def test_safe_name():
    assert safe_name("ckpt:/runs/a") == "ckpt_runs_a"
    assert safe_name("csv:/data/x y/labels.csv") == "csv_data_x_y_labels.csv"
    assert safe_name("demo-n_patients_20") == "demo-n_patients_20"
