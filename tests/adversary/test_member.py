"""One malicious member, and one device against the limits: scenarios on the real handlers.

Cohorts run through the aggregation handler on moto, events delivered synchronously
(``tests/hostile/test_bounds.py``'s harness, reused here); gateway scenarios call the
gateway's Lambda handler with Function URL events. Each scenario names the defence
it exercises. To see a scenario fail without its defence, switch the defence off for
a run (test code only; nothing in the product reads this):

    ADVERSARY_DEFENCE_OFF=rate_limit .venv/bin/python -m pytest tests/adversary/test_member.py

with a comma-separated list of ``OFF_SWITCHES`` names.

The bounds themselves live in the README's "Security model"; the two worst-case
scenarios measure how far one member moves the mean and check the stated bound.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import secrets
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import safetensors.numpy

from edge_client.gateway_store import GatewayDeniedError, GatewayStore
from fedcore import access, layout
from fedcore.errors import ThrottledError
from fedcore.gateway import Gateway
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, Mode, parse_config
from fedcore.participant import Participant
from fedcore.secagg import protocol
from fedcore.secagg.quantize import Quantizer
from fedcore.server import aggregate, finalize, formation, secure
from fedcore.server.phases import input_cap
from fedcore.server.settings import ServerSettings
from fedcore.storage import ObjectInfo, S3Store, StoredObject
from fedcore.versions import find_head, load_model, read_schema
from functions.gateway import app
from infra.gateway_server import GatewayServer, build_event
from infra.pump import LocalContext
from tests.helpers import TINY, delta_for, participant, signing_key
from tests.hostile import test_bounds as bounds
from tests.hostile.test_bounds import CAP, MEMBERS, form, l2, run_secagg
from tests.hostile.test_corpus import Lambda

# The bounds tests' fixtures: default settings on a seeded bucket, and caplog fed by fedcore.
env = bounds.env
caplog = bounds.caplog

# -- switching defences off (for the report's controls) ----------------------------------


def _unchecked_decode_mean(
    total: np.ndarray, *, params: Any, count: int, schema: Any
) -> tuple[dict[str, np.ndarray], float]:
    """``secure.decode_mean`` without its range, weight and norm checks."""
    q = params.quantizer()
    sums = q.dequantize_sum(total, count)
    weight = float(sums[-1])
    return secure.unflatten(sums[:-1] / weight, schema), weight


# Bytes a scenario corrupted in transit -> what the member signed (see _flip_in_transit).
_FLIPPED: list[tuple[bytes, bytes]] = []


def _digest_of_what_was_signed(data: Any) -> Any:
    """sha256 that hashes what the member signed instead of what arrived."""
    got = bytes(data)
    for flipped, original in _FLIPPED:
        if got and flipped.endswith(got):
            return hashlib.sha256(original[len(original) - len(got) :])
    return hashlib.sha256(got)


def _lax_read(orig: Callable[..., access.Decision]) -> Callable[..., access.Decision]:
    def read(client: str, parsed: layout.ParsedKey, cohort: access.CohortLookup) -> Any:
        if parsed.kind in (Kind.CONFIG, Kind.STATE):
            return access.Decision(True, "allowed")
        return orig(client, parsed, cohort)

    return read


def _no_weight_cap(orig: Callable[..., Any]) -> Callable[..., Any]:
    return lambda *a, **kw: orig(*a, **{**kw, "weight_cap": None})


OFF_SWITCHES: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    "code_range": lambda mp: mp.setattr(secure, "decode_mean", _unchecked_decode_mean),
    "finite": lambda mp: (
        mp.setattr("fedcore.codec.check_finite", lambda *a, **kw: None),
        mp.setattr(aggregate, "math", types.SimpleNamespace(sqrt=math.sqrt, isfinite=bool)),
    ),
    "clip": lambda mp: mp.setattr(
        finalize.Finalizer, "plaintext_clip", lambda self, schema: math.inf
    ),
    "weight_cap": lambda mp: mp.setattr(
        finalize, "weighted_mean", _no_weight_cap(aggregate.weighted_mean)
    ),
    "digest": lambda mp: mp.setattr(
        secure, "hashlib", types.SimpleNamespace(sha256=_digest_of_what_was_signed)
    ),
    "plain_digest": lambda mp: mp.setattr(finalize, "verify_update", lambda *a, **kw: None),
    "schema_size": lambda mp: mp.setattr(
        Gateway, "size_limit", lambda self, key: access.size_limit(key)
    ),
    "one_cohort": lambda mp: mp.setattr(formation, "busy_devices", lambda taken: set()),
    "rate_limit": lambda mp: mp.setattr(Gateway, "_claim_checkin_slots", lambda *a: None),
    "own_cohorts": lambda mp: (
        mp.setattr(access, "_decide_list", lambda c, p, look: access.Decision(True, "allowed")),
        mp.setattr(access, "_decide_read", _lax_read(access._decide_read)),
    ),
    "list_delimiter": lambda mp: mp.setattr("fedcore.gateway.list_refusal", lambda p, r: None),
    "masked_signature": lambda mp: mp.setattr(secure, "parse_masked_metadata", _unsigned_meta),
}


def _unsigned_meta(meta: dict[str, str], **kw: Any) -> Any:
    """``parse_masked_metadata`` that reads the signed document without checking its
    signature (the check the ``masked_signature`` switch turns off)."""
    real = protocol.parse_masked_metadata
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(protocol.crypto, "verify", lambda *a, **k: None)
        return real(meta, **kw)


@pytest.fixture(autouse=True)
def defences(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every defence on, unless ``ADVERSARY_DEFENCE_OFF`` names some (controls only)."""
    off = [n for n in os.environ.get("ADVERSARY_DEFENCE_OFF", "").split(",") if n]
    unknown = sorted(set(off) - set(OFF_SWITCHES))
    if unknown:
        raise ValueError(f"unknown defences {unknown}; known: {sorted(OFF_SWITCHES)}")
    for name in off:
        OFF_SWITCHES[name](monkeypatch)
    _FLIPPED.clear()
    yield
    _FLIPPED.clear()


# -- helpers ---------------------------------------------------------------------------


def _flip_in_transit(
    env: pytest.MonkeyPatch, suffix: str, flip: Callable[[bytearray], None]
) -> None:
    """Corrupt the body of the next put of a key ending in ``suffix`` after the member
    encoded (and, for masked inputs, signed) it: what a flipped bit on the way does."""
    real = S3Store.put_new

    def put_new(self: S3Store, key: str, body: bytes, **kw: Any) -> str:
        if key.endswith(suffix):
            corrupt = bytearray(body)
            flip(corrupt)
            _FLIPPED.append((bytes(corrupt), bytes(body)))
            body = bytes(corrupt)
        return real(self, key, body, **kw)

    env.setattr(S3Store, "put_new", put_new)


def _flip_first_data_bit(blob: bytearray) -> None:
    """Flip the lowest bit of the first tensor byte (safetensors: 8-byte length, header)."""
    blob[8 + int.from_bytes(blob[:8], "little")] ^= 1


def _mean(store: S3Store, version: int) -> dict[str, np.ndarray]:
    new, meta, _ = load_model(store, version)  # base version 0 is all zeros
    return {k: new[k].astype(np.float64) / meta.weight for k in TINY}


def _records(caplog: pytest.LogCaptureFixture, message: str) -> list[dict[str, Any]]:
    return [vars(r) for r in caplog.records if r.getMessage() == message]


# -- one member's bounds ---------------------------------------------------------------


def test_secagg_codes_wrapped_below_zero_abort(store: S3Store, env: pytest.MonkeyPatch) -> None:
    """Defence ``code_range``. GIVEN m4 subtracting count * levels from one coordinate of its
    codes (mod 2^32: the sum wraps below zero, to near 2^32) THEN the cohort aborts with the
    reason and nothing is committed (decoded, it would be a coordinate of about 2^32 steps)."""

    def forge(codes: np.ndarray, q: Quantizer) -> np.ndarray:
        codes[3:4] -= np.uint32(len(MEMBERS) * q.levels)  # array op: wraps mod 2^32
        return codes

    _, res = run_secagg(store, env, forge=forge)
    assert res is not None and res.status == "aborted", res
    assert "out of honest bounds" in res.reason and "code range" in res.reason, res.reason
    assert find_head(store) == 0


def test_plaintext_non_finite_update_is_rejected_and_the_rest_applies(
    store: S3Store, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence ``finite``. GIVEN a member whose delta holds a NaN and an infinity THEN it is
    rejected with the reason (a dropout), the other two apply, and the version is finite."""
    lam, cfg, devs = form(store, env, ["a", "b", "evil"], "plaintext", 2)
    for c in ("a", "b"):
        devs[c].upload_plain(cfg, delta_for(c), num_samples=10, loss=0.5)
    bad = delta_for("evil")
    bad["w"][0, 0], bad["b"][1] = np.nan, np.inf
    devs["evil"].upload_plain(cfg, bad, num_samples=10, loss=0.5)
    lam.pump()
    res = devs["a"].result(cfg.cohort_id)
    assert res is not None and res.status == "applied" and res.included == ["a", "b"], res
    assert "nan or infinity" in res.rejected.get("evil", "").lower(), res.rejected
    new, _, _ = load_model(store, res.version)
    assert all(np.isfinite(v).all() for v in new.values())


def test_plaintext_float32_max_update_commits_a_finite_version_within_the_clip(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """Defence ``clip``. GIVEN PLAINTEXT_CLIP 1 and a member whose every coordinate is
    float32's largest value (finite, but its norm overflows float32) THEN the version is
    finite and the applied mean's L2 norm is at most the clip."""
    env.setenv("PLAINTEXT_CLIP", "1.0")
    lam, cfg, devs = form(store, env, ["a", "b", "evil"], "plaintext", 2)
    for c in ("a", "b"):
        devs[c].upload_plain(cfg, delta_for(c), num_samples=10, loss=0.5)
    top = np.finfo(np.float32).max
    devs["evil"].upload_plain(
        cfg, {k: np.full(s, top, np.float32) for k, s in TINY.items()}, num_samples=10, loss=0.5
    )
    lam.pump()
    res = devs["a"].result(cfg.cohort_id)
    assert res is not None and res.status == "applied", res
    mean = _mean(store, res.version)
    assert all(np.isfinite(v).all() for v in mean.values())
    assert l2(mean) <= 1.0 + 1e-5


def test_masked_upload_with_a_flipped_bit_is_rejected(
    store: S3Store, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence ``digest``. GIVEN one bit of m4's masked vector flipped after m4 signed it
    (the lowest bit of a code: the sum stays in range, so only the digest can tell) THEN
    m4's input is rejected as tampered and counted as a dropout, and the other four apply
    (m4's self mask removed from its shares)."""
    _m4_rejected_for(store, env, caplog, _flip_first_data_bit, "signed digest")


def _m4_rejected_for(
    store: S3Store,
    env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    tamper: Callable[[bytearray], None],
    reason: str,
) -> None:
    """Tamper with m4's masked upload on its way; the other four apply and m4 is logged as
    a rejected dropout whose reason contains ``reason``."""
    _flip_in_transit(env, "/masked/m4.safetensors", tamper)
    with caplog.at_level(logging.INFO):
        _, res = run_secagg(store, env)
    assert res is not None and res.status == "applied", res
    assert res.included == MEMBERS[:4], res
    why = _records(caplog, "masked input rejected; treated as a dropout")
    assert any(r.get("client_id") == "m4" and reason in r.get("reason", "") for r in why), why


def _flip_and_redigest(blob: bytearray) -> None:
    """Flip a data bit of a masked upload and rewrite its metadata's digest to match: a
    self-consistent forgery that only the metadata's signature can tell."""
    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + header_len])
    meta = header.pop("__metadata__")
    (name,) = header
    tensors = safetensors.numpy.load(bytes(blob))
    vec = tensors[name].copy()
    vec.reshape(-1)[0] ^= 1
    doc = json.loads(meta["fedcore"])
    doc["digest"] = hashlib.sha256(memoryview(vec)).hexdigest()
    meta["fedcore"] = json.dumps(doc, sort_keys=True)
    blob[:] = safetensors.numpy.save({name: vec}, metadata=meta)


def test_masked_upload_with_rewritten_metadata_is_rejected(
    store: S3Store, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence ``masked_signature``. GIVEN m4's masked vector changed after m4 signed it and
    the metadata's digest rewritten to match the change (the digest check alone passes)
    THEN the metadata's signature no longer verifies: m4 is rejected as a dropout and the
    other four apply."""
    _m4_rejected_for(store, env, caplog, _flip_and_redigest, "signature")


def test_masked_upload_with_rewritten_metadata_without_the_defence(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """Control: without the signature check the rewritten upload is counted, m4 included."""
    OFF_SWITCHES["masked_signature"](env)
    _flip_in_transit(env, "/masked/m4.safetensors", _flip_and_redigest)
    _, res = run_secagg(store, env)
    assert res is not None and res.status == "applied", res
    assert res.included == MEMBERS, res


def _plaintext_flip(
    store: S3Store, env: pytest.MonkeyPatch
) -> tuple[CohortConfig, dict[str, Participant]]:
    """A plaintext cohort of a, b and victim; victim's update gets one bit flipped after it
    was encoded and signed (the lowest bit of its first float: well within the clip)."""
    lam, cfg, devs = form(store, env, ["a", "b", "victim"], "plaintext", 2)
    for c in ("a", "b"):
        devs[c].upload_plain(cfg, delta_for(c), num_samples=10, loss=0.5)
    _flip_in_transit(env, "/plain/victim.safetensors", _flip_first_data_bit)
    devs["victim"].upload_plain(cfg, delta_for("victim"), num_samples=10, loss=0.5)
    lam.pump()
    return cfg, devs


def test_plaintext_upload_with_a_flipped_bit_is_rejected(
    store: S3Store, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence ``plain_digest``. GIVEN one bit of victim's plaintext update flipped after
    victim signed it THEN the update is rejected as tampered (logged with the object and
    the reason, and in the result's ``rejected``), and the other two apply."""
    with caplog.at_level(logging.INFO):
        cfg, devs = _plaintext_flip(store, env)
    res = devs["a"].result(cfg.cohort_id)
    assert res is not None and res.status == "applied", res
    assert res.included == ["a", "b"], res
    assert "signed digest" in res.rejected.get("victim", ""), res.rejected
    why = _records(caplog, "update rejected; treated as a dropout")
    assert any(
        r.get("client_id") == "victim"
        and r.get("key", "").endswith("/plain/victim.safetensors")
        and "does not match its signed digest (tampered)" in r.get("reason", "")
        for r in why
    ), why


def test_plaintext_upload_with_a_flipped_bit_without_the_defence(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """Control: with the function's signature check switched off (here, by monkeypatch; the
    product has no switch) the flipped update is averaged in, victim counted."""
    OFF_SWITCHES["plain_digest"](env)
    cfg, devs = _plaintext_flip(store, env)
    res = devs["a"].result(cfg.cohort_id)
    assert res is not None and res.status == "applied", res
    assert res.included == ["a", "b", "victim"] and not res.rejected, res


def test_an_input_url_larger_than_the_model_allows_is_refused(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """Defence ``schema_size``. GIVEN a member of a plaintext cohort on the tiny model WHEN
    it asks the gateway for an input upload URL one byte over what the model's schema
    allows (the function's own cap) THEN 403 naming the cap; at the cap, the URL is signed.
    The cap is under 32 KiB here (tensors and a header allowance), where the
    constant allowed 1 GiB."""
    _, cfg, _ = form(store, env, ["a", "b", "c"], "plaintext", 2)
    dev = GatewayDevice(store, "a")
    cap = input_cap(read_schema(store, cfg.base_version), Mode.PLAINTEXT)
    assert cap < 1 << 15
    key = layout.member_key(cfg.cohort_id, Kind.PLAIN, "a")
    status, answer, _ = dev.ask([{"op": "put_new", "key": key, "size": cap + 1}])
    assert status == 403 and f"exceeds {cap}" in answer["reason"], answer
    status, answer, _ = dev.ask([{"op": "put_new", "key": key, "size": cap}])
    assert status == 200 and answer["urls"][0]["headers"]["Content-Length"] == str(cap)


# -- worst cases: how far one member moves the mean ---------------------------------------


def test_plaintext_worst_case_moves_the_mean_exactly_as_far_as_the_stated_bound(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """Defences ``clip`` and ``weight_cap``. README: one plaintext member can send any
    delta of norm up to the clip, at the capped weight. So with honest weight w_h, honest
    mean H and clip C, it moves the mean from H by at most cap / (cap + w_h) * (C + |H|),
    reached by a delta pointing away from H. GIVEN PLAINTEXT_CLIP 1, two honest members of
    10 samples, and one claiming 10^7 samples with a delta of norm 1000 along -H THEN the
    measured move equals that bound (to float32 rounding) and never exceeds it."""
    clip = 1.0
    env.setenv("PLAINTEXT_CLIP", str(clip))
    lam, cfg, devs = form(store, env, ["a", "b", "evil"], "plaintext", 2)
    for c in ("a", "b"):
        devs[c].upload_plain(cfg, delta_for(c), num_samples=10, loss=0.5)
    honest = {k: (delta_for("a")[k] + delta_for("b")[k]).astype(np.float64) / 2 for k in TINY}
    away = {k: (-1000.0 / l2(honest) * v).astype(np.float32) for k, v in honest.items()}
    devs["evil"].upload_plain(cfg, away, num_samples=10_000_000, loss=0.5)
    lam.pump()
    res = devs["a"].result(cfg.cohort_id)
    assert res is not None and res.status == "applied", res
    moved = l2({k: v - honest[k] for k, v in _mean(store, res.version).items()})
    bound = CAP / (CAP + 20) * (clip + l2(honest))
    assert moved <= bound * (1 + 1e-5), (moved, bound)
    assert moved >= bound * (1 - 1e-4), (moved, bound)  # the bound is reached: it is tight


@pytest.mark.parametrize("codes_at", ["range_edge", "beyond_range"])
def test_secagg_worst_case_codes_move_the_sum_within_the_stated_bound(
    store: S3Store, env: pytest.MonkeyPatch, codes_at: str
) -> None:
    """Defence ``code_range``. README: a secure member may send codes outside its own range
    as long as the sum stays in the members' range, shifting each coordinate of the sum by
    up to about count * SECAGG_CLIP. GIVEN m4 pushing every parameter code to just below
    where the five members' range ends (3 * levels minus a margin, with four honest codes
    near levels / 2 each), or half a member's range beyond it, THEN either the cohort aborts
    (nothing applied) or every coordinate of the applied weighted sum lies in
    [-count * clip, count * clip] (plus rounding), m4's measured shift is at most count *
    clip plus the honest sum, and the mean's norm is within sqrt(d) * count * clip / W.
    At the range's edge the measured shift reaches 90% of count * clip."""
    count, clip = len(MEMBERS), 1.0  # SECAGG_CLIP's default

    def forge(codes: np.ndarray, q: Quantizer) -> np.ndarray:
        target = 3 * q.levels + (-(q.levels // 50) if codes_at == "range_edge" else q.levels // 2)
        assert 2 * q.levels + target < 2**32  # the sum does not wrap: it is really beyond
        codes[:-1] = np.uint32(target)
        return codes

    cfg, res = run_secagg(store, env, forge=forge)
    assert res is not None, "no result"
    if res.status == "aborted":  # nothing was applied (today, beyond the range only)
        assert find_head(store) == 0
        return
    assert res.status == "applied" and res.included == MEMBERS, res
    weight = count * 10 / CAP  # each member declares min(10, cap) / cap
    step = 2 * clip / cfg.secagg.quantizer().levels if cfg.secagg else 0.0
    applied = {k: v * weight for k, v in _mean(store, res.version).items()}
    honest4 = {
        k: sum(10 / CAP * delta_for(c, TINY, 0.05)[k].astype(np.float64) for c in MEMBERS[:4])
        for k in TINY
    }
    slack = count * step + 1e-4  # stochastic rounding, and the float32 model
    shift = max(float(np.max(np.abs(applied[k] - honest4[k]))) for k in TINY)
    top = max(float(np.max(np.abs(applied[k]))) for k in TINY)
    honest_top = max(float(np.max(np.abs(honest4[k]))) for k in TINY)
    assert top <= count * clip + slack, (top, count * clip)
    assert shift <= count * clip + honest_top + slack, (shift, count * clip)
    if codes_at == "range_edge":
        assert shift >= 0.9 * count * clip, shift  # the measured worst case nearly reaches it
    d = sum(math.prod(s) for s in TINY.values())
    assert l2(_mean(store, res.version)) <= math.sqrt(d) * count * (clip + step) / weight * 1.01


# -- limits on one device --------------------------------------------------------------


def _configs_naming(store: S3Store, client: str) -> list[CohortConfig]:
    out = []
    for prefix in store.list_prefixes(layout.COHORTS_PREFIX):
        cfg = parse_config(store.get(prefix + "config.json").body, where=prefix)
        if client in cfg.members:
            out.append(cfg)
    return out


def test_a_device_is_in_at_most_one_open_cohort(store: S3Store, env: pytest.MonkeyPatch) -> None:
    """Defence ``one_cohort``. GIVEN dup in an open cohort WHEN it checks in again beside
    other devices THEN no second cohort takes it while the first is open (the others form
    one without it); once the first cohort has a result, its waiting check-in joins the next."""
    env.setenv("AGGREGATION_MODE", "plaintext")
    env.setenv("COHORT_SIZE", "3")
    env.setenv("MIN_COHORT_SIZE", "2")
    lam = Lambda(store)
    devs = {c: participant(store, c, "plaintext") for c in ["dup", "a", "b", "c", "d", "e"]}
    first = {c: devs[c].check_in(0) for c in ("dup", "a", "b")}
    lam.pump()
    (c1,) = _configs_naming(store, "dup")
    assert sorted(c1.members) == ["a", "b", "dup"] and c1.members["dup"] == first["dup"].nonce
    second = devs["dup"].check_in(0)
    for c in ("c", "d", "e"):
        devs[c].check_in(0)
        lam.pump()
    assert [cfg.cohort_id for cfg in _configs_naming(store, "dup")] == [c1.cohort_id]
    (c2,) = _configs_naming(store, "e")
    assert sorted(c2.members) == ["c", "d", "e"]
    assert store.head(second.key) is not None  # still waiting, not taken
    for c in ("a", "b", "dup"):
        devs[c].upload_plain(c1, delta_for(c), num_samples=10, loss=0.5)
    lam.pump()
    assert (r := devs["a"].result(c1.cohort_id)) is not None and r.status == "applied", r
    for c in ("f", "g"):
        participant(store, c, "plaintext").check_in(0)
    lam.pump()
    later = [cfg for cfg in _configs_naming(store, "dup") if cfg.cohort_id != c1.cohort_id]
    assert [cfg.members.get("dup") for cfg in later] == [second.nonce], later


class GatewayDevice:
    """An enrolled device that signs its own /urls requests to the gateway handler."""

    CTX = LocalContext("gateway")

    def __init__(self, store: S3Store, client: str) -> None:
        self.client = client
        self.key = signing_key(client)  # the key the client's device enrolled, if it did
        Participant(store, client, mode="secagg", signing_key=self.key).enroll()

    def ask(
        self, requests: list[dict[str, Any]], *, now: float | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        body = access.urls_request(
            self.client, self.key, requests, nonce=secrets.token_urlsafe(16), now=now
        )
        event = build_event("POST", "/urls", {}, json.dumps(body).encode())
        resp = app.handler(event, self.CTX)
        return resp["statusCode"], json.loads(resp["body"]), resp["headers"]


def _pinned_gateway(env: pytest.MonkeyPatch, now: float) -> Gateway:
    """The handler's gateway (one warm container), on a clock pinned to ``now``."""
    gw = app.gateway()
    env.setattr(gw, "clock", lambda: now)
    return gw


def test_checkin_flooding_is_refused_with_429_across_instances(
    store: S3Store, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Defence ``rate_limit``. GIVEN CHECKINS_PER_MINUTE 3 WHEN a device asks for a 4th
    check-in URL within the minute THEN 429 with the reason and a Retry-After, and log lines
    naming the client; a fresh gateway instance (another Lambda container) refuses too (the
    count is in the bucket), and the device's own client over HTTP raises ThrottledError;
    a batch that would cross the limit claims nothing; another device is unaffected; the
    next minute, the device may check in again."""
    env.setenv("CHECKINS_PER_MINUTE", "3")
    now = 60.0 * math.floor(time.time() / 60) + 1.0
    _pinned_gateway(env, now)
    flood, calm = GatewayDevice(store, "flood"), GatewayDevice(store, "calm")

    def checkin(dev: GatewayDevice, n: int = 1, at: float = now) -> tuple[int, Any, Any]:
        reqs = [
            {"op": "put_new", "key": layout.checkin_key(dev.client, secrets.token_hex(8)),
             "size": 200}
            for _ in range(n)
        ]  # fmt: skip
        return dev.ask(reqs, now=at)

    assert checkin(flood, 2)[0] == 200
    status, answer, _ = checkin(flood, 2)  # would be the 4th: refused whole
    assert status == 429 and answer["error"] == "too_many_requests", answer
    assert checkin(flood)[0] == 200  # the 3rd: the refused batch claimed nothing
    with caplog.at_level(logging.INFO):
        status, answer, headers = checkin(flood)
    assert status == 429 and "rate limit" in answer["reason"], answer
    assert 0 < int(headers["retry-after"]) <= 60
    assert any(
        r.get("client_id") == "flood" for r in _records(caplog, "check-in rate limit reached")
    )
    assert any(
        r.get("client_id") == "flood" and r.get("status") == 429
        for r in _records(caplog, "request refused")
    )
    app._gateway.cache_clear()  # a cold container: no memory of the above
    _pinned_gateway(env, now)
    assert checkin(flood)[0] == 429
    # A device's own client over HTTP reads the 429 as throttling, with the reason.
    server = GatewayServer().start()
    try:
        over_http = GatewayStore(server.url, "flood", flood.key, retries=0)
        with pytest.raises(ThrottledError, match="check-in rate limit"):
            over_http.put_new(layout.checkin_key("flood", "over-http"), b"{}")
    finally:
        server.stop()
    assert checkin(calm)[0] == 200
    _pinned_gateway(env, now + 60)
    assert checkin(flood, at=now + 60)[0] == 200


class PolicyStore:
    """A device's view of the bucket through the gateway's policy: reads the policy denies
    raise ``GatewayDeniedError``, as ``GatewayStore`` does (no HTTP server needed)."""

    def __init__(self, store: S3Store, client: str, gw: Gateway) -> None:
        self.store, self.client, self.gw = store, client, gw

    def _check(self, op: str, target: str) -> None:
        decision = access.decide(self.client, op, target, cohort=self.gw.cohort)
        if not decision:
            raise GatewayDeniedError(f"gateway refused: {op} {target}: {decision.reason}")

    def get(self, key: str, **kw: Any) -> StoredObject:
        self._check("get", key)
        return self.store.get(key, **kw)

    def head(self, key: str) -> ObjectInfo | None:
        self._check("head", key)
        return self.store.head(key)

    def list_prefixes(self, prefix: str, **kw: Any) -> list[str]:
        self._check("list", prefix)
        return self.store.list_prefixes(prefix, **kw)

    def put_new(self, key: str, body: bytes, **kw: Any) -> str:
        self._check("put_new", key)
        return self.store.put_new(key, body, **kw)


def test_a_device_cannot_list_or_read_another_devices_cohort(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """Defence ``own_cohorts``. GIVEN a cohort of a, b, c THEN x may not list its objects
    (members, sizes, ETags) nor read its config or manifests (403, "not a member"), while
    a may; x still lists the cohort ids, and its discovery skips the cohort it may not read
    and finds its own."""
    lam, cfg, _ = form(store, env, ["a", "b", "c"], "plaintext", 2)
    cid = cfg.cohort_id
    x, a = GatewayDevice(store, "x"), GatewayDevice(store, "a")
    theirs = [
        {"op": "list", "prefix": layout.cohort_prefix(cid)},
        {"op": "get", "key": layout.config_key(cid)},
        {"op": "head", "key": layout.config_key(cid)},
        {"op": "get", "key": layout.state_key(cid, Phase.INPUTS)},
        {"op": "get", "key": layout.state_key(cid, Phase.RESULT)},
    ]
    for req in theirs:
        status, answer, _ = x.ask([req])
        assert status == 403 and answer["reason"].endswith("not a member of the cohort"), req
        assert a.ask([req])[0] == 200, req
    assert x.ask([{"op": "list", "prefix": "cohorts/", "delimiter": "/"}])[0] == 200
    # Discovery through the policy: x's own cohort is found past the one it may not read.
    parts = {c: participant(store, c, "plaintext") for c in ("x", "y", "z")}
    seen = PolicyStore(store, "x", app.gateway())
    parts["x"] = Participant(seen, "x", mode="plaintext", signing_key=signing_key("x"))  # type: ignore[arg-type]
    ticket = parts["x"].check_in(0)
    ticket = dataclasses.replace(ticket, cursor=None)  # look from the first cohort on
    for c in ("y", "z"):
        parts[c].check_in(0)
    lam.pump()
    mine, _ = parts["x"].find_cohort(ticket)
    assert mine is not None and mine.cohort_id != cid and "x" in mine.members


def test_cohorts_are_listed_only_with_the_delimiter(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """Defence ``list_delimiter``. GIVEN a cohort of a, b, c WHEN x asks to list cohorts/
    without the delimiter (the answer would name every member object, its size and ETag)
    THEN 403; with delimiter '/', the URL is signed."""
    form(store, env, ["a", "b", "c"], "plaintext", 2)
    x = GatewayDevice(store, "x")
    status, answer, _ = x.ask([{"op": "list", "prefix": "cohorts/"}])
    assert status == 403 and "delimiter" in answer["reason"], answer
    assert x.ask([{"op": "list", "prefix": "cohorts/", "delimiter": "/"}])[0] == 200


def test_min_cohort_size_default_keeps_two_survivors_from_unmasking() -> None:
    """With two survivors, each could subtract its own update from the published mean and
    learn the other's: the default minimum is three (README, Security model)."""
    assert ServerSettings().min_cohort_size == 3
