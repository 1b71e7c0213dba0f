"""Fuzzing the parsers that read strangers' bytes (hypothesis, kept brief).

Every parser at a trust boundary must, for any input, either return a value
that passes validation or raise ``IntegrityError`` (``ValueError`` for the S3
event parser, which yields it instead of raising, and ``UnknownKeyError`` for
keys). Anything else (``KeyError``, ``TypeError``, ``OverflowError``,
``RecursionError``...) would escape the handler and make Lambda retry a
poisoned event forever. Inputs are arbitrary bytes and JSON, and structured
mutations of valid objects: bit flips, truncations, header edits, and fields
replaced, deleted or added before the message is (validly) signed, so that
the checks behind the signature are reached too.

A coarse memory guard (the process's peak RSS may not grow by more than
``MAX_RSS_GROWTH``) catches a parser that allocates what a header claims.
"""

from __future__ import annotations

import json
import os
import resource
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore import codec, layout
from fedcore.codec import ModelMeta, UpdateMeta
from fedcore.dp.distributed import DistributedDP
from fedcore.errors import IntegrityError, UnknownKeyError
from fedcore.events import ObjectCreated, build_event, build_record, parse_records
from fedcore.messages import (
    CheckIn,
    Manifest,
    Mode,
    Pointer,
    Result,
    dumps,
    parse_checkin,
    parse_config,
    parse_manifest,
    parse_pointer,
    parse_result,
)
from fedcore.secagg import crypto
from fedcore.secagg.protocol import (
    DOMAIN_CONSISTENCY,
    DOMAIN_KEYS,
    DOMAIN_SHARES,
    DOMAIN_UNMASK,
    ConsistencyMsg,
    KeysMsg,
    MaskedMeta,
    SecAggParams,
    SharesMsg,
    UnmaskMsg,
    encode_consistency,
    encode_keys,
    encode_shares,
    encode_signed,
    encode_unmask,
    masked_metadata,
    parse_consistency,
    parse_identity,
    parse_keys,
    parse_masked_metadata,
    parse_shares,
    parse_unmask,
)
from tests.hostile import make_corpus as mc

SCHEMA = {"w": ("F32", (6, 5)), "b": ("F32", (5,))}
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")),  # raise it for a longer campaign
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_RSS_GROWTH = 256 * 1024  # KiB (ru_maxrss is in KiB on Linux)
SK = mc.signing_key("x1")
PK = crypto.ed25519_public(SK)
CID = "c00000001"


@pytest.fixture(autouse=True)
def bounded_memory() -> Iterator[None]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    yield
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < MAX_RSS_GROWTH, f"peak memory grew by {grown} KiB while fuzzing"


def refused_or(fn: Callable[[], Any], errors: type[Exception] | tuple = IntegrityError) -> Any:
    """``fn()``'s value, or None if it raised one of our validation errors (anything else fails)."""
    try:
        return fn()
    except errors:
        return None


# -- strategies ------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=10), json_values, max_size=6)


@st.composite
def mutated(draw: st.DrawFn, doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with some fields replaced by arbitrary JSON, deleted, or added."""
    out = dict(doc)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["replace", "delete", "add", "nest"]))
        if op == "add" or not out:
            out[draw(st.text(max_size=8))] = draw(json_values)
            continue
        name = draw(st.sampled_from(sorted(out)))
        if op == "delete":
            del out[name]
        elif op == "replace":
            out[name] = draw(json_values)
        elif isinstance(out[name], dict) and out[name]:  # mutate one level down
            inner = dict(out[name])
            inner[draw(st.sampled_from(sorted(inner)))] = draw(json_values)
            out[name] = inner
    return out


def json_bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


@st.composite
def byte_mutations(draw: st.DrawFn, blob: bytes) -> bytes:
    """Bit flips, a truncation or an extension, or an edited length prefix of ``blob``."""
    data = bytearray(blob)
    op = draw(st.sampled_from(["flip", "truncate", "extend", "length", "splice"]))
    if op == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
    elif op == "truncate":
        del data[draw(st.integers(0, len(data))) :]
    elif op == "extend":
        data += draw(st.binary(max_size=64))
    elif op == "length":
        data[:8] = struct.pack("<Q", draw(st.integers(0, 2**64 - 1)))
    else:
        i = draw(st.integers(0, len(data)))
        data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


# -- safetensors: headers, updates, models ----------------------------------------------

VALID_UPDATE = mc.update(CID, "x1")
VALID_MODEL = mc.st(mc.tensors(), ModelMeta(version=3, parent=2).to_metadata())


def _check_update(blob: bytes) -> None:
    got = refused_or(lambda: codec.decode_update(blob, where="u", schema=SCHEMA))
    if got is not None:
        tensors, meta = got
        assert {k: (codec.schema_of({k: v})[k]) for k, v in tensors.items()} == {
            k: (d, s) for k, (d, s) in SCHEMA.items()
        }
        assert all(np.isfinite(a).all() for a in tensors.values())
        assert isinstance(meta, UpdateMeta) and 1 <= meta.num_samples <= 10_000_000


def _check_model(blob: bytes) -> None:
    got = refused_or(lambda: codec.decode_model(blob, where="m"))
    if got is not None:
        tensors, meta = got
        assert all(a.dtype == np.float32 for a in tensors.values())
        assert isinstance(meta.version, int) and meta.version >= 0


@FUZZ
@given(st.binary(max_size=300))
def test_arbitrary_bytes_as_safetensors(blob: bytes) -> None:
    """GIVEN any bytes THEN the header parser and both decoders refuse or return valid values."""
    header = refused_or(lambda: codec.parse_header(blob, where="x"))
    if header is not None:
        assert header.data_start + header.data_len == len(blob)
    _check_update(blob)
    _check_model(blob)


@FUZZ
@given(st.data())
def test_mutated_updates_and_models(data: st.DataObject) -> None:
    """GIVEN a valid update or model with bits flipped, cut, extended or its length edited
    THEN decoding refuses it or returns something that passes every check."""
    _check_update(data.draw(byte_mutations(VALID_UPDATE)))
    _check_model(data.draw(byte_mutations(VALID_MODEL)))


def _header_of(blob: bytes) -> dict[str, Any]:
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8 : 8 + n])


@FUZZ
@given(st.data())
def test_edited_headers(data: st.DataObject) -> None:
    """GIVEN a valid update whose header JSON (entries, offsets, metadata) is edited
    THEN decoding refuses it or returns a valid update."""
    header = _header_of(VALID_UPDATE)
    edited = data.draw(mutated(header))
    body = VALID_UPDATE[8 + struct.unpack_from("<Q", VALID_UPDATE)[0] :]
    _check_update(mc.raw_st(json_bytes(edited), body))
    meta = json.loads(header["__metadata__"]["fedcore"])
    lie = {**header, "__metadata__": {**header["__metadata__"], "fedcore": json.dumps(data.draw(mutated(meta)))}}  # fmt: skip
    _check_update(mc.raw_st(json_bytes(lie), body))


# -- JSON protocol messages ---------------------------------------------------------------

CHECKIN = asdict(CheckIn("x1", "n0001", 1.7e9, "secagg", 0, "sig"))
CONFIG = mc.device_config(CID).to_doc()
MANIFEST = asdict(Manifest(CID, "keys", ["d1", "d2"], {"d1": "e"}, "all-members", 1.0))
RESULT = asdict(Result(CID, "applied", 1, "", ["d1"], {"d2": "late"}, 1.0, {"keys": 1.0}))
POINTER = asdict(Pointer(1, layout.model_key(1), "00", 1.0))

MESSAGE_PARSERS: list[tuple[Callable[..., Any], dict[str, Any]]] = [
    (parse_checkin, CHECKIN),
    (parse_config, CONFIG),
    (parse_manifest, MANIFEST),
    (parse_result, RESULT),
    (parse_pointer, POINTER),
]


@FUZZ
@given(st.binary(max_size=200) | json_values.map(json_bytes) | json_objects.map(json_bytes))
def test_message_parsers_on_arbitrary_input(blob: bytes) -> None:
    """GIVEN any bytes or JSON THEN every message parser refuses it or returns its type."""
    for parse, _ in MESSAGE_PARSERS:
        refused_or(lambda parse=parse: parse(blob, where="m"))


@FUZZ
@given(st.data())
def test_message_parsers_on_mutated_messages(data: st.DataObject) -> None:
    """GIVEN a valid check-in, config, manifest, result or pointer with fields replaced,
    deleted or added THEN the parser refuses it or returns a message with sane fields."""
    for parse, doc in MESSAGE_PARSERS:
        msg = refused_or(lambda p=parse, d=doc: p(json_bytes(data.draw(mutated(d))), where="m"))
        if msg is None:
            continue
        if parse is parse_config:
            assert msg.base_version >= 0 and msg.min_members >= 1
            assert all(isinstance(v, str) for v in msg.identities.values())
            assert (msg.secagg is not None) == (msg.mode is Mode.SECAGG)
        if parse is parse_pointer:
            assert msg.version >= 0


@FUZZ
@given(json_values)
def test_parameter_blocks(doc: Any) -> None:
    """GIVEN any JSON as a config's secagg or dp block THEN it is refused or valid."""
    p = refused_or(lambda: SecAggParams.from_dict(doc, where="p"))
    if p is not None:
        refused_or(lambda: p.validate(5, where="p"))
    refused_or(lambda: DistributedDP.from_dict(doc, where="p"))


# -- signed secure-aggregation messages -------------------------------------------------------

KEYS = json.loads(encode_keys(KeysMsg(CID, "x1", bytes(32), bytes(range(32))), SK))
SHARES = json.loads(encode_shares(SharesMsg(CID, "x1", "0" * 64, {"ok1": mc.ciphertext(1)}), SK))
UNMASK = json.loads(encode_unmask(UnmaskMsg(CID, "x1", {"ok1": 5}, {"ok2": 7}, ("ok1", "x1")), SK))
CONSISTENCY = json.loads(encode_consistency(ConsistencyMsg(CID, "x1", ("ok1", "x1")), SK))
IDS = {"identity": PK, "cohort_id": CID, "client_id": "x1", "where": "s"}


def _signed_parsers(blob: bytes) -> None:
    refused_or(lambda: parse_keys(blob, **IDS))
    refused_or(lambda: parse_shares(blob, **IDS))
    refused_or(lambda: parse_shares(blob, **{**IDS, "identity": None}, receiver="ok1"))
    refused_or(lambda: parse_unmask(blob, **IDS))
    refused_or(lambda: parse_consistency(blob, **IDS))
    refused_or(lambda: parse_identity(blob, client_id="x1", where="i"))


@FUZZ
@given(st.binary(max_size=200) | json_objects.map(json_bytes))
def test_signed_parsers_on_arbitrary_input(blob: bytes) -> None:
    _signed_parsers(blob)


@FUZZ
@given(st.data())
def test_signed_parsers_on_mutated_messages_signed_by_the_sender(data: st.DataObject) -> None:
    """GIVEN a key, share or reveal message with fields mutated and then validly signed by
    its sender THEN the checks behind the signature refuse it or return a valid message."""
    for domain, doc in (
        (DOMAIN_KEYS, KEYS), (DOMAIN_SHARES, SHARES), (DOMAIN_UNMASK, UNMASK),
        (DOMAIN_CONSISTENCY, CONSISTENCY),
    ):  # fmt: skip
        body = {k: v for k, v in data.draw(mutated(doc)).items() if k != "signature"}
        blob = refused_or(lambda b=body, d=domain: encode_signed(b, domain=d, signing_key=SK), (ValueError, TypeError))  # fmt: skip
        if blob is None:  # not JSON-serialisable as signed (e.g. NaN is fine, but not this)
            continue
        _signed_parsers(blob)
        keys = refused_or(lambda b=blob: parse_keys(b, **IDS))
        if keys is not None:
            assert len(keys.c_pk) == len(keys.s_pk) == 32 and keys.c_pk != keys.s_pk
        shares = refused_or(lambda b=blob: parse_shares(b, **IDS))
        if shares is not None:
            assert all(
                len(ct) == mc.SHARE_PLAINTEXT_BYTES + 28 for ct in shares.ciphertexts.values()
            )
        reveal = refused_or(lambda b=blob: parse_unmask(b, **IDS))
        if reveal is not None:
            assert not set(reveal.self_shares) & set(reveal.key_shares)
        signed = refused_or(lambda b=blob: parse_consistency(b, **IDS))
        if signed is not None:  # a signature over a sorted set of ids that includes its signer
            assert "x1" in signed.inputs and list(signed.inputs) == sorted(set(signed.inputs))


@FUZZ
@given(st.data())
def test_masked_metadata(data: st.DataObject) -> None:
    """GIVEN a masked upload's metadata, mutated and re-signed, or arbitrary strings
    THEN it is refused or parses to the signed fields."""
    md = masked_metadata(MaskedMeta(CID, "x1", 0, 36, "0" * 64), SK)
    doc = {k: v for k, v in json.loads(md["fedcore"]).items() if k != "signature"}
    body = data.draw(mutated(doc))
    signed = refused_or(lambda: encode_signed(body, domain="fedcore/v1/secagg/masked", signing_key=SK), (ValueError, TypeError))  # fmt: skip
    for meta in (
        {**md, "fedcore": signed.decode() if signed else "{}"},
        data.draw(st.dictionaries(st.text(max_size=8), st.text(max_size=40), max_size=3)),
    ):
        got = refused_or(lambda m=meta: parse_masked_metadata(m, **IDS))
        if got is not None:
            assert isinstance(got.base_version, int) and isinstance(got.length, int)


# -- S3 events and keys ------------------------------------------------------------------------

RECORD = build_record(bucket="b", key="cohorts/c00000001/plain/x1.safetensors", size=3, etag="e", sequencer=1)  # fmt: skip


@FUZZ
@given(st.data())
def test_event_records(data: st.DataObject) -> None:
    """GIVEN arbitrary JSON, or a real record with fields mutated (one level down too)
    THEN ``parse_records`` yields ObjectCreated or ValueError per record and never raises."""
    record = data.draw(mutated(RECORD))
    if data.draw(st.booleans()):
        record["s3"] = data.draw(mutated(RECORD["s3"]))
        if data.draw(st.booleans()):
            record["s3"]["object"] = data.draw(mutated(RECORD["s3"]["object"]))
    for event in (build_event([record, data.draw(json_values)]), data.draw(json_values)):
        for item in parse_records(event):
            assert isinstance(item, (ObjectCreated, ValueError))
            if isinstance(item, ObjectCreated):
                assert isinstance(item.key, str) and 1 <= len(item.key.encode()) <= 1024
                assert isinstance(item.size, int) and item.size >= 0


@FUZZ
@given(st.text(max_size=80) | st.sampled_from(["cohorts/c00000001/plain/", "checkins/a/"]).flatmap(lambda p: st.text(max_size=30).map(lambda t: p + t)))  # fmt: skip
def test_keys(key: str) -> None:
    """GIVEN any string as an object key THEN it is classified or refused as unknown."""
    parsed = refused_or(lambda: layout.parse_key(key), UnknownKeyError)
    if parsed is not None:
        assert ".." not in key.split("/")


def test_fuzzing_stays_bounded_on_the_worst_corpus_inputs() -> None:
    """The corpus's resource attacks, directly: a 2**62-byte header claim, 5000 nested
    arrays, a 5000-digit integer; each is refused without allocating or recursing."""
    for blob in (
        mc.raw_st(b"{}", b"", length=2**62),
        mc.raw_st(b"[" * 5000 + b"]" * 5000, b""),
        mc.raw_st(b'{"n": ' + b"9" * 5000 + b"}", b""),
    ):
        with pytest.raises(IntegrityError):
            codec.parse_header(blob, where="worst")
    for blob in (b"[" * 5000 + b"]" * 5000, b'{"n": ' + b"9" * 5000 + b"}"):
        with pytest.raises(IntegrityError):
            parse_checkin(blob, where="worst")
    assert dumps(Pointer(0, "k", "", 0.0))  # the encoder still round-trips the happy path
