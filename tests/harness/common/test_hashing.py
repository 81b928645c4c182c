"""harness.common.hashing: every digest equals hashlib's sha256 of the bytes it stands for."""
import hashlib

import numpy as np
import pytest

from harness.common import hashing
from harness.common.hashing import array_digest, sha256_arrays, sha256_bytes, sha256_chunks, sha256_file, sha256_files, sha256_text


def _ref(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_bytes_text_and_chunks_equal_hashlib():
    assert sha256_bytes(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"  # FIPS 180-2
    assert sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_text("raddino-bench|t|ü") == _ref("raddino-bench|t|ü".encode("utf-8"))
    assert sha256_chunks([b"ab", b"", b"c"]) == sha256_bytes(b"abc")
    assert sha256_chunks(iter([b"a", b"bc"])) == sha256_bytes(b"abc")  # any iterable, consumed once


def test_files_are_read_in_blocks_and_concatenated_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(hashing, "CHUNK", 7)  # blocks smaller than the files: block boundaries must not matter
    rng = np.random.default_rng(0)
    a, b = rng.bytes(50), rng.bytes(23)
    (tmp_path / "a").write_bytes(a)
    (tmp_path / "b").write_bytes(b)
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_file(tmp_path / "a") == _ref(a)
    assert sha256_files([tmp_path / "a", str(tmp_path / "empty"), tmp_path / "b"]) == _ref(a + b)
    assert sha256_files([tmp_path / "b", tmp_path / "a"]) == _ref(b + a) != _ref(a + b)
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "missing")


def test_arrays_hash_names_then_c_order_bytes():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    y = np.array([1, 2], dtype=np.int64)
    expected = _ref(b"x" + x.tobytes() + b"y" + y.tobytes())
    assert sha256_arrays([("x", x), ("y", y)]) == expected
    assert sha256_arrays([("x", np.asfortranarray(x)), ("y", y)]) == expected  # memory layout does not matter
    assert sha256_arrays([("x", x.T.copy().T), ("y", y)]) == expected
    assert sha256_arrays([("y", y), ("x", x)]) != expected                       # order does
    assert sha256_arrays([("x", x + 1), ("y", y)]) != expected


def test_random_vit_digest_is_the_state_dict_bytes():
    torch = pytest.importorskip("torch")
    from baselines.floors import state_dict_digest

    model = torch.nn.Linear(3, 2)
    parts = b"".join(k.encode() + v.detach().numpy().tobytes() for k, v in sorted(model.state_dict().items()))
    assert state_dict_digest(model) == _ref(parts)


def test_array_digest_covers_dtype_shape_and_values():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert array_digest(x) == sha256_chunks([b"<f4(2, 3)", x.tobytes()])
    assert array_digest(np.asfortranarray(x)) == array_digest(x)                 # memory layout does not matter
    assert len({array_digest(x), array_digest(x.reshape(3, 2)), array_digest(x.astype(np.float64)),
                array_digest(x + 1), array_digest(x, x)}) == 5
