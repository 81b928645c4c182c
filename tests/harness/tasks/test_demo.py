"""The `demo` phantom: determinism, value ranges, masks, label prevalence, sex/age effects, each finding's pixels,
several visits per patient, the content digest and the factory."""
from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest

from harness.protocols import MIN_POSITIVE_PATIENTS, label_status
from harness.splits import make_split
from harness.tasks import demo as demo_mod
from harness.tasks.base import TaskContext, TaskError, build_task
from harness.tasks.demo import LABEL_NAMES, DemoTask, PhantomConfig, render_image, render_mask

SIZE = 128


@pytest.fixture(scope="module")
def task() -> DemoTask:
    return DemoTask(PhantomConfig(n_patients=60, size=SIZE))


def _with(task: DemoTask, label: str, alone: bool = True) -> int:
    """The first image showing `label` (and, when `alone`, no other finding)."""
    lab = task.table.labels
    j = LABEL_NAMES.index(label)
    hits = np.flatnonzero(lab[:, j] & ((lab.sum(1) == 1) if alone else True))
    assert hits.size, f"no image with {label} in the fixture task"
    return int(hits[0])


def _pair(task: DemoTask, i: int, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Image i as drawn, and the same image (same anatomy, pose, exposure, noise) without `label`."""
    a, v, seed = task.params(i)
    off = replace(v, **{label: False if label == "cardiomegaly" else 0.0})
    assert off.labels[LABEL_NAMES.index(label)] == 0
    return render_image(a, v, SIZE, seed), render_image(a, off, SIZE, seed)


def _pixel_of(view, point: tuple[float, float], size: int) -> tuple[int, int]:
    """The image pixel whose centre maps closest to a point in the patient's frame (through the pose jitter)."""
    x, y, _ = demo_mod._grid(view, size)
    k = np.argmin((x - point[0]) ** 2 + (y - point[1]) ** 2)
    return np.unravel_index(k, x.shape)


def test_table_contract(task):
    t = task.table
    n = len(t)
    assert all(re.fullmatch(r"demo/\d{6}", i) for i in t.image_ids)
    assert all(re.fullmatch(r"P\d{5}", p) for p in t.patient_ids)
    assert t.label_names == list(LABEL_NAMES)
    assert t.labels.dtype == np.int8 and t.labels.shape == (n, 4) and set(np.unique(t.labels)) <= {0, 1}
    assert set(t.sex) <= {"M", "F", None}
    assert t.age.dtype == float and np.nanmin(t.age) >= 18 and np.nanmax(t.age) <= 95
    assert t.split is None and t.has_mask.dtype == bool and t.has_mask.all()
    assert task.mask_names == ("lungs",)


@pytest.fixture(scope="module")
def big() -> DemoTask:
    """A large set for counting (its table only; no image is drawn)."""
    return DemoTask(PhantomConfig(n_patients=3000, size=64, p_nodule=0.4))


def test_missing_sex_and_age_are_per_patient(big):
    t = big.table
    sex_missing = np.array([s is None for s in t.sex])
    age_missing = np.isnan(t.age)
    assert 0.015 < sex_missing.mean() < 0.05 and 0.015 < age_missing.mean() < 0.05
    for p in set(np.array(t.patient_ids)[sex_missing]):
        rows = [i for i, q in enumerate(t.patient_ids) if q == p]
        assert all(t.sex[i] is None for i in rows)


def test_images_are_deterministic_and_independent_of_order(task):
    order = [5, 0, 17, 3]
    first = {i: task.load_image(i) for i in order}
    again = DemoTask(PhantomConfig(n_patients=60, size=SIZE))
    for i in reversed(order):
        np.testing.assert_array_equal(again.load_image(i), first[i])
        np.testing.assert_array_equal(again.load_mask(i), task.load_mask(i))
    assert not np.array_equal(first[5], first[0])


def test_seed_changes_the_set(task):
    other = DemoTask(PhantomConfig(n_patients=60, size=SIZE, seed=1))
    assert not np.array_equal(other.load_image(0), task.load_image(0))
    assert not np.array_equal(other.table.labels, task.table.labels)


def test_image_dtype_range_and_radiograph_look(task):
    for i in range(0, len(task), 15):
        img, mask = task.load_image(i), task.load_mask(i)[0]
        assert img.dtype == np.float32 and img.shape == (SIZE, SIZE)
        assert img.min() >= 0.0 and img.max() <= 1.0 and img.std() > 0.1
        # PA look: air-filled lungs darker than the mediastinum between them and the abdomen below them.
        rows = np.flatnonzero(mask.any(1))
        mid = img[rows[len(rows) // 3]: rows[2 * len(rows) // 3], SIZE // 2 - 3: SIZE // 2 + 3].mean()
        assert img[mask].mean() + 0.2 < min(mid, img[-SIZE // 8:, SIZE // 3: 2 * SIZE // 3].mean())


def test_lung_masks_shape_and_extent(task):
    for i in range(0, len(task), 10):
        m = task.load_mask(i)
        assert m.dtype == bool and m.shape == (1, SIZE, SIZE)
        m = m[0]
        assert 0.12 < m.mean() < 0.4, f"image {i}: lungs cover {m.mean():.2f} of the image"
        # Two lungs: each half holds one, and the midline (mediastinum) is not lung.
        assert m[:, : SIZE // 2].mean() > 0.05 and m[:, SIZE // 2:].mean() > 0.05
        assert not m[:, SIZE // 2 - 2: SIZE // 2 + 2].any()


def test_prevalence_matches_config(big):
    t, cfg = big, big.cfg
    observed = t.table.labels.mean(0)
    for name, want, got in zip(LABEL_NAMES, cfg.prevalences, observed):
        assert abs(got - want) < 0.025, f"{name}: prevalence {got:.3f}, configured {want}"
    assert 2.0 * cfg.n_patients * 0.95 < len(t) < 2.0 * cfg.n_patients * 1.05  # 1-3 visits, mean 2


def test_sex_and_age_change_the_anatomy():
    t = DemoTask(PhantomConfig(n_patients=120, size=SIZE))
    firsts = sorted({p: i for i, p in reversed(list(enumerate(t.table.patient_ids)))}.values())
    width, height, sex, age = [], [], [], []
    for i in firsts:
        a, v, _ = t.params(i)
        m = t.load_mask(i)[0]
        cols, rows = np.flatnonzero(m.any(0)), np.flatnonzero(m.any(1))
        width.append(cols[-1] - cols[0])
        height.append(rows[-1] - rows[0])
        sex.append(a.sex)
        age.append(a.age)
    width, height, sex, age = map(np.array, (width, height, sex, age))
    # Thoracic width (from the masks): men's is larger by ~0.06 image widths, i.e. ~8 px at 128.
    assert width[sex == "M"].mean() - width[sex == "F"].mean() > 4
    # Kyphosis-like shortening of the lung fields with age.
    assert np.corrcoef(age, height)[0, 1] < -0.2


def test_bone_density_brightens_the_ribs_in_bands():
    """Bone density (which falls with age) brightens the bones only: over the lungs the difference between a dense
    and a thin skeleton is never negative and comes in rib bands (neither everywhere nor nowhere)."""
    t = DemoTask(PhantomConfig(n_patients=3, size=SIZE))
    a, v, seed = t.params(0)
    dense = render_image(replace(a, bone=1.15), v, SIZE, seed)
    thin = render_image(replace(a, bone=0.55), v, SIZE, seed)
    d = (dense - thin)[render_mask(a, v, SIZE)]
    assert d.min() > -1e-4 and d.mean() > 0.01
    assert 0.2 < (d > 0.02).mean() < 0.8


def test_bone_density_falls_with_age(big):
    age, bone = np.array([(a.age, a.bone) for a in big.anatomies]).T
    assert np.corrcoef(age, bone)[0, 1] < -0.5


def test_effusion_brightens_the_lung_base_only(task):
    cases = np.flatnonzero(task.table.labels[:, LABEL_NAMES.index("effusion")])
    sizes = [task.params(k)[1].effusion for k in cases]
    for i in (cases[np.argmax(sizes)], cases[np.argmin(sizes)]):  # the largest and the subtlest
        a, v, _ = task.params(i)
        on, off = _pair(task, i, "effusion")
        m = task.load_mask(i)[0]
        rows = np.flatnonzero(m.any(1))
        cols = np.arange(SIZE)[None, :]
        sides = np.zeros_like(m)
        for s in a.effusion_sides:
            sides |= cols > SIZE // 2 if s > 0 else cols < SIZE // 2
        base = m & sides & (np.arange(SIZE)[:, None] > rows[-1] - 0.15 * len(rows))
        apex = m & (np.arange(SIZE)[:, None] < rows[0] + 0.5 * len(rows))
        diff = on - off
        # Even the subtlest blunts the costophrenic angle; a large one brightens the whole base.
        assert diff[base].max() > 0.05 and diff[base].mean() > (0.05 if v.effusion > 0.1 else 0.0)
        assert np.abs(diff[apex]).max() < 1e-3 and np.abs(diff[m & ~sides]).max(initial=0.0) < 1e-3


def test_nodule_brightens_its_site_only(task):
    i = _with(task, "nodule")
    a, v, _ = task.params(i)
    on, off = _pair(task, i, "nodule")
    r, c = _pixel_of(v, demo_mod.nodule_site(a), SIZE)
    diff = on - off
    assert diff[max(r - 1, 0): r + 2, max(c - 1, 0): c + 2].mean() > 0.01
    rr, cc = np.mgrid[:SIZE, :SIZE]
    far = (rr - r) ** 2 + (cc - c) ** 2 > (4 * a.nodule_radius * v.nodule * SIZE + 3) ** 2
    assert np.abs(diff[far]).max() < 1e-3


def test_pneumothorax_darkens_its_lung_periphery(task):
    i = _with(task, "pneumothorax")
    a, v, _ = task.params(i)
    on, off = _pair(task, i, "pneumothorax")
    m = task.load_mask(i)[0]
    side = np.arange(SIZE)[None, :] > SIZE // 2 if a.pneumothorax_side > 0 else np.arange(SIZE)[None, :] < SIZE // 2
    diff = on - off
    assert diff[m & side].mean() < -0.005  # lucent rim without vascular markings
    assert np.abs(diff[m & ~side]).max() < 1e-3  # the other lung is untouched


def test_cardiomegaly_widens_the_heart(task):
    # Enlarged hearts start just above a cardiothoracic ratio of 0.5: take the clearest one of the set.
    cases = np.flatnonzero(task.table.labels[:, LABEL_NAMES.index("cardiomegaly")])
    i = max(cases, key=lambda k: task.params(k)[0].ctr_enlarged - task.params(k)[0].ctr)
    a, v, seed = task.params(i)
    on, off = _pair(task, i, "cardiomegaly")
    m_on, m_off = render_mask(a, v, SIZE), render_mask(a, replace(v, cardiomegaly=False), SIZE)
    # The heart's left border (image right) moves into the left lung field, which shrinks and brightens.
    right = np.arange(SIZE)[None, :] > SIZE // 2
    assert (m_on & right).sum() < 0.92 * (m_off & right).sum()
    assert (on - off)[m_off & ~m_on].mean() > 0.1


def test_several_visits_per_patient_share_anatomy(task):
    pids = np.array(task.table.patient_ids)
    _, counts = np.unique(pids, return_counts=True)
    assert counts.max() <= 3 and (counts >= 2).mean() > 0.4
    t = task.table
    same, other = [], []
    patients = [p for p, c in zip(*np.unique(pids, return_counts=True)) if c >= 2][:8]
    for p in patients:
        i, j = np.flatnonzero(pids == p)[:2]
        assert t.sex[i] == t.sex[j] and (t.age[i] == t.age[j] or np.isnan(t.age[i]) and np.isnan(t.age[j]))
        assert task.params(i)[0] is task.params(j)[0]
        mi, mj = task.load_mask(i)[0], task.load_mask(j)[0]
        same.append((mi & mj).sum() / (mi | mj).sum())
    for p, q in zip(patients, patients[1:]):
        mi, mj = task.load_mask(np.flatnonzero(pids == p)[0])[0], task.load_mask(np.flatnonzero(pids == q)[0])[0]
        other.append((mi & mj).sum() / (mi | mj).sum())
    # Follow-ups differ only by pose jitter (and a finding), so their masks overlap more than two patients'.
    assert np.mean(same) > np.mean(other)


def test_content_digest(task, monkeypatch):
    d = task.content_digest()
    assert re.fullmatch(r"[0-9a-f]{64}", d)
    assert DemoTask(PhantomConfig(n_patients=60, size=SIZE)).content_digest() == d
    assert DemoTask(PhantomConfig(n_patients=60, size=SIZE, seed=1)).content_digest() != d
    assert DemoTask(PhantomConfig(n_patients=60, size=SIZE * 2)).content_digest() != d
    monkeypatch.setattr(demo_mod, "GENERATOR_VERSION", demo_mod.GENERATOR_VERSION + "-changed")
    assert task.content_digest() != d


def test_factory_and_arguments():
    t = build_task("demo", "n_patients=4,size=64,p_nodule=1", TaskContext())
    assert t.name == "demo" and len(set(t.table.patient_ids)) == 4 and t.table.labels[:, 1].all()
    assert t.load_image(0).shape == (64, 64)
    assert len(build_task("demo", None, TaskContext())) == 241  # the default set (table only)
    with pytest.raises(TaskError, match="n_patient"):
        build_task("demo", "n_patient=4", TaskContext())
    with pytest.raises(TaskError, match="p_nodule"):
        build_task("demo", "p_nodule=2", TaskContext())
    with pytest.raises(TaskError, match="size='big'"):
        build_task("demo", "size=big", TaskContext())


def test_the_default_set_is_the_small_one_and_every_label_is_evaluable():
    """The first-run default (PhantomConfig's comment): about 250 images, every label evaluable at the default split
    (seed 0, 30% test) and --min-positive-patients, and the leaderboard's Task line says it is the small set."""
    t = DemoTask()
    assert len(t) < 300
    ok, why = label_status(t, np.asarray(make_split(t.table.patient_ids, 0, 0.3)), MIN_POSITIVE_PATIENTS)
    assert ok.all(), why
    assert "small default" in t.header_note and "small default" not in DemoTask(PhantomConfig(n_patients=5)).header_note
