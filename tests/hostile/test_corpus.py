"""Every file of the hostile corpus is rejected for its own reason, and the cohort completes.

GIVEN a real cohort (real check-ins, real handler, real S3 events, the moto
server) with one or more members' objects replaced by corpus files (or extra
hostile objects beside them) WHEN the events are delivered THEN each hostile
object has a log line naming its key and the specific reason, no exception
escapes the handler, the hostile members count as dropouts, the cohort applies
a new version from the others, and the version chain stays consistent.
Device-side entries (configs, manifests, a neighbour's shares, models, the
pointer) must make the device refuse with that reason and leave cleanly.

Events are delivered synchronously, in this thread, by ``Lambda.pump``: it
lists the watched prefixes like ``infra.pump.EventPump`` and calls the handler
once per new object, so a handler exception fails the test instead of being
retried, and the run is deterministic.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore import layout
from fedcore.device import LINES
from fedcore.errors import IntegrityError
from fedcore.events import build_event, build_record
from fedcore.layout import Kind, Phase
from fedcore.messages import Manifest, parse_config, parse_manifest
from fedcore.participant import Participant
from fedcore.secure_round import SecureRound, run_secure_cohort
from fedcore.storage import S3Store
from fedcore.versions import read_meta, seed
from functions.aggregator import app as aggregator  # configures fedcore's loggers on import
from infra.pump import LocalContext
from tests.helpers import TINY, assert_consistent, delta_for
from tests.hostile import make_corpus as mc

CORPUS = Path(__file__).resolve().parent / "corpus"
MANIFEST = json.loads((CORPUS / "manifest.json").read_bytes())
ENTRIES: list[dict[str, Any]] = MANIFEST["entries"]
COHORT_GROUPS = sorted(g for g, spec in MANIFEST["groups"].items() if spec["mode"] != "device")


def body(entry: dict[str, Any] | str) -> bytes:
    return (CORPUS / (entry if isinstance(entry, str) else entry["file"])).read_bytes()


def test_corpus_is_large_committed_and_reproducible() -> None:
    """GIVEN the generator THEN its output equals the committed files, byte for byte,
    and the corpus has at least 30 hostile files, each with a boundary, a key and a reason."""
    built = mc.build()
    on_disk = {str(p.relative_to(CORPUS)): p.read_bytes() for p in CORPUS.rglob("*") if p.is_file()}
    assert built.keys() == on_disk.keys()
    assert all(built[k] == on_disk[k] for k in built), "run python -m tests.hostile.make_corpus"
    assert len(ENTRIES) >= 30 and len({e["file"] for e in ENTRIES}) == len(ENTRIES)
    assert all(e["boundary"] and e["expect"] for e in ENTRIES)
    assert all(e["key_template"] or e["role"] == "event" for e in ENTRIES)


# -- driving a cohort through the real handler -------------------------------------


class Lambda:
    """The aggregation function, invoked synchronously once per new object (like S3 would)."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self.handler = aggregator.handler
        self.seen: set[tuple[str, str]] = set()
        self.seq = itertools.count(1)

    def invoke(self, event: Any) -> dict[str, Any]:
        return self.handler(event, LocalContext("aggregator"))

    def pump(self) -> None:
        """Deliver an event for every new object until nothing new appears."""
        while True:
            new = [
                info
                for prefix in (layout.CHECKINS_PREFIX, layout.COHORTS_PREFIX)
                for info in self.store.list(prefix)
                if (info.key, info.etag) not in self.seen
            ]
            if not new:
                return
            for info in new:
                self.seen.add((info.key, info.etag))
                record = build_record(
                    bucket=self.store.bucket, key=info.key, size=info.size, etag=info.etag,
                    sequencer=next(self.seq),
                )  # fmt: skip
                self.invoke(build_event([record]))


@pytest.fixture
def env(store: S3Store, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.setenv("BUCKET", store.bucket)
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_endpoint)
    for name, value in {
        "ROUND_DEADLINE_S": "600", "SHORT_ROUND_S": "600", "CHECKIN_WAIT_S": "600",
        "SECAGG_WEIGHT_CAP": "100", "STUCK_AFTER_S": "600",
        # 5 honest and 4 hostile members (n = 9, k = 8): t = 5 needs no colluder margin
        # (these cohorts test hostile objects, not collusion; tests/adversary does).
        "SECAGG_COLLUDERS": "0",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    return monkeypatch


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """pytest's caplog, also fed by ``fedcore``'s loggers.

    The handler module routes ``fedcore`` through powertools' JSON logger, which
    stops propagation to the root logger that caplog listens on.
    """
    fed = logging.getLogger("fedcore")
    fed.addHandler(caplog.handler)
    try:
        yield caplog
    finally:
        fed.removeHandler(caplog.handler)


def logged(caplog: pytest.LogCaptureFixture, entry: dict[str, Any]) -> logging.LogRecord:
    """The log record that rejects ``entry``: it names the key (if any) and the reason."""
    for r in caplog.records:
        text = f"{r.getMessage()} {getattr(r, 'reason', '')}"
        if entry["expect"] not in text:
            continue
        if entry["role"] == "event" and not entry["key"]:
            return r
        if getattr(r, "key", None) == entry["key"] or entry["key"] in text:
            return r
    seen = [
        (r.getMessage(), getattr(r, "key", None), getattr(r, "reason", None))
        for r in caplog.records
        if r.levelno >= logging.WARNING
    ]
    raise AssertionError(f"{entry['file']}: no log line with {entry['expect']!r}; saw {seen}")


def participants(store: S3Store, mode: str, group: str) -> dict[str, Participant]:
    """The group's devices, enrolled (deterministic keys, as the corpus was signed)."""
    clients = {c for p in MANIFEST["groups"][group]["cohorts"] for c in p["honest"]}
    clients |= {e["client_id"] for e in ENTRIES if e["group"] == group}
    out = {}
    for c in sorted(clients & set(MANIFEST["enrolled"])):
        p = Participant(store, c, mode=mode, signing_key=mc.signing_key(c))
        p.enroll()
        out[c] = p
    return out


def form(store: S3Store, lam: Lambda, env: pytest.MonkeyPatch, members: list[str], mode: str, parts: dict[str, Participant], riders: list[dict[str, Any]], base: int):  # type: ignore[no-untyped-def]  # fmt: skip
    """Hostile check-ins first, then every member's real one; the handler forms the cohort."""
    env.setenv("AGGREGATION_MODE", mode)
    env.setenv("COHORT_SIZE", str(len(members)))
    # secagg: the honest members alone must carry the cohort (and hold t shares of each secret)
    env.setenv("MIN_COHORT_SIZE", str(2 if mode == "plaintext" else len(mc.SECAGG_HONEST)))
    for e in riders:
        if e["role"] == "checkin":
            store.put_new(e["key"], body(e))
    devs = {c: parts[c] for c in members}
    tickets = {c: p.check_in(base) for c, p in devs.items()}
    lam.pump()
    cfgs = {c: devs[c].find_cohort(tickets[c])[0] for c in members}
    cfg = cfgs[members[0]]
    assert cfg is not None and all(x == cfg for x in cfgs.values()), "one cohort of all members"
    assert sorted(cfg.members) == sorted(members)
    return cfg, devs


def place_riders(store: S3Store, lam: Lambda, riders: list[dict[str, Any]]) -> None:
    """Strays and non-members' objects, and malformed events straight to the handler."""
    for e in riders:
        if e["role"] in ("stray", "add"):
            store.put_new(e["key"], body(e))
        elif e["role"] == "event":
            event = json.loads(body(e).replace(mc.BUCKET_TOKEN.encode(), store.bucket.encode()))
            out = lam.invoke(event)
            assert out["outcomes"].get(e["key"], "") in ("", "ignored"), (e["file"], out)


def run_plaintext(store, lam, env, spec, entries, parts):  # type: ignore[no-untyped-def]
    hostile = [e for e in entries if e["role"] == "replace"]
    valid = spec.get("valid", {})
    members = [*spec["honest"], *[e["client_id"] for e in hostile], *valid]
    riders = [e for e in entries if e["role"] != "replace"]
    cfg, devs = form(store, lam, env, members, "plaintext", parts, riders, spec["base_version"])
    place_riders(store, lam, riders)
    for c in spec["honest"]:
        devs[c].upload_plain(cfg, delta_for(c), num_samples=10, loss=0.5)
    for e in hostile:
        store.put_new(e["key"], body(e))
    for c, f in valid.items():
        store.put_new(layout.member_key(cfg.cohort_id, Kind.PLAIN, c), body(f))
    lam.pump()
    return cfg, sorted([*spec["honest"], *valid])


def run_secagg(store, lam, env, spec, entries, parts):  # type: ignore[no-untyped-def]
    """The rounds, step by step: honest members play, hostile slots get corpus files."""
    hostile = {e["client_id"]: e for e in entries if e["role"] == "replace"}
    members = [*spec["honest"], *hostile]
    riders = [e for e in entries if e["role"] != "replace"]
    cfg, devs = form(store, lam, env, members, "secagg", parts, riders, spec["base_version"])
    rounds = {c: SecureRound(devs[c], cfg) for c in members}
    cid = cfg.cohort_id

    def step(phase: Phase, expected: list[str], act) -> Manifest:  # type: ignore[no-untyped-def]
        for c in expected:
            if c in hostile and hostile[c]["phase"] == phase.value:
                store.put_new(hostile[c]["key"], body(hostile[c]))
            else:
                act(c)
        if phase is Phase.INPUTS:
            place_riders(store, lam, riders)
        lam.pump()
        key = layout.state_key(cid, phase)
        return parse_manifest(store.get(key).body, where=key)

    u1 = step(Phase.KEYS, members, lambda c: rounds[c].advertise())
    u2 = step(Phase.SHARES, u1.members, lambda c: rounds[c].share(u1))
    u3 = step(
        Phase.INPUTS,
        u2.members,
        lambda c: rounds[c].upload(u2, delta_for(c, TINY, 0.05), num_samples=10),
    )
    for c in u3.members:  # round 3b: every survivor signs U3 (no manifest of its own)
        rounds[c].sign_inputs(u3)
    u4 = step(Phase.UNMASK, u3.members, lambda c: rounds[c].unmask(u2, u3))
    for c, e in hostile.items():
        assert c not in {"keys": u1, "shares": u2, "inputs": u3, "unmask": u4}[e["phase"]].members
    late = [c for c, e in hostile.items() if e["phase"] == "unmask"]  # their inputs count
    return cfg, sorted([*spec["honest"], *late])


@pytest.mark.parametrize("group", COHORT_GROUPS)
def test_hostile_members_are_dropouts_and_the_cohort_completes(
    group: str, store: S3Store, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """GIVEN the cohorts planned for ``group`` with the group's corpus files in place of
    (or beside) members' objects THEN every file is rejected with its reason, its member
    is a dropout, and each cohort applies exactly one new version from the others."""
    spec = MANIFEST["groups"][group]
    lam = Lambda(store)
    parts = participants(store, spec["mode"], group)
    applied: set[str] = set()
    run = run_plaintext if spec["mode"] == "plaintext" else run_secagg
    with caplog.at_level(logging.INFO):
        for plan in spec["cohorts"]:
            entries = [
                e for e in ENTRIES if e["group"] == group and e["cohort_id"] == plan["cohort_id"]
            ]
            caplog.clear()
            cfg, included = run(store, lam, env, plan, entries, parts)
            assert cfg.cohort_id == plan["cohort_id"] and cfg.base_version == plan["base_version"]
            res = Participant(store, "ok1", mode="plaintext").result(cfg.cohort_id)
            assert res is not None and res.status == "applied", res
            assert res.version == plan["base_version"] + 1 and res.included == included
            meta = read_meta(store, res.version)
            assert meta.cohorts == [cfg.cohort_id] and meta.members == included
            for e in entries:
                r = logged(caplog, e)
                if e["role"] in ("replace", "add"):
                    assert (r.cohort_id, r.client_id) == (cfg.cohort_id, e["client_id"]), e["file"]  # type: ignore[attr-defined]
                if e["role"] == "replace" and e["phase"] != "unmask":
                    assert e["client_id"] in meta.metrics["dropouts"], e["file"]
                if e["role"] == "add":
                    assert e["client_id"] not in meta.members
            applied.add(cfg.cohort_id)
    assert_consistent(store, applied)


# -- device side ---------------------------------------------------------------------

DEVICE = [e for e in ENTRIES if e["group"] == "device"]


def _ids(entries: list[dict[str, Any]]) -> list[str]:
    return [e["file"] for e in entries]


@pytest.fixture
def devices(store: S3Store) -> dict[str, Participant]:
    out = {}
    for d in mc.DEVICES:
        out[d] = Participant(store, d, mode="secagg", signing_key=mc.signing_key(d))
        out[d].enroll()
    return out


def _abandons(d1: Participant, cfg, caplog, train=None) -> str:  # type: ignore[no-untyped-def]
    """The device's lines while it plays ``cfg``, which it must abandon."""

    def no_training():  # type: ignore[no-untyped-def]
        raise AssertionError("the device trained in a cohort it should have left")

    caplog.clear()
    outcome = run_secure_cohort(d1, cfg, train or no_training, poll_s=0.01, slack_s=0.5)
    said = [r.getMessage() for r in caplog.records if r.name == LINES]
    assert outcome == "abandoned", said
    return " ".join(said)


def test_device_rejects_hostile_reads_and_leaves_cleanly(
    store: S3Store, devices: dict[str, Participant], caplog: pytest.LogCaptureFixture
) -> None:
    """GIVEN each device-side corpus file where a device reads it (a cohort config, a
    phase manifest, a neighbour's share message, the base model, the pointer) THEN the
    device refuses it with the entry's reason and leaves the cohort without crashing."""
    d1 = devices["d1"]
    caplog.set_level(logging.INFO)
    for e in DEVICE:
        caplog.clear()
        reader, cid = e["reader"], e["cohort_id"]
        if reader == "find_cohort":
            ticket = d1.check_in(0)
            store.put_new(e["key"], body(e))
            found, _ = d1.find_cohort(ticket)
            assert found is None, e["file"]
            logged(caplog, e)
            store.delete(ticket.key)
        elif reader == "run_secure_cohort" and e["key"].endswith("config.json"):
            cfg = parse_config(body(e), where=e["key"])
            assert e["expect"] in _abandons(d1, cfg, caplog), e["file"]
        elif reader == "run_secure_cohort" and "/state/" in e["key"]:
            store.put_new(e["key"], body(e))
            assert e["expect"] in _abandons(d1, mc.device_config(cid), caplog), e["file"]
        elif reader == "run_secure_cohort":  # a corrupt base model, read when training starts
            cfg = mc.device_config(cid, base_version=e["extra"]["base_version"])
            store.put_new(e["key"], body(e))
            for d in ("d2", "d3"):
                SecureRound(devices[d], cfg).advertise()
            store.put_new(layout.state_key(cid, Phase.KEYS), mc.manifest_doc(cid, "keys", mc.DEVICES))  # fmt: skip
            text = _abandons(d1, cfg, caplog, lambda v=cfg.base_version: (d1.fetch_model(v), 10))
            assert e["expect"] in text, (e["file"], text)
        elif reader == "unmask":
            _neighbour_share(store, devices, e)
            logged(caplog, e)
        elif reader == "poll_latest":
            store.put(layout.LATEST_KEY, body(e))
            with pytest.raises(IntegrityError, match=re.escape(e["expect"])):
                Participant(store, "d1", mode="plaintext").poll_latest()
        else:  # pragma: no cover - the manifest names a reader this test does not know
            raise AssertionError(f"unknown reader {reader!r}")


def _neighbour_share(store: S3Store, devices: dict[str, Participant], e: dict[str, Any]) -> None:
    """d1 unmasks with d2's share slot holding the corpus file: it skips d2, still reveals."""
    cid = e["cohort_id"]
    # t = 2: d1 and d3 survive (the unmask path is under test, not the threshold floor).
    cfg = mc.device_config(cid, t=2)
    rounds = {d: SecureRound(devices[d], cfg) for d in mc.DEVICES}
    for r in rounds.values():
        r.advertise()
    u1 = Manifest(cid, "keys", mc.DEVICES, {}, "all-members", 0.0)
    rounds["d1"].share(u1)
    rounds["d3"].share(u1)
    store.put_new(e["key"], body(e))
    u2 = Manifest(cid, "shares", mc.DEVICES, {}, "all-members", 0.0)
    rounds["d1"].upload(u2, delta_for("d1", TINY), num_samples=10)
    u3 = Manifest(cid, "inputs", ["d1", "d3"], {}, "all-members", 0.0)
    for d in u3.members:  # round 3b: the survivors sign U3 before anyone reveals
        rounds[d].sign_inputs(u3)
    key = rounds["d1"].unmask(u2, u3)  # d2 dropped: d1 owes its key share, but cannot read it
    assert store.head(key) is not None
