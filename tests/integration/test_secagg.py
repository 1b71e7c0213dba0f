"""Secure aggregation end to end: real handlers, real S3 events, a real S3 API.

Ten synthetic devices per cohort (no torch) run the four rounds; some vanish
at a chosen point; the applied version must equal the plaintext weighted mean
of the members that were counted, within the quantization bound.

The stack runs on a ``ManualClock``: a round that dropouts left open is closed by
advancing the clock past its deadline once every member still expected in it has
written or is gone (``close_rounds_left_open``), never by waiting it out, so a
slow machine can neither close a round on an honest member nor make a test wait.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pytest

from fedcore import layout
from fedcore.clock import ManualClock
from fedcore.codec import encode_tensors
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, parse_manifest
from fedcore.secagg import crypto
from fedcore.secagg.protocol import MASKED_TENSOR, MaskedMeta, masked_metadata
from fedcore.secure_round import run_secure_cohort
from fedcore.storage import S3Store
from fedcore.versions import find_head, load_model, seed
from infra.stack import LocalStack
from tests.helpers import (
    TINY,
    assert_consistent,
    both_backends,
    delta_for,
    join_all,
    participant,
    wait_until,
)

N = 10
WEIGHT_CAP = 100
ROUND_S = 5.0  # on the stack's ManualClock; the devices give up after 4 * ROUND_S + 20 real s
# The secure rounds in order, with the per-member object each collects.
# On a clock that stands still the scheduled sweeps find nothing due; advance() sweeps
# when the test moves the clock, so the timer is only there as it is in production.
SWEEP_S = 3600.0
ROUNDS = ((Phase.KEYS, Kind.KEYS), (Phase.SHARES, Kind.SHARES), (Phase.INPUTS, Kind.MASKED),
          (Phase.UNMASK, Kind.UNMASK))  # fmt: skip
SAMPLES = {f"s{i:02d}": 10 + 5 * i for i in range(N)}


@pytest.fixture
def stack(s3_endpoint: str, store: S3Store, notifications):  # type: ignore[no-untyped-def]
    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    settings = {
        "mode": "secagg",
        "cohort_size": N,
        "min_cohort_size": 5,
        "short_round_s": ROUND_S,
        "round_deadline_s": ROUND_S,
        "secagg_weight_cap": WEIGHT_CAP,
        "stuck_after_s": 5.0,
    }
    with LocalStack(
        endpoint_url=s3_endpoint, bucket=store.bucket, settings=settings, sweep_interval_s=SWEEP_S,
        duplicate=True, shuffle=True, seed=3, notifications=notifications, clock=ManualClock(),
    ) as st:  # fmt: skip
        yield st


def close_rounds_left_open(
    stack: LocalStack,
    store: S3Store,
    cfg: CohortConfig,
    threads: dict[str, threading.Thread],
    timeout_s: float = 600.0,  # a hang guard only: a loaded 2-core machine needs minutes
) -> None:
    """Advance the stack's clock past each round's deadline that only its deadline can close.

    That is a round in which every member still expected (the previous round's
    manifest) has written its object or is gone (its thread ended), and at least
    one of them is gone without writing. A round everyone wrote closes on its own
    event; advancing then could let that close stamp the old time and the jump
    make the next round overdue at once. Returns when the cohort has a result.
    """
    cid = cfg.cohort_id
    stop = time.monotonic() + timeout_s
    while store.head(layout.state_key(cid, Phase.RESULT)) is None:
        if time.monotonic() > stop:
            raise AssertionError(f"{cid}: no result after {timeout_s}s")
        expected = sorted(cfg.members)
        for phase, kind in ROUNDS:
            key = layout.state_key(cid, phase)
            if store.head(key) is not None:
                expected = parse_manifest(store.get(key).body, where=key).members
                continue
            written = {i.key for i in store.list(layout.member_prefix(cid, kind))}
            pending = [c for c in expected if layout.member_key(cid, kind, c) not in written]
            if pending and not any(threads[c].is_alive() for c in pending):
                stack.advance(ROUND_S)
            break
        time.sleep(0.05)


def run_cohort(
    stack: LocalStack, store: S3Store, version: int, drops: dict[str, str], *, before_upload=None
) -> tuple[CohortConfig, dict[str, str]]:  # type: ignore[no-untyped-def]
    clients = sorted(SAMPLES)
    cfgs = join_all(store, clients, version, mode="secagg")
    cfg = cfgs[clients[0]]
    assert {c.cohort_id for c in cfgs.values()} == {cfg.cohort_id}
    outcomes: dict[str, str] = {}

    def member(c: str) -> None:
        outcomes[c] = run_secure_cohort(
            participant(store, c, "secagg"), cfg, lambda c=c: (delta_for(c, TINY, 0.05), SAMPLES[c]),
            drop_at=drops.get(c), poll_s=0.05, slack_s=20,
        )  # fmt: skip

    # Daemons: a device still waiting after a failed assertion must not hold up the session.
    threads = {c: threading.Thread(target=member, args=(c,), daemon=True) for c in clients}
    for t in threads.values():
        t.start()
    if before_upload:
        before_upload(cfg)
    close_rounds_left_open(stack, store, cfg, threads)
    for t in threads.values():
        t.join()
    return cfg, outcomes


def expected_mean(members: list[str]) -> dict[str, np.ndarray]:
    weights = {c: min(SAMPLES[c], WEIGHT_CAP) / WEIGHT_CAP for c in members}
    total = sum(weights.values())
    return {
        k: sum(weights[c] * delta_for(c, TINY, 0.05)[k].astype(np.float64) for c in members) / total
        for k in TINY
    }


def check_applied(store: S3Store, cfg: CohortConfig, survivors: list[str], before: int) -> None:
    res = participant(store, "s00").result(cfg.cohort_id)
    assert res is not None and res.status == "applied", res
    assert res.included == sorted(survivors)
    new, meta, _ = load_model(store, res.version)
    old, _, _ = load_model(store, res.version - 1)
    mean = expected_mean(survivors)
    # Quantization: |error| < n * step / sum(w) per coordinate (fedcore.secagg.quantize).
    step = 2.0 / (2**28 - 1)
    bound = len(survivors) * step / sum(min(SAMPLES[c], WEIGHT_CAP) / WEIGHT_CAP for c in survivors)
    for k in TINY:
        got = (new[k].astype(np.float64) - old[k]) / meta.weight
        np.testing.assert_allclose(got, mean[k], atol=bound * 4 + 1e-7, rtol=1e-5)
    assert find_head(store) == before + 1


CASES = [(0.0, "inputs")] + [(f, r) for f in (0.2, 0.3) for r in ("keys", "shares", "inputs")]


def test_dropouts_at_each_round_match_plaintext_mean(stack, store: S3Store) -> None:  # type: ignore[no-untyped-def]
    """GIVEN cohorts of 10 with 0%, 20% and 30% of members vanishing before advertising
    keys, after sharing them, or after uploading WHEN the sweeper closes the rounds at their
    deadlines THEN every cohort applies, and the new version equals the plaintext weighted
    mean of the members in U3 within the quantization bound."""
    clients = sorted(SAMPLES)
    for i, (fraction, where) in enumerate(CASES):
        dropped = clients[1 : 1 + round(fraction * N)]
        cfg, outcomes = run_cohort(stack, store, i, {c: where for c in dropped})
        # Members who vanish after uploading are still in the sum (their self masks are
        # reconstructed from their neighbours' shares); the others are not.
        survivors = clients if where == "inputs" else [c for c in clients if c not in dropped]
        check_applied(store, cfg, survivors, i)
        assert all(outcomes[c] == "dropped" for c in dropped)
    stack.pump.drain()
    assert stack.pump.stats.dead_letters == []
    assert_consistent(store)


@both_backends
def test_forty_percent_dropout_applies_with_self_held_shares(stack, store: S3Store) -> None:  # type: ignore[no-untyped-def]
    """GIVEN 4 of 10 vanishing after sharing keys (k = 9, t = 6 of 10 holders) THEN every
    survivor's self mask is rebuilt from 5 other survivors plus its own share, and the
    cohort applies the survivors' mean (regression: the demo aborted a cohort of 5 with
    2 dropouts when members did not hold their own shares). On SeaweedFS every step ran
    on an event from its webhook bridge, each delivered twice and shuffled."""
    clients = sorted(SAMPLES)
    dropped = clients[:4]
    cfg, outcomes = run_cohort(stack, store, 0, {c: "shares" for c in dropped})
    check_applied(store, cfg, clients[4:], 0)
    assert all(outcomes[c] == "dropped" for c in dropped)
    assert all(outcomes[c] == "completed" for c in clients[4:]), outcomes
    stack.pump.drain()
    assert stack.pump.listing is (stack.notifications is None) and stack.pump.stats.events > 0
    assert stack.pump.stats.dead_letters == []
    assert_consistent(store, {cfg.cohort_id})


def test_too_few_survivors_aborts_and_next_cohort_proceeds(stack, store: S3Store, caplog) -> None:  # type: ignore[no-untyped-def]
    """GIVEN 6 of 10 vanish after sharing (4 < minimum 5) THEN the cohort aborts without an
    unmask round (no share is revealed) and the next cohort applies normally."""
    clients = sorted(SAMPLES)
    cfg, _ = run_cohort(stack, store, 0, {c: "shares" for c in clients[:6]})
    res = participant(store, "s00").result(cfg.cohort_id)
    assert res is not None and res.status == "aborted" and "minimum" in res.reason
    assert list(store.list(layout.member_prefix(cfg.cohort_id, Kind.UNMASK))) == []
    assert find_head(store) == 0
    cfg2, _ = run_cohort(stack, store, 0, {})
    check_applied(store, cfg2, clients, 0)


def _forge_masked(
    store: S3Store, cfg: CohortConfig, victim: str, *, cohort_id: str, key: bytes
) -> None:
    vec = np.random.default_rng(0).integers(
        0, 2**32, size=sum(int(np.prod(s)) for s in TINY.values()) + 1, dtype=np.uint32
    )
    import hashlib

    meta = MaskedMeta(
        cohort_id,
        victim,
        cfg.base_version,
        int(vec.size),
        hashlib.sha256(vec.tobytes()).hexdigest(),
    )
    blob = encode_tensors({MASKED_TENSOR: vec}, masked_metadata(meta, key))
    store.put_new(layout.member_key(cfg.cohort_id, Kind.MASKED, victim), blob)


@pytest.mark.parametrize(
    "attack", ["wrong-signature", "replayed-from-other-cohort", "forged-shares"]
)
def test_hostile_objects_are_rejected_as_dropouts(
    stack, store: S3Store, caplog, attack: str
) -> None:  # type: ignore[no-untyped-def]
    """GIVEN one member's slot filled by a forged object (a masked upload signed by another
    key, a masked upload that names another cohort, or shares with a bad signature)
    THEN it is rejected with a log line naming the object and the reason, the member is
    treated as a dropout, and the cohort applies the honest members' mean."""
    clients = sorted(SAMPLES)
    victim = "s03"
    mallory = crypto.ed25519_keypair()[0]

    def inject(cfg: CohortConfig) -> None:
        if attack == "forged-shares":
            key = layout.member_key(cfg.cohort_id, Kind.SHARES, victim)
            wait_until(
                lambda: store.head(layout.state_key(cfg.cohort_id, Phase.KEYS)) is not None,
                20,
                "U1",
            )
            store.put_new(
                key,
                b'{"cohort_id":"%s","client_id":"%s","self_commit":"%s","ciphertexts":{},"signature":"%s"}'
                % (
                    cfg.cohort_id.encode(),
                    victim.encode(),
                    b"0" * 64,
                    crypto.b64(b"\0" * 64).encode(),
                ),
            )
        elif attack == "wrong-signature":
            _forge_masked(store, cfg, victim, cohort_id=cfg.cohort_id, key=mallory)
        else:
            _forge_masked(
                store,
                cfg,
                victim,
                cohort_id="c00000099",
                key=participant(store, victim, "secagg").signing_key,
            )

    # The victim itself vanishes after sharing (or cannot write its shares), so the forged object is all there is.
    drops = {} if attack == "forged-shares" else {victim: "shares"}
    with caplog.at_level("WARNING"):
        cfg, _ = run_cohort(stack, store, 0, drops, before_upload=inject)
    survivors = [c for c in clients if c != victim]
    check_applied(store, cfg, survivors, 0)
    text = " ".join(
        f"{r.getMessage()} {getattr(r, 'reason', '')} {getattr(r, 'key', '')}"
        for r in caplog.records
    )
    reason = {
        "wrong-signature": "bad signature",
        "replayed-from-other-cohort": "replayed",
        "forged-shares": "bad signature",
    }[attack]
    assert reason in text and victim in text


def test_user_level_dp_noise_survives_dropouts_and_is_accounted(
    s3_endpoint: str, store: S3Store
) -> None:
    """GIVEN user-level distributed DP (z = 0.5, C = 1) sized for 10% dropouts WHEN 1 of 10
    members vanishes after sharing keys THEN the cohort applies the unweighted mean of the 9
    survivors' clipped deltas plus noise of std z*C/9, and the version's metadata states
    the mechanism, the zero-out neighbouring relation, the survivors and the epsilon of
    that release, at most the config's per-release target. (Two dropouts would leave 8,
    below the 9 the noise is sized for: that cohort aborts,
    ``tests/hostile/test_bounds.py::test_user_level_dp_with_too_few_survivors_aborts_unreleased``.)"""
    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    settings = {
        "mode": "secagg", "cohort_size": N, "min_cohort_size": 5, "short_round_s": ROUND_S,
        "round_deadline_s": ROUND_S, "stuck_after_s": 5.0, "dp_user_noise": 0.5,
        "dp_user_clip": 1.0, "secagg_max_dropout": 0.1,
    }  # fmt: skip
    clients = sorted(SAMPLES)
    with LocalStack(
        endpoint_url=s3_endpoint, bucket=store.bucket, settings=settings, sweep_interval_s=SWEEP_S,
        clock=ManualClock(),
    ) as st:  # fmt: skip
        cfg, _ = run_cohort(st, store, 0, {c: "shares" for c in clients[:1]})
    assert cfg.dp.expected_survivors == 9 and cfg.min_members == 9
    survivors = clients[1:]
    res = participant(store, "s00").result(cfg.cohort_id)
    assert res is not None and res.status == "applied" and res.included == survivors
    new, meta, _ = load_model(store, res.version)
    user = meta.metrics["privacy"]["user_level"]
    assert user["mechanism"] == "skellam" and user["survivors"] == 9
    assert user["neighbouring"] == "zero-out"
    assert user["effective_noise_multiplier"] == pytest.approx(0.5, rel=1e-6)
    assert 0 < user["epsilon"] <= user["target_epsilon"] < math.inf and user["delta"] == 1e-5
    sigma = 0.5 / 9  # noise std of the mean, per coordinate
    for k in TINY:
        clipped = []
        for c in survivors:
            d = delta_for(c, TINY, 0.05)
            norm = math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in d.values()))
            clipped.append(d[k].astype(np.float64) * min(1.0, 1.0 / norm))
        got = new[k].astype(np.float64) / meta.weight
        assert np.all(np.abs(got - np.mean(clipped, axis=0)) < 6 * sigma)
