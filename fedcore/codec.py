"""Safetensors codec for global models and client updates, strict on input.

Encoding uses the ``safetensors`` library, so every object in the bucket is a
real safetensors file any tool can open. Decoding uses our own parser of the
(simple) format because the aggregation function reads objects written by
strangers: it must bound the header before parsing it, check that offsets tile
the data buffer exactly, and check names, dtypes and shapes against the model
schema before a single value is used. Decoded arrays are read-only views of
the downloaded bytes (no copy).

Format: 8-byte little-endian header length N, N bytes of JSON header
(``{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets"}}``),
then the data buffer.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import save as _st_save

from fedcore.errors import IntegrityError

MAX_HEADER_BYTES = 1 << 20  # a 4-tensor model needs < 1 KiB; 1 MiB leaves room for metadata
MAX_OBJECT_BYTES = 1 << 30

_DTYPES = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U32": np.dtype("<u4"),
    "I64": np.dtype("<i8"),
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}

MODEL_FORMAT = "fedcore.model.v1"
UPDATE_FORMAT = "fedcore.update.v1"

# name -> (dtype name, shape)
Schema = Mapping[str, tuple[str, tuple[int, ...]]]

# Room for an update's header beyond its tensor data: the tensor entries and the
# metadata (a signed masked upload needs < 1 KiB). An update larger than its
# model's data plus this is refused before it is parsed (``max_update_bytes``).
UPDATE_HEADER_ALLOWANCE = 16 * 1024


def max_update_bytes(schema: Schema, dtype: str = "F32") -> int:
    """The largest object an update of ``schema`` (as ``dtype``) can honestly be.

    The function checks this against the listed size before downloading, so a
    member cannot make it fetch gigabytes into a Lambda's memory.
    """
    item = _DTYPES[dtype].itemsize
    return 8 + UPDATE_HEADER_ALLOWANCE + sum(math.prod(s) * item for _, s in schema.values())


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    pass


def load_json_object(raw: bytes, *, where: str, what: str) -> dict[str, Any]:
    """Strict JSON object from untrusted bytes; ``IntegrityError`` naming the reason.

    Refuses duplicate names (parsers disagree on which one wins, so a file could
    mean different things to a validator and a user), integers beyond Python's
    4300-digit limit (``ValueError``) and nesting deep enough to hit the
    recursion limit, none of which ``json.JSONDecodeError`` covers.
    """
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_pairs)
    except _DuplicateKey as exc:
        raise IntegrityError(f"{where}: {what} has duplicate name {exc.args[0]!r}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise IntegrityError(f"{where}: {what} is not JSON (UTF-8): {exc}") from None
    except RecursionError:
        raise IntegrityError(f"{where}: {what} is nested too deeply") from None
    if not isinstance(doc, dict):
        raise IntegrityError(f"{where}: {what} is not a JSON object")
    return doc


@dataclass(frozen=True)
class Header:
    """A parsed, validated safetensors header."""

    metadata: dict[str, str]
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> dtype, shape, begin, end
    data_start: int
    data_len: int


def parse_header(blob: bytes | memoryview, *, where: str, total_size: int | None = None) -> Header:
    """Validate the header of a safetensors object.

    ``blob`` may be only a prefix of the object (for metadata-only reads); pass
    the full object size as ``total_size`` then. Raises ``IntegrityError``
    naming ``where`` on anything malformed.
    """
    size = len(blob) if total_size is None else total_size
    if size > MAX_OBJECT_BYTES:
        raise IntegrityError(f"{where}: object of {size} bytes exceeds {MAX_OBJECT_BYTES}")
    if len(blob) < 8:
        raise IntegrityError(f"{where}: truncated: {len(blob)} bytes, no header length")
    (n,) = struct.unpack_from("<Q", blob, 0)
    if n > MAX_HEADER_BYTES:
        raise IntegrityError(f"{where}: header claims {n} bytes, limit {MAX_HEADER_BYTES}")
    if 8 + n > size:
        raise IntegrityError(f"{where}: header claims {n} bytes but object has {size}")
    if 8 + n > len(blob):
        raise IntegrityError(f"{where}: header not fully read ({len(blob)} of {8 + n} bytes)")
    raw = load_json_object(bytes(blob[8 : 8 + n]), where=where, what="header")
    meta = raw.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise IntegrityError(f"{where}: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    spans = []
    for name, info in raw.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise IntegrityError(f"{where}: tensor {name!r} entry malformed")
        dtype, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise IntegrityError(f"{where}: tensor {name!r} has unsupported dtype {dtype!r}")
        if not (
            isinstance(shape, list)
            and len(shape) <= 8
            and all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape
            )
        ):
            raise IntegrityError(f"{where}: tensor {name!r} has invalid shape {shape!r}")
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise IntegrityError(f"{where}: tensor {name!r} has invalid data_offsets")
        begin, end = offs
        nbytes = math.prod(shape) * _DTYPES[dtype].itemsize
        if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
            raise IntegrityError(
                f"{where}: tensor {name!r} offsets {offs} do not match shape {shape} "
                f"{dtype} within a {data_len}-byte buffer"
            )
        tensors[name] = (dtype, tuple(shape), begin, end)
        spans.append((begin, end))
    spans.sort()
    cursor = 0
    for begin, end in spans:
        if begin != cursor:
            raise IntegrityError(f"{where}: tensor data overlaps or leaves gaps at byte {begin}")
        cursor = end
    if cursor != data_len:
        raise IntegrityError(f"{where}: {data_len - cursor} trailing bytes after tensor data")
    return Header(meta, tensors, 8 + n, data_len)


def decode_tensors(
    blob: bytes, *, where: str, schema: Schema | None = None
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Decode a whole object into read-only arrays, checked against ``schema``."""
    header = parse_header(blob, where=where)
    if schema is not None:
        check_schema(header, schema, where=where)
    buf = memoryview(blob)[header.data_start :]
    out = {}
    for name, (dtype, shape, begin, end) in header.tensors.items():
        arr = np.frombuffer(buf[begin:end], dtype=_DTYPES[dtype]).reshape(shape)
        out[name] = arr
    return out, header.metadata


def check_schema(header: Header, schema: Schema, *, where: str) -> None:
    names, expected = set(header.tensors), set(schema)
    if names != expected:
        missing, extra = sorted(expected - names), sorted(names - expected)
        raise IntegrityError(f"{where}: tensor names differ: missing {missing}, unexpected {extra}")
    for name, (dtype, shape) in schema.items():
        got_dtype, got_shape, _, _ = header.tensors[name]
        if got_dtype != dtype or got_shape != tuple(shape):
            raise IntegrityError(
                f"{where}: tensor {name!r} is {got_dtype}{list(got_shape)}, "
                f"expected {dtype}{list(shape)}"
            )


def schema_of(tensors: Mapping[str, np.ndarray]) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {
        name: (_DTYPE_NAMES[np.dtype(a.dtype).newbyteorder("<")], tuple(a.shape))
        for name, a in tensors.items()
    }


def with_dtype(schema: Schema, dtype: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {name: (dtype, shape) for name, (_, shape) in schema.items()}


def encode_tensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    arrays = {name: np.array(a, order="C", copy=None) for name, a in tensors.items()}
    for name, a in arrays.items():
        if np.dtype(a.dtype).newbyteorder("<") not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: unsupported dtype {a.dtype}")
    return _st_save(arrays, metadata=dict(metadata))


# -- typed metadata ---------------------------------------------------------


@dataclass(frozen=True)
class ModelMeta:
    """What a global version says about itself (``__metadata__`` of the model).

    ``cohorts`` names the cohort(s) this version applied: the commit protocol
    (DESIGN.md section 4) decides "was cohort X applied?" by reading these.
    """

    version: int
    parent: int | None
    cohorts: list[str] = field(default_factory=list)
    staleness: int = 0
    base_version: int | None = None
    weight: float = 0.0
    members: list[str] = field(default_factory=list)
    num_samples: int = 0
    created_at: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    # The server optimizer state after this version ({"kind", "key", "sha256"}), for a
    # stateful server optimizer only; None (and absent from the bytes) for plain FedAvg.
    optimizer: dict[str, str] | None = None

    def to_metadata(self) -> dict[str, str]:
        doc = asdict(self)
        if doc["optimizer"] is None:
            del doc["optimizer"]  # plain FedAvg versions keep their exact bytes
        return {"format": MODEL_FORMAT, "fedcore": json.dumps(doc, sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], *, where: str) -> ModelMeta:
        doc = _meta_doc(meta, MODEL_FORMAT, where)
        try:
            out = cls(**doc)
            if not _is_int(out.version) or out.version < 0:
                raise TypeError("version must be a non-negative int")
            if out.parent is not None and not _is_int(out.parent):
                raise TypeError("parent must be an int or null")
            if not (
                isinstance(out.cohorts, list)
                and all(isinstance(c, str) for c in out.cohorts)
                and isinstance(out.members, list)
                and all(isinstance(c, str) for c in out.members)
            ):
                raise TypeError("cohorts and members must be lists of strings")
            if not isinstance(out.metrics, dict):
                raise TypeError("metrics must be an object")
            if out.optimizer is not None and not (
                isinstance(out.optimizer, dict)
                and set(out.optimizer) == {"kind", "key", "sha256"}
                and all(isinstance(v, str) for v in out.optimizer.values())
            ):
                raise TypeError("optimizer must be null or {kind, key, sha256} strings")
        except TypeError as exc:
            raise IntegrityError(f"{where}: model metadata invalid: {exc}") from None
        return out


@dataclass(frozen=True)
class UpdateMeta:
    """What a client says about its update; every field is checked against the key and config."""

    cohort_id: str
    client_id: str
    base_version: int
    num_samples: int
    loss: float
    mode: str = "plaintext"
    # Seconds the device's local training took (sizes later cohorts' deadlines). Optional:
    # absent from older objects, and left out of the metadata when None, so an update
    # without it is byte-for-byte what it was before the field existed.
    train_s: float | None = None
    # sha256 hex of the tensors (``fedcore.secagg.protocol.update_digest``) and the
    # member's Ed25519 signature over every other field (``sign_update``). None only
    # before signing: the function refuses an update without them (``verify_update``).
    digest: str | None = None
    signature: str | None = None

    def document(self) -> dict[str, Any]:
        """The ``fedcore`` metadata document: every field, those that are None left out."""
        doc = asdict(self)
        return {k: v for k, v in doc.items() if not (k in _OPTIONAL_UPDATE and v is None)}

    def to_metadata(self) -> dict[str, str]:
        return {"format": UPDATE_FORMAT, "fedcore": json.dumps(self.document(), sort_keys=True)}

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], *, where: str) -> UpdateMeta:
        doc = _meta_doc(meta, UPDATE_FORMAT, where)
        try:
            out = cls(**doc)
        except TypeError as exc:
            raise IntegrityError(f"{where}: update metadata invalid: {exc}") from None
        for name in ("cohort_id", "client_id", "mode"):
            if not isinstance(getattr(out, name), str):
                raise IntegrityError(f"{where}: {name} must be a string")
        if not isinstance(out.num_samples, int) or isinstance(out.num_samples, bool):
            raise IntegrityError(f"{where}: num_samples must be an integer")
        if not 1 <= out.num_samples <= 10_000_000:
            raise IntegrityError(f"{where}: num_samples {out.num_samples} out of range [1, 1e7]")
        if not _is_int(out.base_version) or not 0 <= out.base_version < 2**53:
            raise IntegrityError(f"{where}: base_version must be a non-negative integer")
        if not isinstance(out.loss, (int, float)) or not math.isfinite(out.loss):
            raise IntegrityError(f"{where}: loss must be a finite number")
        if out.train_s is not None and (
            not isinstance(out.train_s, (int, float))
            or isinstance(out.train_s, bool)
            or not 0 <= out.train_s <= 1e6
        ):
            raise IntegrityError(f"{where}: train_s must be a number of seconds in [0, 1e6]")
        for name in ("digest", "signature"):
            if getattr(out, name) is not None and not isinstance(getattr(out, name), str):
                raise IntegrityError(f"{where}: {name} must be a string")
        return out


# Left out of an update's metadata when None, so an unsigned update without ``train_s``
# is byte-for-byte what it was before these fields existed.
_OPTIONAL_UPDATE = frozenset({"train_s", "digest", "signature"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _meta_doc(meta: Mapping[str, str], fmt: str, where: str) -> dict[str, Any]:
    if meta.get("format") != fmt:
        raise IntegrityError(f"{where}: format is {meta.get('format')!r}, expected {fmt!r}")
    return load_json_object(
        meta.get("fedcore", "").encode(), where=where, what="metadata 'fedcore'"
    )


# -- models and plaintext updates -------------------------------------------


def encode_model(params: Mapping[str, np.ndarray], meta: ModelMeta) -> bytes:
    for name, a in params.items():
        if a.dtype != np.float32:
            raise ValueError(f"model tensor {name!r} must be float32, got {a.dtype}")
    return encode_tensors(params, meta.to_metadata())


def decode_model(
    blob: bytes, *, where: str, schema: Schema | None = None
) -> tuple[dict[str, np.ndarray], ModelMeta]:
    tensors, meta = decode_tensors(blob, where=where, schema=schema)
    for name, a in tensors.items():
        if a.dtype != np.float32:
            raise IntegrityError(f"{where}: model tensor {name!r} is {a.dtype}, expected float32")
    return tensors, ModelMeta.from_metadata(meta, where=where)


def encode_update(delta: Mapping[str, np.ndarray], meta: UpdateMeta) -> bytes:
    return encode_tensors(
        {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}, meta.to_metadata()
    )


def decode_update(
    blob: bytes, *, where: str, schema: Schema
) -> tuple[dict[str, np.ndarray], UpdateMeta]:
    """Decode a plaintext update: float32, the model's names and shapes, all finite."""
    cap = max_update_bytes(schema)
    if len(blob) > cap:
        raise IntegrityError(f"{where}: update of {len(blob)} bytes exceeds the {cap}-byte cap")
    tensors, meta = decode_tensors(blob, where=where, schema=with_dtype(schema, "F32"))
    check_finite(tensors, where=where)
    return tensors, UpdateMeta.from_metadata(meta, where=where)


def check_finite(tensors: Mapping[str, np.ndarray], *, where: str) -> None:
    """Refuse NaN and infinities, saying how many of each (the log line is the diagnosis)."""
    for name, a in tensors.items():
        if not np.isfinite(a).all():
            nan, pos = int(np.isnan(a).sum()), int(np.isposinf(a).sum())
            neg = int(np.isneginf(a).sum())
            raise IntegrityError(
                f"{where}: tensor {name!r} contains NaN or infinity "
                f"({nan} NaN, {pos} +inf, {neg} -inf)"
            )
