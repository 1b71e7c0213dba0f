"""The device gateway end to end: real handler, local HTTP server, moto server, real crypto.

Devices here hold no S3 client at all: they enroll with an operator token and
then reach the bucket only through presigned URLs (``GatewayStore``).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
import urllib3

from edge_client.gateway_store import GatewayDeniedError, GatewayStore
from fedcore import access, layout
from fedcore.clock import ManualClock
from fedcore.errors import AlreadyExistsError, IntegrityError
from fedcore.gateway import issue_token, used_key
from fedcore.layout import Kind, Phase
from fedcore.messages import parse_config, parse_result
from fedcore.participant import Participant
from fedcore.secagg import crypto
from fedcore.secagg.protocol import parse_identity
from fedcore.secure_round import run_secure_cohort
from fedcore.storage import S3Store
from fedcore.versions import find_head, load_model, seed
from functions.gateway.app import handler
from infra.gateway_server import build_event
from infra.pump import LocalContext
from infra.stack import LocalStack
from tests.helpers import TINY, delta_for, wait_until

HTTP = urllib3.PoolManager()


class RecordingStore(GatewayStore):
    """A GatewayStore that remembers every (op, key-or-prefix) it obtained a URL for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ops: list[tuple[str, str]] = []

    def _send(self, req: dict[str, Any], **kw: Any):  # type: ignore[no-untyped-def]
        self.ops.append((req["op"], req.get("key") or req["prefix"]))
        return super()._send(req, **kw)


def make_stack(s3_endpoint: str, store: S3Store, mode: str) -> LocalStack:
    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    settings = {
        "mode": mode,
        "cohort_size": 3,
        "min_cohort_size": 2,
        "short_round_s": 20.0,
        "round_deadline_s": 20.0,
        "secagg_weight_cap": 100,
    }
    # Every cohort here completes with all its members: on a ManualClock no deadline can
    # close a round early on a slow machine (the gateway itself keeps the real clock).
    return LocalStack(
        endpoint_url=s3_endpoint, bucket=store.bucket, settings=settings, sweep_interval_s=0.5,
        clock=ManualClock(),
    )  # fmt: skip


@pytest.fixture
def gw(s3_endpoint: str, store: S3Store):  # type: ignore[no-untyped-def]
    with make_stack(s3_endpoint, store, "secagg") as st:
        yield st


def enrolled(stack: LocalStack, store: S3Store, client: str) -> tuple[RecordingStore, bytes]:
    key = crypto.ed25519_keypair()[0]
    dev = RecordingStore(stack.gateway_url, client, key)
    assert dev.enroll(issue_token(store, client)) is True
    return dev, key


def post(stack: LocalStack, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    resp = HTTP.request("POST", stack.gateway_url + path, body=json.dumps(body).encode())
    return resp.status, json.loads(resp.data)


def put_req(key: str, size: int = 2) -> dict[str, Any]:
    return {"op": "put_new", "key": key, "size": size}


# -- enrollment ---------------------------------------------------------------------


def test_enrollment_with_a_valid_token_works_once(gw: LocalStack, store: S3Store) -> None:
    """GIVEN an operator token for dev-a WHEN the device enrolls THEN its identity is written
    once; the same device again is a no-op; another key with the same token (or another token)
    cannot take over the id."""
    key = crypto.ed25519_keypair()[0]
    token = issue_token(store, "dev-a")
    # Only the hash is stored.
    records = [o.key for o in store.list("enrollment/")]
    assert records == [f"enrollment/tokens/{access.token_hash(token)}.json"]
    assert token not in store.get(records[0]).body.decode()
    dev = GatewayStore(gw.gateway_url, "dev-a", key)
    assert dev.enroll(token) is True
    ident = parse_identity(
        store.get(layout.identity_key("dev-a")).body, client_id="dev-a", where=""
    )
    assert ident.ed25519 == crypto.ed25519_public(key)
    assert dev.enroll(token) is False  # already enrolled with this key
    thief = GatewayStore(gw.gateway_url, "dev-a", crypto.ed25519_keypair()[0])
    with pytest.raises(IntegrityError, match="already enrolled with another key"):
        thief.enroll(token)
    with pytest.raises(IntegrityError, match="already enrolled with another key"):
        thief.enroll(issue_token(store, "dev-a"))


def test_reused_expired_forged_and_misbound_tokens_fail(gw: LocalStack, store: S3Store) -> None:
    def refused(client: str, token: str, match: str) -> None:
        dev = GatewayStore(gw.gateway_url, client, crypto.ed25519_keypair()[0])
        with pytest.raises(GatewayDeniedError, match=match):
            dev.enroll(token)
        assert store.head(layout.identity_key(client)) is None

    refused("dev-b", "not-a-token-anyone-issued", "unknown enrollment token")
    refused("dev-c", issue_token(store, "dev-b"), "issued for another client id")
    expired = issue_token(store, "dev-d", ttl_s=0.001)
    time.sleep(0.01)
    refused("dev-d", expired, "enrollment token expired")
    # A token consumed by one key (its identity write then lost) is not reusable by another.
    used = issue_token(store, "dev-e")
    store.put_new(
        used_key(access.token_hash(used)),
        json.dumps({"client_id": "dev-e", "public_key": crypto.b64(b"\1" * 32)}).encode(),
    )
    refused("dev-e", used, "enrollment token already used")
    # Proof of possession: a body signed by another key than the one it enrolls.
    token = issue_token(store, "dev-f")
    body = access.enroll_request("dev-f", crypto.ed25519_keypair()[0], token)
    body["public_key"] = crypto.b64(crypto.ed25519_public(crypto.ed25519_keypair()[0]))
    status, answer = post(gw, "/enroll", body)
    assert (status, answer["reason"]) == (403, "bad proof-of-possession signature")
    stale = access.enroll_request(
        "dev-f", crypto.ed25519_keypair()[0], token, now=time.time() - 900
    )
    status, answer = post(gw, "/enroll", stale)
    assert status == 403 and "timestamp" in answer["reason"]
    assert store.head(layout.identity_key("dev-f")) is None


def test_concurrent_uses_of_one_token_have_one_winner(gw: LocalStack, store: S3Store) -> None:
    token = issue_token(store, "dev-g")
    keys = [crypto.ed25519_keypair()[0] for _ in range(4)]

    def attempt(key: bytes) -> str:
        try:
            GatewayStore(gw.gateway_url, "dev-g", key).enroll(token)
            return "won"
        except (GatewayDeniedError, IntegrityError) as exc:
            return str(exc)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(attempt, keys))
    assert results.count("won") == 1, results
    winner = keys[results.index("won")]
    ident = parse_identity(
        store.get(layout.identity_key("dev-g")).body, client_id="dev-g", where=""
    )
    assert ident.ed25519 == crypto.ed25519_public(winner)


# -- presigned URLs -----------------------------------------------------------------


def test_urls_only_for_allowed_keys_and_refusals_name_the_reason(
    gw: LocalStack, store: S3Store, caplog: pytest.LogCaptureFixture
) -> None:
    dev, key = enrolled(gw, store, "dev-h")
    ok = dev.presign(
        [
            {"op": "get", "key": layout.LATEST_KEY},
            {"op": "list", "prefix": "cohorts/", "delimiter": "/"},
        ]
    )
    assert [u["method"] for u in ok] == ["GET", "GET"]
    assert all("X-Amz-Expires=300" in u["url"] for u in ok)

    def urls(body: dict[str, Any]) -> tuple[int, str]:
        status, answer = post(gw, "/urls", body)
        return status, answer.get("reason", "")

    reqs = [put_req(layout.checkin_key("dev-h", "n1"))]
    body = access.urls_request("dev-h", key, reqs, nonce="nonce-0123456789abcdef")
    assert urls(body)[0] == 200
    assert urls(body) == (403, "replayed nonce")
    forged = access.urls_request("dev-h", crypto.ed25519_keypair()[0], reqs, nonce="n" * 20)
    assert urls(forged) == (403, "bad signature")
    stale = access.urls_request("dev-h", key, reqs, nonce="s" * 20, now=time.time() - 400)
    status, reason = urls(stale)
    assert status == 403 and "timestamp" in reason
    nan = access.urls_request("dev-h", key, reqs, nonce="q" * 20)
    nan["timestamp"] = float("nan")  # json.dumps writes NaN, json.loads reads it
    assert urls(nan) == (400, "timestamp must be a number")
    stranger = access.urls_request("dev-zz", key, reqs, nonce="z" * 20)
    assert urls(stranger) == (403, "client is not enrolled")
    theirs = [put_req(layout.checkin_key("dev-other", "n1"))]
    status, reason = urls(access.urls_request("dev-h", key, theirs, nonce="t" * 20))
    assert status == 403 and reason.endswith("another client's check-in slot")
    for req, why in [
        ({"op": "get", "key": layout.sum_key("c00000000", "0" * 16)}, "masked sums"),
        (put_req(layout.identity_key("dev-h")), "may not create identity"),
        (put_req(layout.member_key("c00000000", Kind.KEYS, "dev-h")), "no such cohort"),
        ({"op": "get", "key": "enrollment/used/" + "0" * 64 + ".json"}, "not in the bucket layout"),
        ({"op": "list", "prefix": "clients/"}, "may list only"),
        (put_req(layout.checkin_key("dev-h", "big"), 1 << 21), "exceeds"),
    ]:
        with pytest.raises(GatewayDeniedError, match=why):
            dev.presign([req])
    # One log line per refusal, naming client, op, key and reason.
    refused = [vars(r) for r in caplog.records if r.getMessage() == "request refused"]
    assert any(
        (r.get("client_id"), r.get("op"), r.get("key")) == ("dev-h", "put_new", theirs[0]["key"])
        and "another client's check-in slot" in r.get("reason", "")
        for r in refused
    ), refused
    assert any(r.get("reason") == "replayed nonce" for r in refused)
    # Nothing was written for the refused requests.
    assert store.head(layout.checkin_key("dev-other", "n1")) is None


def test_handler_answers_function_url_events(gw: LocalStack, store: S3Store) -> None:
    """The handler called directly with a Function URL event (what Lambda would send)."""
    ctx = LocalContext("gateway")
    resp = handler(build_event("POST", "/urls", {}, b"not json"), ctx)
    assert resp["statusCode"] == 400 and json.loads(resp["body"])["error"] == "bad_request"
    assert handler(build_event("GET", "/urls", {}, b""), ctx)["statusCode"] == 405
    assert handler(build_event("POST", "/nope", {}, b"{}"), ctx)["statusCode"] == 404
    _, key = enrolled(gw, store, "dev-i")
    body = access.urls_request(
        "dev-i", key, [{"op": "head", "key": layout.LATEST_KEY}], nonce="h" * 20
    )
    resp = handler(build_event("POST", "/urls", {}, json.dumps(body).encode()), ctx)
    assert resp["statusCode"] == 200
    assert resp["headers"]["content-type"] == "application/json"
    assert json.loads(resp["body"])["urls"][0]["method"] == "HEAD"
    denied = access.urls_request(
        "dev-i", key, [{"op": "get", "key": layout.checkin_key("x", "y")}], nonce="d" * 20
    )
    resp = handler(build_event("POST", "/urls", {}, json.dumps(denied).encode()), ctx)
    assert resp["statusCode"] == 403
    assert json.loads(resp["body"]) == {
        "error": "forbidden",
        "reason": "get checkins/x/y.json: another client's check-in",
    }


def test_presigned_put_new_cannot_overwrite(gw: LocalStack, store: S3Store) -> None:
    dev, _ = enrolled(gw, store, "dev-j")
    key = layout.checkin_key("dev-j", "once")
    dev.put_new(key, b"{}", content_type="application/json")
    with pytest.raises(AlreadyExistsError):
        dev.put_new(key, b'{"evil": 1}', content_type="application/json")
    (url,) = dev.presign([put_req(key, 1)])
    # Signed headers: S3 rejects a request without the condition or with another length.
    signed = parse_qs(urlsplit(url["url"]).query)["X-Amz-SignedHeaders"][0].split(";")
    assert {"content-length", "if-none-match"} <= set(signed)
    assert url["headers"] == {"If-None-Match": "*", "Content-Length": "1"}
    resp = HTTP.request("PUT", url["url"], body=b"x", headers=url["headers"])
    assert resp.status == 412
    assert store.get(key).body == b"{}"
    for call in (lambda: dev.put(key, b"x"), lambda: dev.delete(key)):
        with pytest.raises(GatewayDeniedError):
            call()


# -- whole cohorts through the gateway ----------------------------------------------


def _join(devs: dict[str, Participant]) -> str:
    tickets = {c: p.check_in(0) for c, p in devs.items()}
    cfgs = {c: p.wait_for_cohort(tickets[c], timeout_s=30, poll_s=0.05) for c, p in devs.items()}
    assert all(cfgs.values()), cfgs
    (cid,) = {cfg.cohort_id for cfg in cfgs.values() if cfg}
    return cid


def _check_policy(devices: dict[str, RecordingStore], store: S3Store, cid: str) -> set[Kind]:
    """Every op the device code made passes the policy; returns the kinds devices created."""
    cfg = parse_config(store.get(layout.config_key(cid)).body, where=cid)
    facts = access.CohortFacts(frozenset(cfg.members), cfg.mode)
    created = set()
    for client, dev in devices.items():
        assert dev.ops
        for op, target in dev.ops:
            assert access.allowed(client, op, target, cohort=lambda c: facts), (client, op, target)
            if op == "put_new":
                created.add(layout.parse_key(target).kind)
    return created


def _result(store: S3Store, cid: str):  # type: ignore[no-untyped-def]
    key = layout.state_key(cid, Phase.RESULT)
    wait_until(lambda: store.head(key) is not None, 30, "cohort result")
    return parse_result(store.get(key).body, where=key)


def test_plaintext_cohort_with_gateway_only_devices(s3_endpoint: str, store: S3Store) -> None:
    with make_stack(s3_endpoint, store, "plaintext") as st:
        clients = ["pa", "pb", "pc"]
        pairs = {c: enrolled(st, store, c) for c in clients}
        stores = {c: s for c, (s, _) in pairs.items()}
        devs = {
            c: Participant(s, c, mode="plaintext", signing_key=k) for c, (s, k) in pairs.items()
        }
        cid = _join(devs)
        cfg = parse_config(store.get(layout.config_key(cid)).body, where=cid)
        for c, p in devs.items():
            p.upload_plain(cfg, delta_for(c), num_samples=10, loss=0.5)
        res = _result(store, cid)
        assert res.status == "applied" and res.included == clients
        assert find_head(store) == 1
        assert _check_policy(stores, store, cid) == {Kind.CHECKIN, Kind.PLAIN}


def test_secure_cohort_with_gateway_only_devices(gw: LocalStack, store: S3Store) -> None:
    clients = ["sa", "sb", "sc"]
    pairs = {c: enrolled(gw, store, c) for c in clients}
    devs = {c: Participant(s, c, mode="secagg", signing_key=k) for c, (s, k) in pairs.items()}
    cid = _join(devs)
    cfg = parse_config(store.get(layout.config_key(cid)).body, where=cid)
    outcomes: dict[str, str] = {}

    def member(c: str) -> None:
        outcomes[c] = run_secure_cohort(
            devs[c], cfg, lambda c=c: (delta_for(c, TINY, 0.05), 50), poll_s=0.05, slack_s=20
        )

    threads = [threading.Thread(target=member, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes == dict.fromkeys(clients, "completed"), outcomes
    res = _result(store, cid)
    assert res.status == "applied" and res.included == clients
    new, meta, _ = load_model(store, res.version)
    mean = {k: np.mean([delta_for(c, TINY, 0.05)[k] for c in clients], axis=0) for k in TINY}
    for k in TINY:
        np.testing.assert_allclose(new[k] / meta.weight, mean[k], atol=1e-5)
    created = _check_policy({c: s for c, (s, _) in pairs.items()}, store, cid)
    assert created == {
        Kind.CHECKIN, Kind.KEYS, Kind.SHARES, Kind.MASKED, Kind.CONSISTENCY, Kind.UNMASK
    }  # fmt: skip
