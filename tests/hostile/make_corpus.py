"""Write the hostile-input corpus (``tests/hostile/corpus/``) and its ``manifest.json``.

Run ``python -m tests.hostile.make_corpus`` from the repository root; the
output is byte-for-byte deterministic (fixed seeds, deterministic Ed25519
signatures, sorted JSON), so the committed files can be checked against a
fresh run (``tests/hostile/test_corpus.py`` does).

Every file is one hostile or malformed object at one parsing boundary. The
manifest says, per file, which boundary it targets, where the test puts it
(a key template and the concrete key), in which planned cohort, and the
substring the rejection's log line must contain. The plan is concrete on
purpose: cohorts in a fresh bucket are numbered from ``c00000001`` and each
applied cohort advances the version by one, so a file can name the exact
cohort, client and base version it lies about.

Identities are deterministic test keys (``signing_key``), so a file signed
"by" a member verifies against the key the test enrolls for it: a rejection
is then for the reason the entry names, not for an accidental bad signature.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcore import layout
from fedcore.codec import (
    UPDATE_HEADER_ALLOWANCE,
    ModelMeta,
    UpdateMeta,
)
from fedcore.layout import Phase
from fedcore.messages import CheckIn, CohortConfig, Manifest, Mode
from fedcore.secagg import crypto
from fedcore.secagg.protocol import (
    DOMAIN_CHECKIN,
    DOMAIN_KEYS,
    DOMAIN_SHARES,
    DOMAIN_UNMASK,
    MASKED_TENSOR,
    SHARE_PLAINTEXT_BYTES,
    KeysMsg,
    MaskedMeta,
    SecAggParams,
    SharesMsg,
    UnmaskMsg,
    encode_keys,
    encode_shares,
    encode_signed,
    encode_unmask,
    masked_metadata,
    sign_update,
)

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"
MODEL = {"w": (6, 5), "b": (5,)}  # tests.helpers.TINY
LENGTH = 6 * 5 + 5 + 1  # masked vector: every parameter plus the weight slot
BUCKET_TOKEN = "CORPUS-BUCKET"  # event files: the test substitutes its bucket's name
SECAGG_HONEST = ["ok1", "ok2", "ok3", "ok4", "ok5"]
PLAIN_HONEST = ["ok1", "ok2"]
DEVICES = ["d1", "d2", "d3"]
GRAPH_SEED = "00112233445566778899aabbccddeeff"

PLAIN_KEY = "cohorts/{cohort_id}/plain/{client_id}.safetensors"
MASKED_KEY = "cohorts/{cohort_id}/masked/{client_id}.safetensors"
KEYS_KEY = "cohorts/{cohort_id}/keys/{client_id}.json"
SHARES_KEY = "cohorts/{cohort_id}/shares/{client_id}.json"
UNMASK_KEY = "cohorts/{cohort_id}/unmask/{client_id}.json"
CHECKIN_KEY = "checkins/{client_id}/{nonce}.json"


def signing_key(client: str) -> bytes:
    """A test client's deterministic Ed25519 private key (raw 32 bytes); never for real use."""
    return hashlib.sha256(b"fedcore/hostile-corpus/" + client.encode()).digest()


MALLORY = signing_key("mallory")  # signs what it must not: the wrong-key cases


def cid(n: int) -> str:
    return layout.cohort_id(n)


# -- building blocks -----------------------------------------------------------


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in MODEL.items()}


def update(
    cohort: str, client: str, base: int = 0, *, key: bytes | None = None, **meta: Any
) -> bytes:
    """A well-formed plaintext update, signed by ``client`` (or by ``key``) as a device
    signs one (``sign_update``), so that a rejection is for the reason its entry names."""
    fields = {"num_samples": 10, "loss": 0.5, "mode": "plaintext", **meta}
    signed = sign_update(
        UpdateMeta(cohort, client, base, **fields), tensors(), key or signing_key(client)
    )
    return st(tensors(), signed.to_metadata())


def st(arrays: dict[str, np.ndarray], metadata: dict[str, Any]) -> bytes:
    """A real safetensors file, written here so that it is byte-for-byte reproducible.

    (The ``safetensors`` library keeps ``__metadata__`` in a hash map, so its key
    order, and the bytes, change from one process to the next.)
    """
    names = {np.dtype("<f4"): "F32", np.dtype("<f8"): "F64", np.dtype("<u4"): "U32"}
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    data, offset = b"", 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        raw = a.astype(a.dtype.newbyteorder("<")).tobytes()
        header[name] = {
            "dtype": names[a.dtype.newbyteorder("<")],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data, offset = data + raw, offset + len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # safetensors pads the header to 8 bytes
    return raw_st(head, data)


def raw_st(header: Any, data: bytes, *, length: int | None = None) -> bytes:
    """A safetensors file from a header we write ourselves (so it can be wrong)."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(head) if length is None else length
    return struct.pack("<Q", n) + head + data


def update_meta(cohort: str, client: str, base: int = 0) -> dict[str, str]:
    """The signed metadata of ``client``'s honest update (of ``tensors()``)."""
    meta = UpdateMeta(cohort, client, base, 10, 0.5, "plaintext")
    return sign_update(meta, tensors(), signing_key(client)).to_metadata()


def tiny_header(meta: dict[str, str], **entries: Any) -> dict[str, Any]:
    """The honest header of a TINY update (w then b), with entries overridden or added."""
    head: dict[str, Any] = {
        "__metadata__": meta,
        "w": {"dtype": "F32", "shape": [6, 5], "data_offsets": [0, 120]},
        "b": {"dtype": "F32", "shape": [5], "data_offsets": [120, 140]},
    }
    for name, value in entries.items():
        if value is None:
            head.pop(name)
        else:
            head[name] = value
    return head


def tiny_data() -> bytes:
    t = tensors()
    return t["w"].tobytes() + t["b"].tobytes()


def masked_vec(seed: int = 1, length: int = LENGTH) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**32, size=length, dtype=np.uint32)


def masked(
    cohort: str,
    client: str,
    base: int = 0,
    *,
    key: bytes | None = None,
    vec: np.ndarray | None = None,
    signed_length: int | None = None,
    signed_digest_of: np.ndarray | None = None,
    fmt: str | None = None,
    extra: dict[str, np.ndarray] | None = None,
    meta_none: bool = False,
) -> bytes:
    """A masked upload signed by ``key`` (the member's own unless given), optionally lying."""
    vec = masked_vec() if vec is None else vec
    digest_src = vec if signed_digest_of is None else signed_digest_of
    meta = MaskedMeta(
        cohort,
        client,
        base,
        int(vec.size) if signed_length is None else signed_length,
        hashlib.sha256(digest_src.tobytes()).hexdigest(),
    )
    md = masked_metadata(meta, key or signing_key(client))
    if fmt is not None:
        md["format"] = fmt
    return st({MASKED_TENSOR: vec, **(extra or {})}, {} if meta_none else md)


def signed(doc: dict[str, Any], domain: str, key: bytes) -> bytes:
    return encode_signed(doc, domain=domain, signing_key=key)


def keys_doc(cohort: str, client: str, seed: int = 7) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "cohort_id": cohort,
        "client_id": client,
        "c_pk": crypto.b64(rng.bytes(32)),
        "s_pk": crypto.b64(rng.bytes(32)),
    }


def ciphertext(seed: int, size: int = SHARE_PLAINTEXT_BYTES + 28) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def shares_doc(cohort: str, client: str, receivers: list[str]) -> dict[str, Any]:
    return {
        "cohort_id": cohort,
        "client_id": client,
        "self_commit": hashlib.sha256(client.encode()).hexdigest(),
        "ciphertexts": {r: crypto.b64(ciphertext(i)) for i, r in enumerate(sorted(receivers))},
    }


def unmask_doc(cohort: str, client: str, self_shares: dict, key_shares: dict) -> dict[str, Any]:
    enc = {k: crypto.b64(int(v).to_bytes(66, "big")) for k, v in self_shares.items()}
    return {
        "cohort_id": cohort,
        "client_id": client,
        "self_shares": enc,
        "key_shares": {k: crypto.b64(int(v).to_bytes(66, "big")) for k, v in key_shares.items()},
    }


def checkin(client: str, nonce: str, *, key: bytes | None, **over: Any) -> bytes:
    msg = CheckIn(client, nonce, 1.7e9, "secagg", 0)
    doc = {k: v for k, v in asdict(msg).items() if k != "signature"}
    doc.update(over)
    if key is not None:
        doc["signature"] = crypto.sign(key, DOMAIN_CHECKIN, doc)
    return json.dumps(doc, sort_keys=True).encode()


def device_config(cohort: str, *, base_version: int = 0, **params: Any) -> CohortConfig:
    """The (valid) config of a device-side case: d1..d3, all pairs, pinned identities."""
    secagg = {
        "k": 2,
        "t": 3,  # a strict majority of 3 holders with one colluder (device floor)
        "graph_seed": GRAPH_SEED,
        "clip": 1.0,
        "bits": 30,
        "weight_cap": 100,
        **params,
    }
    return CohortConfig(
        cohort_id=cohort,
        base_version=base_version,
        members={d: "n0001" for d in DEVICES},
        mode=Mode.SECAGG,
        min_members=2,
        created_at=1.7e9,
        phase_s={p.value: 30.0 for p in (Phase.KEYS, Phase.SHARES, Phase.INPUTS, Phase.UNMASK)},
        secagg=SecAggParams(**secagg),
        staleness_weight="inverse_sqrt",
        identities={d: crypto.b64(crypto.ed25519_public(signing_key(d))) for d in DEVICES},
    )


def manifest_doc(cohort: str, phase: str, who: list[str], **over: Any) -> bytes:
    m = Manifest(cohort, phase, who, {c: '"etag"' for c in who}, "all-members", 1.7e9)
    doc = {**asdict(m), **over}
    return json.dumps(doc, sort_keys=True).encode()


# -- the corpus ----------------------------------------------------------------


@dataclass
class Entry:
    """One hostile file and what must happen to it."""

    file: str
    boundary: str
    expect: str
    body: bytes
    role: str  # replace | add | checkin | stray | event | device
    phase: str = ""  # the member's round it replaces (replace), or what reads it (device)
    key_template: str = ""
    client_id: str = ""
    nonce: str = ""
    reader: str = ""  # device entries: which device call reads it
    group: str = ""
    cohort_id: str = ""
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def plaintext_updates(c: str, me: str) -> Iterator[Entry]:
    """Placed in member ``me``'s plaintext slot of cohort ``c`` (base version 0)."""
    b, meta = "plaintext update", update_meta(c, me)

    def e(name: str, expect: str, body: bytes) -> Entry:
        return Entry(f"plain/{name}.safetensors", b, expect, body, "replace", "inputs", PLAIN_KEY)

    good = update(c, me)
    yield e("truncated-no-length", "no header length", good[:5])
    yield e("truncated-in-header", "bytes but object has", good[:40])
    yield e("truncated-in-data", "do not match shape", good[:-12])
    yield e(
        "header-length-exceeds-object",
        "header claims 9000 bytes but object has",
        raw_st(tiny_header(meta), tiny_data(), length=9000),
    )
    yield e(
        "header-length-huge",
        "header claims 4611686018427387904 bytes, limit",
        raw_st(b"{}", b"", length=2**62),
    )
    yield e("header-not-json", "header is not JSON", raw_st(b"{not json", tiny_data()))
    yield e("header-not-utf8", "header is not JSON (UTF-8)", raw_st(b'{"\xff\xfe": 1}', b""))
    yield e("header-not-object", "header is not a JSON object", raw_st(b"[1, 2, 3]", b""))
    dup = (
        json.dumps(tiny_header(meta))[:-1]
        + ', "w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 20]}}'
    )
    yield e("header-duplicate-names", "duplicate name 'w'", raw_st(dup.encode(), tiny_data()))
    yield e(
        "offsets-overlap",
        "overlaps or leaves gaps",
        raw_st(
            tiny_header(meta, b={"dtype": "F32", "shape": [5], "data_offsets": [100, 120]}),
            tiny_data()[:120],
        ),
    )
    yield e(
        "offsets-out-of-range",
        "do not match shape",
        raw_st(
            tiny_header(meta, b={"dtype": "F32", "shape": [5], "data_offsets": [140, 160]}),
            tiny_data(),
        ),
    )
    yield e(
        "offsets-not-covering",
        "16 trailing bytes after tensor data",
        raw_st(tiny_header(meta), tiny_data() + bytes(16)),
    )
    yield e(
        "offsets-not-integers",
        "invalid data_offsets",
        raw_st(
            tiny_header(meta, b={"dtype": "F32", "shape": [5], "data_offsets": ["120", 140]}),
            tiny_data(),
        ),
    )
    yield e(
        "tensor-entry-malformed",
        "tensor 'b' entry malformed",
        raw_st(
            tiny_header(meta, b={"dtype": "F32", "shape": [5], "data_offsets": [120, 140], "x": 1}),
            tiny_data(),
        ),
    )
    yield e(
        "shape-negative",
        "invalid shape",
        raw_st(
            tiny_header(meta, b={"dtype": "F32", "shape": [-5], "data_offsets": [120, 140]}),
            tiny_data(),
        ),
    )
    yield e(
        "metadata-not-strings",
        "__metadata__ must map strings to strings",
        raw_st(tiny_header({"format": 1}), tiny_data()),
    )
    t = tensors()
    yield e(
        "dtype-float64",
        "tensor 'b' is F64[5], expected F32[5]",
        st({"w": t["w"], "b": t["b"].astype(np.float64)}, meta),
    )
    yield e(
        "dtype-not-string",
        "unsupported dtype ['F32']",
        raw_st(
            tiny_header(meta, b={"dtype": ["F32"], "shape": [5], "data_offsets": [120, 140]}),
            tiny_data(),
        ),
    )
    yield e(
        "dtype-int32",
        "unsupported dtype 'I32'",
        raw_st(
            tiny_header(meta, b={"dtype": "I32", "shape": [5], "data_offsets": [120, 140]}),
            tiny_data(),
        ),
    )
    yield e(
        "wrong-shape",
        "tensor 'w' is F32[5, 6], expected F32[6, 5]",
        st({"w": t["w"].reshape(5, 6), "b": t["b"]}, meta),
    )
    yield e(
        "extra-tensor",
        "unexpected ['extra']",
        st({**t, "extra": np.zeros(3, np.float32)}, meta),
    )
    yield e("missing-tensor", "missing ['b'], unexpected []", st({"w": t["w"]}, meta))
    yield e(
        "renamed-tensor",
        "missing ['b'], unexpected ['bias']",
        st({"w": t["w"], "bias": t["b"]}, meta),
    )
    nan = {"w": t["w"].copy(), "b": t["b"]}
    nan["w"][2, 3] = np.nan
    yield e("nan", "contains NaN or infinity (1 NaN, 0 +inf, 0 -inf)", st(nan, meta))
    inf = {"w": t["w"], "b": t["b"].copy()}
    inf["b"][1] = np.inf
    yield e("inf", "contains NaN or infinity (0 NaN, 1 +inf, 0 -inf)", st(inf, meta))
    yield e(
        "meta-other-cohort",
        "metadata names cohort 'c00000042' (replayed or misplaced)",
        update("c00000042", me),
    )
    yield e("meta-other-client", "metadata names client 'ok1'", update(c, "ok1"))
    yield e("meta-other-base-version", "base version 7, cohort's is 0", update(c, me, 7))
    yield e("meta-missing", "format is None, expected 'fedcore.update.v1'", st(t, {}))
    yield e(
        "meta-format-v2",
        "format is 'fedcore.update.v2'",
        st(t, {**meta, "format": "fedcore.update.v2"}),
    )
    yield e(
        "meta-not-json",
        "metadata 'fedcore' is not JSON",
        st(t, {**meta, "fedcore": "{'a': 1"}),
    )
    yield e(
        "meta-duplicate-field",
        "metadata 'fedcore' has duplicate name 'client_id'",
        st(t, {**meta, "fedcore": meta["fedcore"][:-1] + ', "client_id": "ok1"}'}),
    )
    yield e(
        "meta-huge-num-samples",
        "num_samples 1000000000000 out of range",
        update(c, me, num_samples=10**12),
    )
    yield e("meta-mode-lie", "mode 'secagg', cohort's is 'plaintext'", update(c, me, mode="secagg"))
    # The signed digest (issue 13 item 4): as for masked uploads.
    unsigned = UpdateMeta(c, me, 0, 10, 0.5, "plaintext").to_metadata()
    yield e("unsigned", "unsigned plaintext update (no digest or signature)", st(t, unsigned))
    yield e("signed-by-another-key", "bad signature", update(c, me, key=MALLORY))
    doc = json.loads(meta["fedcore"])
    yield e(
        "samples-raised-after-signing",
        "bad signature",
        st(t, {**meta, "fedcore": json.dumps({**doc, "num_samples": 100}, sort_keys=True)}),
    )
    flipped = {"w": t["w"].copy(), "b": t["b"]}
    flipped["w"].view(np.uint32)[0, 0] ^= 1  # one bit of the first float
    yield e(
        "bit-flipped-after-signing",
        "does not match its signed digest (tampered)",
        st(flipped, meta),
    )
    permuted = {"w": t["w"], "b": t["b"][::-1].copy()}
    yield e("values-permuted-after-signing", "does not match its signed digest", st(permuted, meta))
    yield e(
        "digest-not-string",
        "digest must be a string",
        st(t, {**meta, "fedcore": json.dumps({**doc, "digest": 7}, sort_keys=True)}),
    )
    yield e(
        "masked-vector-in-plain-slot", "missing ['b', 'w'], unexpected ['masked']", masked(c, me)
    )
    pad = {**meta, "padding": " " * (UPDATE_HEADER_ALLOWANCE + 1024)}
    yield e("oversized", "-byte cap for this phase (not downloaded)", st(t, pad))


def checkins() -> Iterator[Entry]:
    b = "check-in"

    def e(name: str, client: str, expect: str, body: bytes, **extra: Any) -> Entry:
        return Entry(
            f"checkin/{name}.json",
            b,
            expect,
            body,
            "checkin",
            "checkin",
            CHECKIN_KEY,
            client,
            "n0001",
            extra=extra,
        )

    yield e("not-json", "q1", "message is not JSON", b'{"client_id": "q1", ')
    yield e(
        "wrong-types",
        "q2",
        "field 'created_at' must be",
        checkin("q2", "n0001", key=None, created_at="yesterday"),
    )
    body = json.loads(checkin("q3", "n0001", key=None))
    del body["nonce"]
    yield e("missing-field", "q3", "missing field 'nonce'", json.dumps(body).encode())
    yield e(
        "names-other-client",
        "q4",
        "body names ok1/n0001",
        checkin("ok1", "n0001", key=signing_key("ok1")),
    )
    yield e(
        "mode-plaintext",
        "q5",
        "mode 'plaintext' but the server runs 'secagg'",
        checkin("q5", "n0001", key=signing_key("q5"), mode="plaintext"),
    )
    yield e(
        "bad-signature", "q6", "bad signature", checkin("q6", "n0001", key=MALLORY), enroll=True
    )
    yield e(
        "not-enrolled",
        "q7",
        "q7 has no enrolled identity",
        checkin("q7", "n0001", key=signing_key("q7")),
    )
    yield e(
        "huge-number",
        "q8",
        "field 'last_version' is out of range",
        checkin("q8", "n0001", key=signing_key("q8"), last_version=2**80),
    )
    yield e("bad-client-id", "q9", "invalid client id", checkin("q9/../ok1", "n0001", key=None))
    yield e(
        "unknown-mode",
        "q10",
        "unknown mode 'turbo'",
        checkin("q10", "n0001", key=None, mode="turbo"),
    )
    yield e(
        "signature-not-base64",
        "q11",
        "signature is not valid base64",
        checkin("q11", "n0001", key=None, signature="!!not base64!!"),
        enroll=True,
    )


def key_messages(c: str, me: str) -> Iterator[Entry]:
    b = "key message (round 1)"

    def e(name: str, expect: str, body: bytes) -> Entry:
        return Entry(f"keys/{name}.json", b, expect, body, "replace", "keys", KEYS_KEY)

    mine = signing_key(me)
    yield e("bad-signature", "bad signature", signed(keys_doc(c, me), DOMAIN_KEYS, MALLORY))
    yield e("not-json", "message is not JSON", b'{"cohort_id": "' + c.encode() + b'", "c_pk": ')
    yield e("not-utf8", "message is not JSON (UTF-8)", b"\xff\xfe{}")
    yield e("not-object", "message is not a JSON object", b'["keys"]')
    dup = signed(keys_doc(c, me), DOMAIN_KEYS, mine)[:-1] + b',"c_pk":"AAAA"}'
    yield e("duplicate-field", "message has duplicate name 'c_pk'", dup)
    doc = keys_doc(c, me)
    del doc["s_pk"]
    yield e("missing-field", "s_pk is not a base64 string", signed(doc, DOMAIN_KEYS, mine))
    yield e(
        "wrong-type",
        "c_pk is not a base64 string",
        signed({**keys_doc(c, me), "c_pk": [1, 2]}, DOMAIN_KEYS, mine),
    )
    yield e(
        "short-key",
        "c_pk has 16 bytes, expected 32",
        signed({**keys_doc(c, me), "c_pk": crypto.b64(bytes(16))}, DOMAIN_KEYS, mine),
    )
    same = keys_doc(c, me)
    same["s_pk"] = same["c_pk"]
    yield e("equal-keys", "the two advertised keys must differ", signed(same, DOMAIN_KEYS, mine))
    yield e(
        "replay-other-cohort",
        f"names c00000042/{me}, expected",
        signed(keys_doc("c00000042", me), DOMAIN_KEYS, mine),
    )
    yield e(
        "other-client",
        "names " + c + "/ok1, expected",
        encode_keys(KeysMsg(c, "ok1", bytes(range(32)), bytes(range(1, 33))), signing_key("ok1")),
    )
    huge = b'{"cohort_id": "%s", "client_id": "%s", "n": %s}' % (
        c.encode(),
        me.encode(),
        b"9" * 5000,
    )
    yield e("huge-integer", "Exceeds the limit (4300 digits)", huge)
    yield e(
        "deep-nesting", "message is nested too deeply", b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    )
    yield e(
        "signature-wrong-size",
        "signature has 32 bytes, expected 64",
        json.dumps({**keys_doc(c, me), "signature": crypto.b64(bytes(32))}).encode(),
    )


def share_messages(c: str, me: str, receivers: list[str]) -> Iterator[Entry]:
    """``receivers``: whom an honest ``me`` must address (its neighbours in U1)."""
    b = "share message (round 2)"

    def e(name: str, expect: str, body: bytes) -> Entry:
        return Entry(f"shares/{name}.json", b, expect, body, "replace", "shares", SHARES_KEY)

    mine = signing_key(me)
    good = shares_doc(c, me, receivers)
    yield e("bad-signature", "bad signature", signed(good, DOMAIN_SHARES, MALLORY))
    yield e(
        "wrong-receivers",
        "shares addressed to ['ok1', 'zz'], expected",
        signed(shares_doc(c, me, ["ok1", "zz"]), DOMAIN_SHARES, mine),
    )
    yield e(
        "bad-commit",
        "self_commit must be a sha256 hex digest",
        signed({**good, "self_commit": "abc"}, DOMAIN_SHARES, mine),
    )
    short = {**good, "ciphertexts": {r: crypto.b64(ciphertext(1, 100)) for r in receivers}}
    yield e("ciphertext-size", "has 100 bytes", signed(short, DOMAIN_SHARES, mine))
    yield e(
        "ciphertexts-not-object",
        "ciphertexts must be an object",
        signed({**good, "ciphertexts": ["ok1"]}, DOMAIN_SHARES, mine),
    )
    yield e(
        "receiver-bad-id",
        "invalid receiver '../ok1'",
        signed({**good, "ciphertexts": {"../ok1": crypto.b64(ciphertext(2))}}, DOMAIN_SHARES, mine),
    )
    yield e(
        "ciphertext-not-base64",
        "is not valid base64",
        signed({**good, "ciphertexts": {r: "%%%" for r in receivers}}, DOMAIN_SHARES, mine),
    )
    yield e(
        "replay-other-cohort",
        f"names c00000042/{me}, expected",
        signed(shares_doc("c00000042", me, receivers), DOMAIN_SHARES, mine),
    )


def masked_uploads(c: str, me: str, base: int) -> Iterator[Entry]:
    b = "masked update (round 3)"

    def e(name: str, expect: str, body: bytes, role: str = "replace") -> Entry:
        return Entry(f"masked/{name}.safetensors", b, expect, body, role, "inputs", MASKED_KEY)

    yield e("bad-signature", "bad signature", masked(c, me, base, key=MALLORY))
    yield e(
        "dtype-float32",
        "tensor 'masked' is F32[36], expected U32[36]",
        st({MASKED_TENSOR: masked_vec().astype(np.float32)}, {}),
    )
    yield e(
        "wrong-length",
        "tensor 'masked' is U32[35], expected U32[36]",
        masked(c, me, base, vec=masked_vec(length=35)),
    )
    yield e(
        "tampered",
        "data does not match its signed digest (tampered)",
        masked(c, me, base, signed_digest_of=masked_vec(seed=2)),
    )
    yield e("signed-other-base", "signed for base 5/length 36", masked(c, me, 5))
    yield e(
        "signed-other-length",
        f"signed for base {base}/length 40",
        masked(c, me, base, signed_length=40),
    )
    yield e(
        "no-metadata",
        "format None, expected 'fedcore.masked.v1'",
        masked(c, me, base, meta_none=True),
    )
    yield e(
        "format-v2",
        "format 'fedcore.masked.v2', expected",
        masked(c, me, base, fmt="fedcore.masked.v2"),
    )
    yield e(
        "extra-tensor",
        "unexpected ['extra']",
        masked(c, me, base, extra={"extra": np.zeros(2, np.uint32)}),
    )
    yield e(
        "plaintext-in-masked-slot", "missing ['masked'], unexpected ['b', 'w']", update(c, me, base)
    )
    yield e(
        "oversized",
        "-byte cap for this phase (not downloaded)",
        st({MASKED_TENSOR: masked_vec(), "pad": np.zeros(5000, np.uint32)}, {}),
    )


def unmask_messages(c: str, me: str) -> Iterator[Entry]:
    b = "reveal message (round 4)"

    def e(name: str, expect: str, body: bytes) -> Entry:
        return Entry(f"unmask/{name}.json", b, expect, body, "replace", "unmask", UNMASK_KEY)

    mine = signing_key(me)
    yield e(
        "bad-signature", "bad signature", encode_unmask(UnmaskMsg(c, me, {"ok1": 5}, {}), MALLORY)
    )
    yield e(
        "key-share-for-survivor",
        "key shares for members that are not dropouts ['ok1']",
        encode_unmask(UnmaskMsg(c, me, {}, {"ok1": 5}), mine),
    )
    yield e(
        "self-share-for-stranger",
        "self-mask shares for non-survivors ['zz']",
        encode_unmask(UnmaskMsg(c, me, {"zz": 5}, {}), mine),
    )
    yield e(
        "both-kinds",
        "reveals both kinds of share for ['ok1']",
        encode_unmask(UnmaskMsg(c, me, {"ok1": 5}, {"ok1": 6}), mine),
    )
    bad = unmask_doc(c, me, {}, {})
    bad["self_shares"] = {"ok1": crypto.b64(bytes(10))}
    yield e("share-wrong-size", "has 10 bytes, expected 66", signed(bad, DOMAIN_UNMASK, mine))
    out = unmask_doc(c, me, {}, {})
    out["self_shares"] = {"ok1": crypto.b64(b"\xff" * 66)}
    yield e("share-out-of-field", "share is out of the field", signed(out, DOMAIN_UNMASK, mine))
    yield e(
        "shares-not-object",
        "self_shares must be an object",
        signed({**unmask_doc(c, me, {}, {}), "self_shares": [1]}, DOMAIN_UNMASK, mine),
    )
    yield e(
        "replay-other-cohort",
        f"names c00000042/{me}, expected",
        encode_unmask(UnmaskMsg("c00000042", me, {"ok1": 5}, {}), mine),
    )
    yield e(
        "other-input-set",  # an equivocating server showed this member another U3
        "reveal made for another input set",
        encode_unmask(UnmaskMsg(c, me, {"ok1": 5}, {}, ("ok1",)), mine),
    )


def strays(c: str) -> Iterator[Entry]:
    """Objects that are not in the layout, or in the wrong place, under watched prefixes."""

    def e(name: str, key: str, expect: str, body: bytes = b"hostile") -> Entry:
        return Entry(
            f"stray/{name}.bin",
            "unknown key under a watched prefix",
            expect,
            body,
            "stray",
            key_template=key,
        )

    yield e("unknown-folder", f"cohorts/{c}/evil/x.txt", "not a key of the bucket layout")
    yield e("wrong-suffix", f"cohorts/{c}/plain/ok9.json", "not a key of the bucket layout")
    yield e("unknown-phase", f"cohorts/{c}/state/bogus.json", "unknown phase 'bogus'")
    yield e("checkin-without-client", "checkins/loose.json", "not a key of the bucket layout")
    yield e("bad-cohort-id", "cohorts/c1/config.json", "not a key of the bucket layout")
    yield e(
        "hidden-client-id", f"cohorts/{c}/plain/.x.safetensors", "not a key of the bucket layout"
    )
    yield e(
        "masked-in-plaintext-cohort",
        f"cohorts/{c}/masked/ok1.safetensors",
        "masked objects are not used in plaintext mode",
        masked(c, "ok1"),
    )
    yield e(
        "keys-in-plaintext-cohort",
        f"cohorts/{c}/keys/ok1.json",
        "keys objects are not used in plaintext mode",
        encode_keys(KeysMsg(c, "ok1", bytes(32), bytes(range(32))), signing_key("ok1")),
    )
    yield e(
        "cohort-without-config",
        "cohorts/c00000077/plain/ok1.safetensors",
        "c00000077/config.json",
        update("c00000077", "ok1"),
    )
    yield Entry(
        "stray/non-member-update.safetensors",
        "plaintext update",
        "zz is not a member of",
        update(c, "zz"),
        "add",
        "inputs",
        PLAIN_KEY,
        "zz",
    )


def events(c: str) -> Iterator[Entry]:
    """Malformed S3 notifications, delivered straight to the aggregation handler."""
    good = f"cohorts/{c}/plain/ok1.safetensors"
    encoded = good.replace("/", "%2F")

    def rec(key: Any = encoded, **over: Any) -> dict[str, Any]:
        r: dict[str, Any] = {
            "eventVersion": "2.1",
            "eventSource": "aws:s3",
            "awsRegion": "us-east-1",
            "eventTime": "2026-01-01T00:00:00.000Z",
            "eventName": "ObjectCreated:Put",
            "s3": {
                "s3SchemaVersion": "1.0",
                "bucket": {"name": BUCKET_TOKEN, "arn": f"arn:aws:s3:::{BUCKET_TOKEN}"},
                "object": {"key": key, "size": 100, "eTag": "0" * 32, "sequencer": "0A"},
            },
        }
        for path, value in over.items():
            *parents, last = path.split(".")
            node = r
            for p in parents:
                node = node[p]
            if value is _DELETE:
                del node[last]
            else:
                node[last] = value
        return r

    def e(name: str, expect: str, event: Any, key: str = "") -> Entry:
        body = json.dumps(event, sort_keys=True, indent=1).encode()
        return Entry(
            f"event/{name}.json", "S3 event record", expect, body, "event", key_template=key
        )

    yield e("not-s3-notification", "not an S3 notification", {"detail-type": "Scheduled Event"})
    yield e("records-not-list", "not an S3 notification", {"Records": {"0": rec()}})
    yield e("record-not-object", "record 0: not an object", {"Records": ["ObjectCreated:Put"]})
    yield e(
        "source-sqs",
        "eventSource 'aws:sqs' is not aws:s3",
        {"Records": [rec(eventSource="aws:sqs")]},
    )
    yield e(
        "missing-key",
        "missing or wrong-typed field KeyError('key')",
        {"Records": [rec(**{"s3.object.key": _DELETE})]},
    )
    yield e(
        "missing-bucket",
        "missing or wrong-typed field KeyError('bucket')",
        {"Records": [rec(**{"s3.bucket": _DELETE})]},
    )
    yield e(
        "object-removed",
        "'ObjectRemoved:Delete' is not an ObjectCreated event",
        {"Records": [rec(eventName="ObjectRemoved:Delete")]},
        good,
    )
    yield e(
        "wrong-bucket",
        "for bucket 'someone-elses-bucket'",
        {"Records": [rec(**{"s3.bucket.name": "someone-elses-bucket"})]},
        good,
    )
    yield e(
        "bad-percent-escape",
        "bad URL-encoding",
        {"Records": [rec(key=f"cohorts%2F{c}%2Fplain%2Fok1%G1.safetensors")]},
    )
    yield e(
        "not-utf8-escape",
        "is not URL-encoded UTF-8",
        {"Records": [rec(key=f"cohorts%2F{c}%2Fplain%2F%FF%FE.safetensors")]},
    )
    yield e(
        "path-traversal",
        "not a key of the bucket layout",
        {"Records": [rec(key=f"cohorts%2F{c}%2Fplain%2F..%2F..%2F..%2Fglobal%2Flatest.json")]},
        f"cohorts/{c}/plain/../../../global/latest.json",
    )
    yield e(
        "size-not-integer",
        "object size 'huge' is not a non-negative integer",
        {"Records": [rec(**{"s3.object.size": "huge"})]},
    )
    yield e(
        "key-not-string",
        "eventName, bucket name and key must be strings",
        {"Records": [rec(key=12345)]},
    )
    yield e(
        "key-too-long",
        "key of 2000 bytes (S3 allows 1 to 1024)",
        {"Records": [rec(key="a" * 2000)]},
    )


class _Delete:
    pass


_DELETE = _Delete()


def device_entries() -> Iterator[Entry]:
    """Objects a device reads: cohort configs, manifests, a neighbour's shares, models, the pointer."""
    n = 0

    def nxt() -> str:
        nonlocal n
        n += 1
        return cid(n)

    def e(
        name: str,
        boundary: str,
        reader: str,
        expect: str,
        body: bytes,
        key: str,
        cohort: str,
        **extra: Any,
    ) -> Entry:
        return Entry(
            f"device/{name}",
            boundary,
            expect,
            body,
            "device",
            reader=reader,
            key_template=key,
            cohort_id=cohort,
            extra=extra,
        )

    cfg_key = "cohorts/{cohort_id}/config.json"

    def config(**over: Any) -> bytes:
        doc = device_config("COHORT").to_doc()
        doc.update(over)
        return json.dumps(doc, sort_keys=True).encode()

    def cfg_entry(name: str, expect: str, body_of: Any, reader: str = "find_cohort") -> Entry:
        c = nxt()
        return e(
            f"config-{name}.json",
            "cohort config read by device",
            reader,
            expect,
            body_of(c),
            cfg_key,
            c,
        )

    def fix(over: dict[str, Any]) -> Any:
        return lambda c: config(**over).replace(b'"COHORT"', json.dumps(c).encode())

    yield cfg_entry("not-json", "message is not JSON", lambda c: b'{"cohort_id": "' + c.encode())
    yield cfg_entry("members-not-object", "field 'members' must be", fix({"members": ["d1", "d2"]}))
    yield cfg_entry(
        "base-version-string", "field 'base_version' must be", fix({"base_version": "0"})
    )
    yield cfg_entry("base-version-negative", "negative base_version -3", fix({"base_version": -3}))
    yield cfg_entry("min-members-zero", "min_members 0 invalid", fix({"min_members": 0}))
    yield cfg_entry("params-not-object", "params must be an object", fix({"params": 5}))
    yield cfg_entry(
        "huge-number", "field 'created_at' is out of range", fix({"created_at": 10**30})
    )
    yield cfg_entry(
        "identities-not-strings",
        "identities must map member ids to base64 strings",
        fix({"identities": {"d1": 1}}),
    )
    yield cfg_entry(
        "phase-time-negative", "bad phase time limit 'keys'", fix({"phase_s": {"keys": -1}})
    )
    yield cfg_entry("unknown-mode", "unknown mode 'fast'", fix({"mode": "fast"}))
    yield cfg_entry("server-lr-zero", "server_lr 0.0 must be positive", fix({"server_lr": 0}))
    p = device_config("COHORT").to_doc()["params"]
    yield cfg_entry(
        "secagg-k-too-large",
        "invalid secagg parameters",
        fix({"params": {**p, "secagg": {**p["secagg"], "k": 99}}}),
        "find_cohort",
    )
    yield cfg_entry(
        "secagg-k-infinite",
        "bad secagg parameters",
        lambda c: fix({})(c).replace(b'"k": 2', b'"k": Infinity'),
        "find_cohort",
    )
    yield cfg_entry(
        "secagg-params-missing", "bad secagg parameters", fix({"params": {}}), "find_cohort"
    )
    yield cfg_entry(
        "device-not-member",
        "d1 is not a member",
        fix(
            {
                "members": {"d2": "n0001", "d3": "n0001", "d4": "n0001"},
                "identities": {},
                "min_members": 3,
                "params": {**p, "secagg": {**p["secagg"], "k": 2, "t": 3}},
            }
        ),
        "run_secure_cohort",
    )

    man_key = "cohorts/{cohort_id}/state/keys.json"

    def man_entry(name: str, expect: str, body_of: Any) -> Entry:
        c = nxt()
        return e(
            f"manifest-{name}.json",
            "phase manifest read by device",
            "run_secure_cohort",
            expect,
            body_of(c),
            man_key,
            c,
        )

    yield man_entry(
        "non-member",
        "manifest names non-members ['ghost']",
        lambda c: manifest_doc(c, "keys", ["d1", "d2", "ghost"]),
    )
    yield man_entry(
        "other-cohort",
        "manifest names c00000077/keys, expected",
        lambda c: manifest_doc("c00000077", "keys", DEVICES),
    )
    yield man_entry(
        "wrong-phase", "/inputs, expected", lambda c: manifest_doc(c, "inputs", DEVICES)
    )
    yield man_entry(
        "unknown-phase", "unknown phase 'kees'", lambda c: manifest_doc(c, "kees", DEVICES)
    )
    yield man_entry("not-json", "message is not JSON", lambda c: b"<html>503 Slow Down</html>")
    yield man_entry(
        "members-not-list",
        "field 'members' must be",
        lambda c: manifest_doc(c, "keys", DEVICES, members="d1,d2,d3"),
    )
    yield man_entry(
        "member-bad-id", "invalid member", lambda c: manifest_doc(c, "keys", ["d1", "d2", "../d3"])
    )
    yield man_entry(
        "without-me", "not counted in keys", lambda c: manifest_doc(c, "keys", ["d2", "d3"])
    )

    shares_key = "cohorts/{cohort_id}/shares/d2.json"

    def share_entry(name: str, expect: str, body_of: Any) -> Entry:
        c = nxt()
        return e(
            f"share-{name}.json",
            "neighbour's share message read by device",
            "unmask",
            expect,
            body_of(c),
            shares_key,
            c,
        )

    yield share_entry(
        "addressed-to-another",
        "no share addressed to d1",
        lambda c: encode_shares(
            SharesMsg(c, "d2", "0" * 64, {"d3": ciphertext(3)}), signing_key("d2")
        ),
    )
    yield share_entry(
        "undecryptable",
        "d2->d1 in {c}: authentication failed",
        lambda c: encode_shares(
            SharesMsg(c, "d2", "0" * 64, {"d1": ciphertext(4), "d3": ciphertext(5)}),
            signing_key("d2"),
        ),
    )
    yield share_entry(
        "names-other-sender",
        "names " + "{c}" + "/d3, expected",
        lambda c: encode_shares(
            SharesMsg(c, "d3", "0" * 64, {"d1": ciphertext(4)}), signing_key("d3")
        ),
    )
    yield share_entry(
        "ciphertext-size",
        "ciphertext for d1 has 50 bytes",
        lambda c: encode_shares(
            SharesMsg(c, "d2", "0" * 64, {"d1": ciphertext(4, 50)}), signing_key("d2")
        ),
    )
    yield share_entry("not-json", "message is not JSON", lambda c: b"\x00\x01\x02")

    def model_entry(name: str, expect: str, body_of: Any) -> Entry:
        c = nxt()
        version = int(c[1:])
        return e(
            f"model-{name}.safetensors",
            "model version read by device",
            "run_secure_cohort",
            expect,
            body_of(version),
            layout.model_key(version),
            c,
            base_version=version,
        )

    def model(version: int, **over: Any) -> bytes:
        return st(tensors(), ModelMeta(version=version, parent=version - 1, **over).to_metadata())

    yield model_entry("truncated", "do not match shape", lambda v: model(v)[:-7])
    yield model_entry(
        "version-lie", "metadata says version 1", lambda v: model(1) if v != 1 else model(2)
    )
    yield model_entry(
        "float64",
        "expected float32",
        lambda v: st(
            {"w": tensors()["w"].astype(np.float64), "b": tensors()["b"]},
            ModelMeta(version=v, parent=v - 1).to_metadata(),
        ),
    )
    yield model_entry("header-not-json", "header is not JSON", lambda v: raw_st(b"{]", b""))
    yield model_entry(
        "metadata-cohorts-not-list",
        "cohorts and members must be lists of strings",
        lambda v: st(
            tensors(),
            {
                "format": "fedcore.model.v1",
                "fedcore": json.dumps({"version": v, "parent": v - 1, "cohorts": "c00000001"}),
            },
        ),
    )

    def ptr(name: str, expect: str, body: bytes) -> Entry:
        return e(
            f"pointer-{name}.json",
            "global pointer read by device",
            "poll_latest",
            expect,
            body,
            layout.LATEST_KEY,
            "",
        )

    yield ptr("not-json", "message is not JSON", b"version=3")
    yield ptr(
        "negative-version",
        "negative version",
        b'{"version": -1, "key": "x", "sha256": "", "updated_at": 0}',
    )
    yield ptr(
        "version-string",
        "field 'version' must be",
        b'{"version": "3", "key": "x", "sha256": "", "updated_at": 0}',
    )


# -- planning: which cohort each entry goes into ------------------------------------

Maker = Callable[[str, str, int], Iterator[Entry]]  # (cohort id, client, base version)


def _names(make: Maker) -> list[str]:
    return [e.file for e in make(cid(1), "x1", 0)]


def _make(make: Maker, name: str, *, cohort: str, client: str, base: int, group: str) -> Entry:
    """Entry ``name`` written for a concrete cohort, client and base (signatures depend on them)."""
    for entry in make(cohort, client, base):
        if entry.file == name:
            entry.group, entry.cohort_id = group, cohort
            entry.client_id = entry.client_id or client
            entry.key = entry.key_template.format(
                cohort_id=cohort, client_id=entry.client_id, nonce=entry.nonce
            )
            return entry
    raise KeyError(name)


def plan() -> tuple[dict[str, Any], list[Entry]]:
    """Groups (one fresh bucket each) of planned cohorts, and every entry placed in one.

    Hostile members of a cohort each get one ``replace`` entry; ``add``, ``stray``,
    ``checkin`` and ``event`` entries ride along without taking a member's slot.
    """
    groups: dict[str, Any] = {}
    out: list[Entry] = []

    def packed(
        prefix: str,
        mode: str,
        make: Maker,
        names: list[str],
        hostile: list[str],
        honest: list[str],
        cohorts: int = 1,
        riders: list[Entry] | None = None,
    ) -> None:
        per = len(hostile) * cohorts
        riders = list(riders or [])
        for gi in range(0, len(names), per):
            name = f"{prefix}-{gi // per + 1}"
            groups[name] = {
                "mode": mode,
                "cohorts": [
                    {"cohort_id": cid(i + 1), "base_version": i, "honest": honest}
                    for i in range(cohorts)
                ],
            }
            for j, fname in enumerate(names[gi : gi + per]):
                ci, slot = divmod(j, len(hostile))
                out.append(
                    _make(
                        make, fname, cohort=cid(ci + 1), client=hostile[slot], base=ci, group=name
                    )
                )
            for _ in range(3):
                if riders:
                    r = riders.pop(0)
                    r.group, r.cohort_id = name, cid(1)
                    r.key = r.key_template.format(
                        cohort_id=cid(1), client_id=r.client_id, nonce=r.nonce
                    )
                    out.append(r)
        assert not riders, "more riders than groups"

    # Plaintext updates: 6 hostile members beside 2 honest ones per cohort.
    plain: Maker = lambda c, me, base: plaintext_updates(c, me)  # noqa: E731
    packed("plain", "plaintext", plain, _names(plain), [f"x{i}" for i in range(1, 7)], PLAIN_HONEST)
    # A replay: x1's update to c00000001 (accepted there) re-sent into c00000002.
    name = "plain-replay"
    groups[name] = {
        "mode": "plaintext",
        "cohorts": [
            {
                "cohort_id": cid(1),
                "base_version": 0,
                "honest": PLAIN_HONEST,
                "valid": {"x1": "plain/replay-older-cohort.safetensors"},
            },
            {"cohort_id": cid(2), "base_version": 1, "honest": PLAIN_HONEST},
        ],
    }
    replay = Entry(
        "plain/replay-older-cohort.safetensors",
        "plaintext update",
        "metadata names cohort 'c00000001' (replayed or misplaced)",
        update(cid(1), "x1"),
        "replace",
        "inputs",
        PLAIN_KEY,
    )
    out.append(
        _make(
            lambda c, me, b: iter([replay]),
            replay.file,
            cohort=cid(2),
            client="x1",
            base=1,
            group=name,
        )
    )
    # Strays, a non-member's upload and malformed events around an honest plaintext cohort.
    name = "stray"
    groups[name] = {
        "mode": "plaintext",
        "cohorts": [{"cohort_id": cid(1), "base_version": 0, "honest": ["ok1", "ok2", "ok3"]}],
    }
    for entry in [*strays(cid(1)), *events(cid(1))]:
        entry.group, entry.cohort_id = name, cid(1)
        entry.key = entry.key or entry.key_template.format(
            cohort_id=cid(1), client_id=entry.client_id
        )
        out.append(entry)

    # Secure aggregation: 5 honest members and 4 hostile ones per cohort (n = 9, k = 8,
    # t = 5): the honest alone still hold t shares of every secret.
    hostile = ["x1", "x2", "x3", "x4"]
    members = [*SECAGG_HONEST, *hostile]
    ck = list(checkins())

    def keys(c: str, me: str, base: int) -> Iterator[Entry]:
        return key_messages(c, me)

    def shares(c: str, me: str, base: int) -> Iterator[Entry]:
        return share_messages(c, me, [m for m in members if m != me])

    def inputs(c: str, me: str, base: int) -> Iterator[Entry]:
        yield from masked_uploads(c, me, base)
        yield Entry(
            "masked/replay-older-cohort.safetensors",
            "masked update (round 3)",
            f"names c00000001/{me}, expected {c}/{me} (replayed or misplaced)",
            masked(cid(1), me, 0, vec=masked_vec(seed=9)),
            "replace",
            "inputs",
            MASKED_KEY,
        )

    def reveals(c: str, me: str, base: int) -> Iterator[Entry]:
        return unmask_messages(c, me)

    packed("secagg-keys", "secagg", keys, _names(keys), hostile, SECAGG_HONEST, riders=ck)
    packed("secagg-shares", "secagg", shares, _names(shares), hostile, SECAGG_HONEST)
    masked_names = _names(inputs)
    replay_name = "masked/replay-older-cohort.safetensors"
    masked_names.remove(replay_name)
    # The replay goes into the second cohort of its group, after c00000001 was applied.
    n_first = len(masked_names) - len(masked_names) % len(hostile) or len(hostile)
    packed("secagg-inputs", "secagg", inputs, masked_names[:n_first], hostile, SECAGG_HONEST)
    rest = masked_names[n_first:]
    name = "secagg-replay"
    groups[name] = {
        "mode": "secagg",
        "cohorts": [
            {"cohort_id": cid(1), "base_version": 0, "honest": SECAGG_HONEST},
            {"cohort_id": cid(2), "base_version": 1, "honest": SECAGG_HONEST},
        ],
    }
    for fname, client in zip(rest, hostile, strict=False):
        out.append(_make(inputs, fname, cohort=cid(1), client=client, base=0, group=name))
    out.append(_make(inputs, replay_name, cohort=cid(2), client="x1", base=1, group=name))
    outsider = Entry(
        "masked/non-member.safetensors",
        "masked update (round 3)",
        f"outsider is not a member of {cid(2)}",
        masked(cid(2), "outsider", 1),
        "add",
        "inputs",
        MASKED_KEY,
        "outsider",
    )
    out.append(
        _make(
            lambda c, me, b: iter([outsider]),
            outsider.file,
            cohort=cid(2),
            client="outsider",
            base=1,
            group=name,
        )
    )
    packed("secagg-unmask", "secagg", reveals, _names(reveals), hostile, SECAGG_HONEST)

    name = "device"
    groups[name] = {"mode": "device", "cohorts": []}
    for entry in device_entries():
        entry.group = name
        entry.key = entry.key_template.format(cohort_id=entry.cohort_id)
        entry.expect = entry.expect.replace("{c}", entry.cohort_id)
        out.append(entry)
    return groups, out


def manifest(groups: dict[str, Any], entries: list[Entry]) -> dict[str, Any]:
    # Plaintext members sign their updates too: every member of a planned cohort enrolls.
    enrolled = sorted({*SECAGG_HONEST, *(f"x{i}" for i in range(1, 7)), "q6", "q11", *DEVICES})
    return {
        "about": "Hostile and malformed objects, each rejected with a specific reason; "
        "generated by tests/hostile/make_corpus.py (do not edit by hand).",
        "model": {k: list(v) for k, v in MODEL.items()},
        "bucket_token": BUCKET_TOKEN,
        "enrolled": enrolled,
        "groups": groups,
        "entries": [
            {
                "file": e.file,
                "boundary": e.boundary,
                "role": e.role,
                "phase": e.phase,
                "reader": e.reader,
                "group": e.group,
                "cohort_id": e.cohort_id,
                "client_id": e.client_id,
                "key_template": e.key_template,
                "key": e.key,
                "expect": e.expect,
                **({"extra": e.extra} if e.extra else {}),
            }
            for e in entries
        ],
    }


def build() -> dict[str, bytes]:
    """Every corpus file (path relative to the corpus folder -> bytes), manifest included."""
    groups, entries = plan()
    files: dict[str, bytes] = {}
    for e in entries:
        if e.file in files and files[e.file] != e.body:
            raise ValueError(f"two different bodies for {e.file}")
        files[e.file] = e.body
    files["manifest.json"] = (
        json.dumps(manifest(groups, entries), indent=1, sort_keys=True).encode() + b"\n"
    )
    return files


def main() -> None:
    files = build()
    for rel, body in files.items():
        path = CORPUS / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
    print(f"wrote {len(files)} files under {CORPUS}")


if __name__ == "__main__":
    main()
