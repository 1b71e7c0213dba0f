"""Codec: round-trips and rejection of malformed objects (GIVEN / WHEN / THEN)."""

from __future__ import annotations

import contextlib
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load as st_load

from fedcore.codec import (
    MAX_HEADER_BYTES,
    ModelMeta,
    UpdateMeta,
    decode_model,
    decode_tensors,
    decode_update,
    encode_model,
    encode_update,
    schema_of,
)
from fedcore.errors import IntegrityError

SCHEMA = {"w": ("F32", (3, 4)), "b": ("F32", (4,))}
META = UpdateMeta("c00000001", "dev-1", 3, 100, 0.5)


def _delta(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w": rng.normal(size=(3, 4)).astype(np.float32),
        "b": rng.normal(size=4).astype(np.float32),
    }


def _raw(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@given(
    arrays=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_.]{0,10}", fullmatch=True),
        hnp.arrays(np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)),
        min_size=1,
        max_size=4,
    )
)
@settings(max_examples=50, deadline=None)
def test_model_round_trip_is_exact_and_real_safetensors(arrays: dict[str, np.ndarray]) -> None:
    """GIVEN any float32 tensors WHEN encoded as a model THEN our decoder and the
    safetensors library both return them bit-for-bit (NaN payloads included)."""
    meta = ModelMeta(version=7, parent=6, cohorts=["c00000002"], metrics={"x": 1})
    blob = encode_model(arrays, meta)
    params, got = decode_model(blob, where="t", schema=schema_of(arrays))
    assert got == meta
    lib = st_load(blob)
    for k, a in arrays.items():
        assert params[k].tobytes() == a.tobytes() == lib[k].tobytes()
        assert not params[k].flags.writeable  # zero-copy view of the body


def test_update_round_trip() -> None:
    blob = encode_update(_delta(), META)
    delta, meta = decode_update(blob, where="k", schema=SCHEMA)
    assert meta == META
    np.testing.assert_array_equal(delta["w"], _delta()["w"])


def _bad_cases() -> list[tuple[str, bytes, str]]:
    good = encode_update(_delta(), META)
    n = struct.unpack_from("<Q", good)[0]
    header = json.loads(good[8 : 8 + n])
    data = good[8 + n :]

    def with_header(**changes: object) -> bytes:
        h = json.loads(json.dumps(header))
        for k, v in changes.items():
            if v is None:
                h.pop(k)
            else:
                h[k] = v
        return _raw(h, data)

    meta = header["__metadata__"]
    doc = json.loads(meta["fedcore"])
    return [
        ("empty", b"", "truncated"),
        ("short length", b"\x01\x02", "truncated"),
        ("huge header claim", struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}", "limit"),
        ("header beyond object", struct.pack("<Q", 1000) + b"{}", "object has"),
        ("truncated body", good[:-10], "offsets"),
        ("trailing bytes", good + b"\0" * 4, "trailing"),
        ("not json", struct.pack("<Q", 4) + b"nope", "JSON"),
        ("json list", _raw([], b""), "not a JSON object"),  # type: ignore[arg-type]
        ("wrong dtype", with_header(b={**header["b"], "dtype": "F64"}), "offsets"),
        ("unsupported dtype", with_header(b={**header["b"], "dtype": "BOOL"}), "dtype"),
        ("wrong shape", with_header(b={**header["b"], "shape": [2, 2]}), "expected F32"),
        ("negative dim", with_header(b={**header["b"], "shape": [-4]}), "shape"),
        ("missing tensor", _raw({"__metadata__": meta, "w": header["w"]}, data), "gaps|missing"),
        ("extra tensor", with_header(z={"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}), "unexpected"),
        ("overlap", _raw({"w": {**header["w"], "data_offsets": [0, 48]}, "b": {**header["b"], "data_offsets": [0, 16]}, "__metadata__": meta}, data), "overlap"),
        ("bad metadata type", with_header(__metadata__={"format": 3}), "strings"),
        ("wrong format", with_header(__metadata__={**meta, "format": "other"}), "format"),
        ("metadata not json", with_header(__metadata__={**meta, "fedcore": "{"}), "not JSON"),
        ("zero samples", with_header(__metadata__={**meta, "fedcore": json.dumps({**doc, "num_samples": 0})}), "num_samples"),
        ("bool samples", with_header(__metadata__={**meta, "fedcore": json.dumps({**doc, "num_samples": True})}), "num_samples"),
        ("nan loss", with_header(__metadata__={**meta, "fedcore": json.dumps({**doc, "loss": float("nan")})}), "loss"),
        ("unknown field", with_header(__metadata__={**meta, "fedcore": json.dumps({**doc, "evil": 1})}), "invalid"),
    ]  # fmt: skip


@pytest.mark.parametrize("name,blob,reason", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_malformed_update_is_rejected_with_reason(name: str, blob: bytes, reason: str) -> None:
    """GIVEN a malformed update WHEN decoded THEN IntegrityError names the object and why."""
    with pytest.raises(IntegrityError, match=reason) as err:
        decode_update(blob, where="cohorts/c00000001/plain/dev-1.safetensors", schema=SCHEMA)
    assert "cohorts/c00000001/plain/dev-1.safetensors" in str(err.value)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_is_rejected(bad: float) -> None:
    delta = _delta()
    delta["w"][1, 2] = bad
    with pytest.raises(IntegrityError, match="NaN or infinity"):
        decode_update(encode_update(delta, META), where="k", schema=SCHEMA)


@given(st.binary(max_size=300))
@settings(max_examples=300, deadline=None)
def test_fuzz_decoder_never_crashes(blob: bytes) -> None:
    """GIVEN arbitrary bytes THEN the decoder returns or raises IntegrityError, nothing else."""
    with contextlib.suppress(IntegrityError):
        decode_tensors(blob, where="fuzz")
