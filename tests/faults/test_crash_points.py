"""Crash-point tests: the function dies before or after each of its storage calls.

For every storage call site in the aggregation and sweeper functions' code (found
statically, so a new call site that no scenario reaches fails the coverage test), a
scenario is run in which the invocation that first reaches the site is killed there,
before the call or right after it; the event is then redelivered, as Lambda retries a
failed asynchronous invocation. Afterwards the bucket must hold one linear version
chain, every completed cohort applied exactly once with the members it should count,
and no leftover that blocks the next cohort.

Events are delivered synchronously here (a listing-based source like the local pump,
without its threads) so each run is deterministic; the functions run through their real
handlers on the moto server, with the coordinator's store wrapped by ``CrashingStore``
and its clock advanced instead of waiting out deadlines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import pytest

from fedcore import layout, versions
from fedcore.codec import ModelMeta, decode_update
from fedcore.device import SecureRound, manifest_fault, not_admitted
from fedcore.layout import Phase
from fedcore.messages import CohortConfig, Manifest
from fedcore.participant import Participant
from fedcore.storage import NotFoundError, S3Store
from fedcore.versions import find_head, load_model, seed
from tests.crashpoints import CrashingStore, Killed, Site, call_sites, imported_files
from tests.helpers import TINY, assert_consistent, connect, delta_for, participant
from tests.replay import replay_chain
from tests.sync_functions import SyncFunctions

# Everything the two functions run: their handlers and every project module those
# import (found statically, so a new module is scanned without being listed here).
FUNCTION_FILES = imported_files(["functions/aggregator/app.py", "functions/sweeper/app.py"])
# (file, function, store method) -> why neither function ever reaches that call.
NOT_IN_FUNCTIONS = {
    ("fedcore/versions.py", "seed", "*"): "bootstrap: the operator seeds version 0",
    ("fedcore/versions.py", "advance_pointer", "put_new"): (
        "creates the pointer, which only seeding does: the functions read it first"
    ),
    ("fedcore/status.py", "describe", "*"): "the device CLI's status view",
    ("fedcore/status.py", "_progress", "*"): "the status view's open cohorts (the demo's)",
}
ROUNDS = ("keys", "shares", "inputs", "unmask", "end")
ROUND_S = 30.0  # deadlines are passed by advancing the coordinator's clock, never by waiting


def crash_harness(
    store: S3Store, settings: dict[str, Any], mp: pytest.MonkeyPatch
) -> SyncFunctions:
    h = SyncFunctions(store, settings, mp, function_store=CrashingStore(store, function_sites()))
    mp.setattr(versions, "_HEADER_PROBE", 64)  # take the long-header path of read_header too
    return h


def function_sites() -> list[Site]:
    return [
        s
        for s in call_sites(FUNCTION_FILES)
        if (s.path, s.function, "*") not in NOT_IN_FUNCTIONS
        and (s.path, s.function, s.method) not in NOT_IN_FUNCTIONS
    ]


SETTINGS = {
    "cohort_size": 4,
    "min_cohort_size": 3,
    "short_round_s": ROUND_S,
    "round_deadline_s": ROUND_S,
    "checkin_wait_s": ROUND_S,
    "checkin_ttl_s": 1e6,  # the clock only moves forward: expire check-ins last
    "stuck_after_s": ROUND_S,
    "secagg_weight_cap": 100,
}
# A stateful server optimizer in each mode, so a crash at every call site also hits the
# optimizer state's write and read; the chain is then replayed (tests/replay.py) to show
# no state was applied twice or lost.
OPTIMIZERS = {
    "plaintext": {"server_optimizer": "fedavgm", "server_momentum": 0.9},
    "secagg": {"server_optimizer": "fedadam", "server_lr": 0.05},
}


def plaintext_cohort(h: SyncFunctions, clients: list[str], *, late: int = 0) -> CohortConfig:
    """A plaintext cohort in which every member uploads; the last ``late`` members upload
    only after the inputs deadline has closed the phase (and the cohort applied)."""
    parts = [participant(h.store, c) for c in clients]
    cfg = h.join(parts)
    for i, p in enumerate(parts[: len(parts) - late]):
        p.upload_plain(cfg, delta_for(p.client_id), num_samples=10 + i, loss=0.5)
    h.deliver()
    if late:
        h.sweep(advance_s=ROUND_S + 1)
        for p in parts[len(parts) - late :]:
            p.upload_plain(cfg, delta_for(p.client_id), num_samples=5, loss=0.5)
        h.deliver()  # late objects: not counted (the size check reads their HEAD)
    return cfg


def secure_cohort(h: SyncFunctions, clients: list[str], *, gone: dict[str, str]) -> CohortConfig:
    """A secure cohort; ``gone`` maps members to the round they vanish before."""
    parts = {c: participant(h.store, c, "secagg") for c in clients}
    cfg = h.join(list(parts.values()))
    rounds = {c: SecureRound(p, cfg) for c, p in parts.items()}

    def live(phase: str) -> list[tuple[str, SecureRound]]:
        return [
            (c, r)
            for c, r in rounds.items()
            if ROUNDS.index(gone.get(c, "end")) > ROUNDS.index(phase)
        ]

    def close(phase: Phase) -> Manifest | None:
        h.deliver()
        if h.result(cfg) is None and h.store.head(layout.state_key(cfg.cohort_id, phase)) is None:
            h.sweep(advance_s=ROUND_S + 1)  # someone is missing: the deadline closes the round
        try:
            return h.manifest(cfg, phase)
        except NotFoundError:
            return None

    for _, r in live("keys"):
        r.advertise()
    if (u1 := close(Phase.KEYS)) is None or h.result(cfg) is not None:
        return cfg
    for _, r in live("shares"):
        r.share(u1)
    if (u2 := close(Phase.SHARES)) is None or h.result(cfg) is not None:
        return cfg
    for c, r in live("inputs"):
        r.upload(u2, delta_for(c, TINY, 0.05), num_samples=50)
    if (u3 := close(Phase.INPUTS)) is None or h.result(cfg) is not None:
        return cfg
    for _, r in live("unmask"):  # round 3b: the survivors sign U3 before anyone reveals
        r.sign_inputs(u3)
    for _, r in live("unmask"):
        r.unmask(u2, u3)
    close(Phase.UNMASK)
    return cfg


def assert_applied(h: SyncFunctions, cfg: CohortConfig, members: list[str]) -> None:
    res = h.result(cfg)
    assert res is not None and res.status == "applied", res
    assert res.included == sorted(members)
    new, meta, _ = load_model(h.store, res.version)
    old, _, _ = load_model(h.store, res.version - 1)
    assert cfg.cohort_id in meta.cohorts
    assert any(not np.array_equal(new[k], old[k]) for k in TINY)


def cohort_mean(h: SyncFunctions, meta: ModelMeta) -> dict[str, np.ndarray]:
    """The mean the version ``meta`` should have applied, from what its members sent:
    plaintext uploads read back and weighted by their sample counts; secure members all
    sent ``delta_for(c, TINY, 0.05)`` with 50 samples (equal weights)."""
    (cid,) = meta.cohorts
    if h.settings.mode == "secagg":
        deltas = [(1.0, delta_for(c, TINY, 0.05)) for c in meta.members]
    else:
        schema = versions.read_schema(h.store, 0)
        deltas = []
        for c in meta.members:
            key = layout.member_key(cid, layout.Kind.PLAIN, c)
            delta, up = decode_update(h.store.get(key).body, where=key, schema=schema)
            deltas.append((float(up.num_samples), delta))
    total = sum(w for w, _ in deltas)
    return {k: sum(w * d[k].astype(np.float64) for w, d in deltas) / total for k in TINY}


def run_scenario(h: SyncFunctions, mode: str) -> set[str]:
    """Cohorts covering every path of the functions; returns the cohorts that must apply."""
    applied = set()
    h.crashing.mode = mode
    if h.settings.mode == "plaintext":
        # A check-in in the wrong mode is rejected (and deleted) at formation.
        wrong = participant(h.store, "w00", "secagg")
        wrong.check_in(find_head(h.store))
        cfg = plaintext_cohort(h, ["p00", "p01", "p02", "p03"])
        assert_applied(h, cfg, ["p00", "p01", "p02", "p03"])
        applied.add(cfg.cohort_id)
        # A member whose upload arrives after the deadline closed the phase is not counted.
        cfg = plaintext_cohort(h, ["r00", "r01", "r02", "r03"], late=1)
        assert_applied(h, cfg, ["r00", "r01", "r02"])
        applied.add(cfg.cohort_id)
        # Two check-ins form a partial cohort at the check-in deadline.
        parts = [participant(h.store, c) for c in ("q00", "q01", "q02")]
        tickets = {p.client_id: p.check_in(find_head(h.store)) for p in parts}
        h.deliver()
        h.sweep(advance_s=ROUND_S + 1)
        cfg = parts[0].find_cohort(tickets["q00"])[0]
        assert cfg is not None and sorted(cfg.members) == ["q00", "q01", "q02"]
        for p in parts:
            p.upload_plain(cfg, delta_for(p.client_id), num_samples=20, loss=0.5)
        h.deliver()
        assert_applied(h, cfg, ["q00", "q01", "q02"])
        applied.add(cfg.cohort_id)
    else:
        cfg = secure_cohort(h, ["s00", "s01", "s02", "s03"], gone={"s03": "inputs"})
        assert_applied(h, cfg, ["s00", "s01", "s02"])
        applied.add(cfg.cohort_id)
        cfg = secure_cohort(h, ["t00", "t01", "t02", "t03"], gone={"t02": "keys", "t03": "keys"})
        res = h.result(cfg)
        assert res is not None and res.status == "aborted", res
    # Nothing left behind blocks progress: a clean cohort forms and applies.
    h.crashing.mode = None
    clean = ["z00", "z01", "z02", "z03"]
    if h.settings.mode == "plaintext":
        cfg = plaintext_cohort(h, clean)
    else:
        cfg = secure_cohort(h, clean, gone={})
    assert_applied(h, cfg, clean)
    applied.add(cfg.cohort_id)
    # A lone check-in expires.
    h.crashing.mode = mode
    participant(h.store, "x00").check_in(find_head(h.store))
    h.deliver()
    h.sweep(advance_s=2e6)
    return applied


@pytest.mark.parametrize("when", ["before", "after"])
def test_function_recovers_from_a_crash_at_every_call_site(
    s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """GIVEN the functions killed the first time they reach each storage call site (before
    or after the call) WHEN each event is redelivered THEN every cohort ends once, the
    chain is linear, nothing is left behind, a clean cohort afterwards applies, and every
    call site in the functions' code was crashed at (a new call site needs a scenario)."""
    crashed: set[Site] = set()
    for mode in ("plaintext", "secagg"):
        store = connect(f"crash-{when}-{mode}-{time.time_ns()}", s3_endpoint)
        store.ensure_bucket()
        seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
        h = crash_harness(store, {**SETTINGS, **OPTIMIZERS[mode], "mode": mode}, monkeypatch)
        applied = run_scenario(h, when)
        assert 0 < h.kills <= h.crashing.crash_points
        assert_consistent(store, applied)
        assert replay_chain(store, h.settings.optimizer, partial(cohort_mean, h), atol=1e-5)
        left = [i.key for i in store.list(layout.CHECKINS_PREFIX)]
        assert left == [], f"check-ins left behind: {left}"
        crashed |= h.crashing.crashed
    missing = sorted(map(str, set(function_sites()) - crashed))
    assert not missing, f"storage call sites never crashed {when} the call:\n" + "\n".join(missing)


# -- the device --------------------------------------------------------------------

DEVICE_FILES = ["fedcore/participant.py", "fedcore/device/secure.py"]


class Device:
    """A synthetic secure-aggregation device whose process can be killed at any store call.

    What survives a restart is what a real device keeps on disk: its id and signing key
    (enrolled, write-once). Cohort secrets live only in memory, so a device killed
    mid-cohort cannot resume it: it abandons the cohort (the function counts it as a
    dropout) and checks in afresh.
    """

    def __init__(self, store: CrashingStore, client: str) -> None:
        self.store = store
        self.client = client
        self.restarts = 0
        self.boot()

    def boot(self) -> None:
        self.p: Participant | None = None
        self.ticket: Any = None
        self.round: SecureRound | None = None
        try:
            self.p = participant(self.store, self.client, "secagg")  # type: ignore[arg-type]
        except Killed:
            self.restart()

    def restart(self) -> None:
        self.restarts += 1
        self.boot()

    def step(self, fn: Callable[[], Any]) -> Any:
        """Run one device action; a kill makes the device restart and drop its cohort."""
        if self.p is None:
            self.boot()
            return None
        try:
            return fn()
        except Killed:
            self.restart()
            return None


def device_cohort(h: SyncFunctions, devices: list[Device]) -> CohortConfig | None:
    """Every live device checks in and plays the rounds; kills land wherever they land."""
    head = find_head(h.store)
    for d in devices:  # a device waits on its pending check-in rather than adding one
        if d.ticket is None or not d.step(lambda d=d: d.p.checkin_pending(d.ticket)):
            d.ticket = d.step(lambda d=d: d.p.check_in(head))
    h.deliver()
    joined: dict[str, tuple[Device, CohortConfig]] = {}
    for attempt in range(2):
        for d in devices:
            if d.ticket is not None and d.p is not None:
                cfg = d.step(lambda d=d: d.p.find_cohort(d.ticket)[0])
                if cfg is not None:
                    joined[d.client] = (d, cfg)
        if joined or attempt:
            break
        h.sweep(advance_s=ROUND_S + 1)  # killed devices left it short: a partial cohort
    if not joined:
        return None
    cfg = next(iter(joined.values()))[1]
    members = {c: d for c, (d, x) in joined.items() if x.cohort_id == cfg.cohort_id}
    for d in members.values():
        d.round = d.step(lambda d=d: SecureRound(d.p, cfg))

    def live() -> list[Device]:
        return [d for d in members.values() if d.p is not None and d.round is not None]

    def close(phase: Phase) -> dict[str, Manifest]:
        h.deliver()
        if h.result(cfg) is None and h.store.head(layout.state_key(cfg.cohort_id, phase)) is None:
            h.sweep(advance_s=ROUND_S + 1)
        seen = {}
        for d in live():
            m = d.step(lambda d=d: d.p.manifest(cfg.cohort_id, phase))
            if m is None or manifest_fault(m, cfg, phase) or not_admitted(m, cfg, d.client):
                d.round = None  # abandon, as the device machine does
            else:
                seen[d.client] = m
        return seen

    def act(fn: Callable[[Device], Any]) -> None:
        for d in live():
            if d.step(lambda d=d: fn(d) or True) is None:
                d.round = None

    act(lambda d: d.round.advertise())
    u1 = close(Phase.KEYS)
    act(lambda d: d.round.share(u1[d.client]))
    u2 = close(Phase.SHARES)
    act(lambda d: d.round.upload(u2[d.client], delta_for(d.client, TINY, 0.05), num_samples=50))
    u3 = close(Phase.INPUTS)
    act(lambda d: d.round.sign_inputs(u3[d.client]))  # round 3b
    act(lambda d: d.round.unmask(u2[d.client], u3[d.client]))
    close(Phase.UNMASK)
    h.sweep(advance_s=ROUND_S + 1)  # a round that ended short closes; aborts are recorded
    for d in live():
        d.step(lambda d=d: d.p.result(cfg.cohort_id))
    return cfg


@pytest.mark.parametrize("when", ["before", "after"])
def test_device_killed_at_every_call_site_abandons_cleanly(
    store: S3Store, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """GIVEN devices killed the first time they reach each storage call of the protocol
    (before or after it) WHEN they restart THEN each cohort either applies without them
    or aborts, nothing is applied twice, and once the kills stop a full cohort applies."""
    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    h = crash_harness(store, {**SETTINGS, "mode": "secagg"}, monkeypatch)
    dev_store = CrashingStore(store, call_sites(DEVICE_FILES))
    dev_store.mode = when
    devices = [Device(dev_store, f"d{i:02d}") for i in range(4)]
    for _ in range(12):
        before = len(dev_store.crashed)
        device_cohort(h, devices)
        if len(dev_store.crashed) == before:
            break  # a whole cohort without a new kill: every reachable point is done
    dev_store.mode = None
    # Check-ins left by devices killed right after writing them may fill one more cohort,
    # which aborts when nobody plays it; then the devices' fresh check-ins form theirs.
    for _ in range(3):
        cfg = device_cohort(h, devices)
        res = h.result(cfg) if cfg is not None else None
        if cfg is not None and res is not None and res.status == "applied":
            break
    assert cfg is not None
    assert_applied(h, cfg, [d.client for d in devices])
    results = [participant(store, "reader").result(c) for c in h_cohorts(store)]
    assert all(r is not None for r in results), "a cohort was left open"
    assert_consistent(store, {r.cohort_id for r in results if r.status == "applied"})
    assert sum(d.restarts for d in devices) >= len(dev_store.crashed)
    writes = {s for s in call_sites(DEVICE_FILES) if s.method == "put_new"} - {
        s for s in call_sites(DEVICE_FILES) if s.function == "Participant.upload_plain"
    }
    assert writes <= dev_store.crashed, f"device writes never killed: {writes - dev_store.crashed}"


def h_cohorts(store: S3Store) -> list[str]:
    return [p[len(layout.COHORTS_PREFIX) : -1] for p in store.list_prefixes(layout.COHORTS_PREFIX)]
