"""The attentive probe: its pool is multi-head attention with one learned query, it finds a finding that lives in one
token where a mean pool sees nothing, it is deterministic under the seed, it skips an encoder without tokens, it
goes through the results cache, it reads the tokens a batch at a time, and it is scored like the linear probe."""
import io
import logging

import numpy as np
import polars as pl
import pytest
import torch

from harness import stats
from harness.features import FeatureSet, FeatureStore
from harness.probes import PROTOCOLS, attentive
from harness.probes.attentive import AttentiveBudget, AttentivePool, fit_and_score, n_heads
from harness.probes.linear import classification_ranks, classification_rows, classification_tidy, linear_probe
from harness.protocols import TaskRun
from harness.results_cache import ProtocolCache, ResultsCache, code_digest
from harness.tasks.base import TaskError, TaskTable
from tests.harness.probes.synthetic import TableTask

#: enough steps for the synthetic task (about 80 training images) in well under a second per model
BUDGET = AttentiveBudget(epochs=20, batch_size=16, lr=1e-2, warmup_epochs=1, weight_decay=0.0)
C, H, W = 16, 6, 6


class TokenEncoder:
    """What the protocol reads of an encoder: its name and whether its patch grid holds tokens."""

    def __init__(self, name: str, patch_tokens: bool = True) -> None:
        self.name, self.patch_tokens = name, patch_tokens


def one_token_grids(n: int, label: np.ndarray, rng: np.random.Generator, strength: float = 8.0) -> np.ndarray:
    """[n, C, H, W] noise tokens; in a positive image one token at a random place carries +strength along channel 0
    and another one -strength, so the mean over the tokens is the same as without them: a mean pool sees nothing."""
    grid = rng.normal(size=(n, C, H * W))
    for i in np.flatnonzero(label):
        up, down = rng.choice(H * W, size=2, replace=False)
        grid[i, 0, up] += strength
        grid[i, 0, down] -= strength
    return grid.reshape(n, C, H, W).astype(np.float16)


def _run(grids: dict[str, object], label: np.ndarray, pid: np.ndarray, encoders: list[TokenEncoder] | None = None,
         reference: str | None = None, seed: int = 0, results: ProtocolCache | None = None, n_resamples: int = 200
         ) -> tuple[TaskRun, list[TokenEncoder]]:
    """A TaskRun over given dense grids; patients with pid % 3 == 0 are the test split."""
    n = len(pid)
    table = TaskTable([f"img{i}" for i in range(n)], [f"P{p}" for p in pid], ["finding"], label[:, None],
                      [None] * n, np.full(n, np.nan))
    split = np.where(pid % 3 == 0, "test", "train")
    test = np.flatnonzero(split == "test")
    weights = stats.bootstrap_weights([table.patient_ids[i] for i in test], n_resamples, 0)
    glob = {m: FeatureSet(np.zeros((n, 2), np.float32), key=f"k-{m}") for m in grids}
    dense = {m: FeatureSet(glob[m].global_, patch=g, key=f"k-{m}") for m, g in grids.items()}
    encoders = encoders or [TokenEncoder(m) for m in grids]
    tr = TaskRun(TableTask(table), split, weights, FeatureStore(glob, [(np.arange(n), dense)]), seed=seed,
                 reference=reference or encoders[0].name, min_positive_patients=3,
                 results=results or ProtocolCache())
    return tr, encoders


def _task(n_patients: int = 150, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Two images per patient; model "a" carries the finding in one token, model "b" is noise."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_patients), 2)
    label = (rng.random(len(pid)) < 0.4).astype(np.int8)
    return pid, label, {"a": one_token_grids(len(pid), label, rng), "b": one_token_grids(len(pid), label * 0, rng)}


def test_the_pool_is_torch_multihead_attention_with_one_query():
    torch.manual_seed(0)
    pool = AttentivePool(24, 3, 4).eval()
    tokens = torch.randn(5, 9, 24)
    mha = torch.nn.MultiheadAttention(24, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([pool.q_proj.weight, pool.k_proj.weight, pool.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([pool.q_proj.bias, torch.zeros(24), pool.v_proj.bias]))
        mha.out_proj.weight.copy_(pool.out_proj.weight)
        mha.out_proj.bias.copy_(pool.out_proj.bias)
        x = pool.norm(tokens)
        expected, weights = mha(pool.query.expand(5, 1, 24), x, x, average_attn_weights=False)
        pooled, attn = pool.attend(tokens)
    torch.testing.assert_close(pooled, expected[:, 0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attn, weights[:, :, 0].transpose(1, 2), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pool(tokens), pool.classify(pooled))


@pytest.mark.parametrize("dim,heads", [(384, 8), (96, 8), (768, 8), (100, 5), (7, 7), (3, 3), (1152, 8)])
def test_heads_are_eight_or_the_largest_divisor_below(dim, heads):
    assert n_heads(dim) == heads


@pytest.mark.slow
def test_a_finding_in_one_token_is_found_where_a_mean_pool_sees_nothing():
    pid, label, grids = _task()
    tr, encs = _run(grids, label, pid)
    result = fit_and_score(tr, encs, BUDGET)
    a, b = (result.to_record(m)["metrics"]["auroc"]["macro"]["point"] for m in ("a", "b"))
    assert a > 0.95 and 0.3 < b < 0.7
    # The linear probe on the mean-pooled tokens of the same grids: the two marked tokens cancel in the mean.
    mean = grids["a"].astype(np.float64).mean(axis=(2, 3))
    train, test = tr.split == "train", tr.split == "test"
    probe = linear_probe(mean[train], label[train, None], pid[train], mean[test], label[test, None], ["finding"])
    assert stats.binary_metrics(probe.scores, label[test, None])["auroc"][0, 0] < 0.75


def test_the_same_seed_gives_the_same_numbers_and_another_seed_others():
    pid, label, grids = _task(n_patients=30)
    first = fit_and_score(*_run(grids, label, pid), BUDGET)
    again = fit_and_score(*_run(grids, label, pid), BUDGET)
    other = fit_and_score(*_run(grids, label, pid, seed=1), BUDGET)
    name = "results/synthetic/a.attentive.parquet"
    assert first.files[name] == again.files[name]
    assert first.to_record("a") == again.to_record("a") and first.tidy == again.tidy
    assert first.files[name] != other.files[name]


def test_an_encoder_without_tokens_is_skipped_with_a_note_and_the_others_run(caplog):
    pid, label, grids = _task(n_patients=30)
    encs = [TokenEncoder("pixels", patch_tokens=False), TokenEncoder("a"), TokenEncoder("b")]
    caplog.set_level(logging.INFO, logger="harness")
    result = fit_and_score(*_run({**grids, "pixels": grids["b"]}, label, pid, encs), BUDGET)
    section = result.to_section()
    assert list(section.rows) == ["a", "b"]
    assert any("Does not apply" in n and "`pixels`" in n for n in section.notes)
    assert "pixels: the attentive probe does not apply" in caplog.text
    assert result.to_record("pixels") == {"applies": False, "metrics": None, "paired_to_reference": None}
    # The run's reference does not apply: the first model that does is the section's reference, and it says so.
    assert any("Reference for paired differences: `a` (the run's reference `pixels` does not apply)" in n
               for n in section.notes)
    assert result.to_record("a")["paired_to_reference"] is None and result.to_record("b")["paired_to_reference"]
    assert {r.model for r in result.tidy} == {"a", "b"}
    assert "results/synthetic/pixels.attentive.parquet" not in result.files


def test_a_rerun_trains_nothing_and_a_code_change_retrains(tmp_path, monkeypatch):
    pid, label, grids = _task(n_patients=24)
    cache = ResultsCache(tmp_path / "results")
    keys = ProtocolCache(cache, "data", {"attentive": code_digest("harness.probes.attentive")})
    calls = []
    original = attentive.train_pool
    monkeypatch.setattr(attentive, "train_pool", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = fit_and_score(*_run(grids, label, pid, results=keys), BUDGET)
    assert len(calls) == 2 and (cache.hits, cache.misses) == (0, 2)
    second = fit_and_score(*_run(grids, label, pid, results=keys), BUDGET)
    assert len(calls) == 2 and cache.hits == 2
    assert second.files == first.files and second.tidy == first.tidy
    # Other code (the digest of the module's sources), or another budget: other entries.
    edited = ProtocolCache(cache, "data", {"attentive": "another digest"})
    fit_and_score(*_run(grids, label, pid, results=edited), BUDGET)
    assert len(calls) == 4
    fit_and_score(*_run(grids, label, pid, results=keys), AttentiveBudget(epochs=2, batch_size=16))
    assert len(calls) == 6


def test_scored_exactly_as_the_linear_probe_scores_its_predictions():
    """From the per-image scores the protocol publishes, the linear probe's functions give the section's cells, the
    records' metrics and ranks and the tidy rows."""
    pid, label, grids = _task(n_patients=30)
    tr, encs = _run(grids, label, pid, reference="b")
    result = fit_and_score(tr, encs, BUDGET)
    test = tr.split == "test"
    summaries, resampled = {}, {}
    for m in ("a", "b"):
        df = pl.read_parquet(io.BytesIO(result.files[f"results/synthetic/{m}.attentive.parquet"]))
        assert df["image_id"].to_list() == [f"img{i}" for i in np.flatnonzero(test)]
        assert set(df["patient_key"]) == set(tr.patient_keys(np.flatnonzero(test)))
        summaries[m], resampled[m] = stats.classification_summary(df["score"].to_numpy()[:, None],
                                                                  label[test, None], ["finding"], tr.weights)
        assert result.to_record(m)["metrics"] == summaries[m]
    ranked = classification_ranks(summaries, resampled)
    rows, paired = classification_rows(summaries, resampled, ranked, ["finding"], "b")
    assert result.to_section().rows == rows
    assert result.to_record("a")["paired_to_reference"]["auroc"] == paired["auroc"]["a"]
    assert result.to_record("a")["ranks"]["auroc"]["rank"] == ranked["auroc"][0]["a"]["rank"]
    assert list(result.tidy) == classification_tidy("synthetic", "attentive", summaries, paired, ranked, ["finding"],
                                                    "b")


class BatchOnlyGrid:
    """A [N, C, H, W] grid that serves only reads of at most `limit` rows, records them, and refuses to be read
    whole (``np.asarray``): what a probe holding every token of the task at once would need."""

    def __init__(self, grid: np.ndarray, limit: int) -> None:
        self.grid, self.limit, self.reads = grid, limit, []
        self.shape, self.dtype = grid.shape, grid.dtype

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        assert rows.ndim == 1 and len(rows) <= self.limit, f"a read of {len(rows)} rows"
        self.reads.append(rows)
        return self.grid[rows]

    def __array__(self, *args: object, **kwargs: object) -> np.ndarray:
        raise AssertionError("the whole grid was read at once")


def test_tokens_are_read_a_batch_of_rows_at_a_time():
    pid, label, grids = _task(n_patients=30)
    wrapped = {m: BatchOnlyGrid(g, BUDGET.batch_size) for m, g in grids.items()}
    tr, encs = _run(wrapped, label, pid)
    fit_and_score(tr, encs, BUDGET)
    reads = wrapped["a"].reads
    train, test = np.flatnonzero(tr.split == "train"), np.flatnonzero(tr.split == "test")
    per_epoch, test_batches = (-(-len(rows) // BUDGET.batch_size) for rows in (train, test))
    # Every epoch reads each training image once; the test images are read once, in order.
    assert len(reads) == BUDGET.epochs * per_epoch + test_batches
    np.testing.assert_array_equal(np.sort(np.concatenate(reads[:per_epoch])), train)
    np.testing.assert_array_equal(np.concatenate(reads[-test_batches:]), test)


def test_non_finite_tokens_are_an_error_naming_the_images():
    pid, label, grids = _task(n_patients=24)
    grids["a"][5, 2, 1, 1] = np.inf
    with pytest.raises(TaskError, match=r"model a, protocol attentive: patch tokens of 1 image\(s\) .*'img5'"):
        fit_and_score(*_run(grids, label, pid), BUDGET)


def test_registered_reading_every_image_s_dense_features():
    entry = PROTOCOLS.get("attentive")
    assert entry.dense_rows == "harness.probes.attentive:all_rows"
    assert not entry.default
