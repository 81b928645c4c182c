import pytest

from harness.splits import LeakageError, check_no_leakage, make_split, pseudonym, split_hash, write_split


def test_split_is_by_patient_and_seeded():
    pids = [f"p{i // 3}" for i in range(90)]  # 30 patients, 3 images each
    a = make_split(pids, seed=1)
    assert a == make_split(pids, seed=1)
    assert a != make_split(pids, seed=2)
    for p in set(pids):
        assert len({s for q, s in zip(pids, a) if q == p}) == 1
    n_test_patients = len({p for p, s in zip(pids, a) if s == "test"})
    assert n_test_patients == 9  # round(0.3 * 30)


def test_split_does_not_depend_on_row_order():
    pids = [f"p{i // 2}" for i in range(40)]
    ids = [f"img{i}" for i in range(40)]
    a = dict(zip(ids, make_split(pids, seed=0)))
    rev = make_split(pids[::-1], seed=0)
    assert a == dict(zip(ids[::-1], rev))


def test_leakage_names_the_patient_and_images():
    with pytest.raises(LeakageError, match=r"patient 'p7'.*'b.png' in train.*'c.png' in test"):
        check_no_leakage(["p1", "p7", "p7"], ["train", "train", "test"], ["a.png", "b.png", "c.png"])


def test_predefined_split_with_leak_is_rejected():
    with pytest.raises(LeakageError, match="p2"):
        make_split(["p1", "p2", "p2", "p3"], seed=0, predefined=["train", "train", "test", ""])


def test_predefined_split_is_kept_and_drags_patients():
    pids = ["a", "a", "b", "c", "d", "e", "f"]
    pre = ["test", "", "", "", "", "", ""]
    s = make_split(pids, seed=0, predefined=pre)
    assert s[0] == s[1] == "test"


def test_split_file_has_hash_and_no_raw_patient_ids(tmp_path):
    pids, ids = ["PATIENT-123", "PATIENT-456"], ["x/1.png", "x/2.png"]
    h = write_split(tmp_path / "s.csv", "t", ids, pids, ["train", "test"])
    text = (tmp_path / "s.csv").read_text()
    assert h == split_hash(ids, ["train", "test"]) and h in text
    assert "PATIENT" not in text and pseudonym("PATIENT-123", "t") in text
    assert split_hash(ids, ["test", "train"]) != h
