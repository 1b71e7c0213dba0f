"""One member's influence is bounded, and user-level releases stay within their epsilon.

Real cohorts through the real handler (moto, events delivered synchronously by the
corpus harness's ``Lambda.pump``), with one member playing the protocol correctly but
sending what no honest encoder produces:

- plaintext: a huge delta with 10^7 samples is clipped and capped, not averaged in;
- secagg: codes beyond the members' range, or a negative weight that would amplify
  the mean, abort the cohort before anything is committed;
- user-level DP: a cohort left with fewer survivors than its noise is sized for aborts
  (nothing released);
- an object refused by the size cap is in ``result.json``'s ``rejected`` map with its
  reason, and gets no second "late object" line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedcore import layout
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, Manifest, parse_manifest
from fedcore.participant import Participant
from fedcore.secagg.quantize import Quantizer
from fedcore.secure_round import SecureRound
from fedcore.server.coordinator import Coordinator
from fedcore.server.settings import ServerSettings
from fedcore.storage import S3Store
from fedcore.versions import find_head, load_model
from tests.helpers import TINY, delta_for, function_env, participant
from tests.hostile import test_corpus as corpus
from tests.hostile.test_corpus import Lambda

caplog = corpus.caplog  # the fixture: pytest's caplog, also fed by fedcore's loggers

CAP = 100  # SECAGG_WEIGHT_CAP


@pytest.fixture
def env(store: S3Store, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    return function_env(monkeypatch, store, s3_endpoint, SECAGG_WEIGHT_CAP=str(CAP))


def form(
    store: S3Store, env: pytest.MonkeyPatch, members: list[str], mode: str, minimum: int
) -> tuple[Lambda, CohortConfig, dict[str, Participant]]:
    env.setenv("AGGREGATION_MODE", mode)
    env.setenv("COHORT_SIZE", str(len(members)))
    env.setenv("MIN_COHORT_SIZE", str(minimum))
    lam = Lambda(store)
    devs = {c: participant(store, c, mode) for c in members}
    tickets = {c: p.check_in(0) for c, p in devs.items()}
    lam.pump()
    cfg = devs[members[0]].find_cohort(tickets[members[0]])[0]
    assert cfg is not None and sorted(cfg.members) == sorted(members)
    return lam, cfg, devs


def l2(tensors: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in tensors.values()))


# -- plaintext -------------------------------------------------------------------------


def test_plaintext_clips_each_member_and_caps_its_weight(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """GIVEN PLAINTEXT_CLIP 1 and two honest members (10 samples) beside one that sends a
    delta of L2 norm ~5900 and claims 10^7 samples THEN the version applies the mean of the
    deltas each clipped to norm 1, weighted 10:10:100 (the cap), whose norm is <= 1."""
    env.setenv("PLAINTEXT_CLIP", "1.0")
    lam, cfg, devs = form(store, env, ["a", "b", "evil"], "plaintext", 2)
    for c in ("a", "b"):
        devs[c].upload_plain(cfg, delta_for(c), num_samples=10, loss=0.5)
    huge = {k: np.full(s, 1e3, np.float32) for k, s in TINY.items()}
    devs["evil"].upload_plain(cfg, huge, num_samples=10_000_000, loss=0.5)
    lam.pump()
    res = devs["a"].result(cfg.cohort_id)
    assert res is not None and res.status == "applied", res
    new, meta, _ = load_model(store, res.version)
    got = {k: new[k].astype(np.float64) / meta.weight for k in TINY}
    scale = 1.0 / l2(huge)
    want = {
        k: (10 * delta_for("a")[k] + 10 * delta_for("b")[k] + CAP * scale * huge[k]) / 120
        for k in TINY
    }
    for k in TINY:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-6)
    assert l2(got) <= 1.0 + 1e-5


def test_an_object_over_the_size_cap_is_in_rejected_and_not_called_late(
    store: S3Store, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """GIVEN a member whose input is 1 MiB (over the model's cap) THEN result.json's
    ``rejected`` names it with the cap reason, and no "late object" line names its key."""
    lam, cfg, devs = form(store, env, ["a", "b", "big"], "plaintext", 2)
    for c in ("a", "b"):
        devs[c].upload_plain(cfg, delta_for(c), num_samples=10, loss=0.5)
    key = layout.member_key(cfg.cohort_id, Kind.PLAIN, "big")
    store.put_new(key, b"\0" * (1 << 20))
    with caplog.at_level(logging.INFO):
        lam.pump()
    res = devs["a"].result(cfg.cohort_id)
    assert res is not None and res.status == "applied" and res.included == ["a", "b"], res
    assert "-byte cap for this phase (not downloaded)" in res.rejected.get("big", ""), res
    refused = [r for r in caplog.records if getattr(r, "key", None) == key]
    assert any("exceeds the" in str(getattr(r, "reason", "")) for r in refused)
    assert not [r for r in refused if "late object" in r.getMessage()]


# -- secure aggregation ----------------------------------------------------------------

MEMBERS = ["m0", "m1", "m2", "m3", "m4"]


def run_secagg(
    store: S3Store,
    env: pytest.MonkeyPatch,
    *,
    forge: Callable[[np.ndarray, Quantizer], np.ndarray] | None = None,
    drop_at_inputs: str | None = None,
    minimum: int = 3,
) -> tuple[CohortConfig, Any]:
    """Five members through the four rounds; m4's codes pass through ``forge`` before
    masking (signed and masked as an honest upload); ``drop_at_inputs`` never uploads and
    the input phase is closed as its deadline would (``Coordinator.close_phase``)."""
    lam, cfg, devs = form(store, env, MEMBERS, "secagg", minimum)
    rounds = {c: SecureRound(devs[c], cfg) for c in MEMBERS}
    cid = cfg.cohort_id

    def manifest(phase: Phase) -> Manifest | None:
        if (info := store.head(layout.state_key(cid, phase))) is None:
            return None
        return parse_manifest(store.get(info.key).body, where=info.key)

    for c in MEMBERS:
        rounds[c].advertise()
    lam.pump()
    u1 = manifest(Phase.KEYS)
    assert u1 is not None
    for c in u1.members:
        rounds[c].share(u1)
    lam.pump()
    u2 = manifest(Phase.SHARES)
    assert u2 is not None
    real = Quantizer.quantize
    for c in u2.members:
        if c == drop_at_inputs:
            continue
        if c == "m4" and forge is not None:

            def forged(self: Quantizer, x: np.ndarray, rng: Any, **kw: Any) -> Any:
                codes, clipped = real(self, x, rng, **kw)
                return forge(codes, self), clipped

            env.setattr(Quantizer, "quantize", forged)
        rounds[c].upload(u2, delta_for(c, TINY, 0.05), num_samples=10)
        env.setattr(Quantizer, "quantize", real)
    lam.pump()
    if drop_at_inputs:
        Coordinator(store, ServerSettings.from_env()).close_phase(cid, Phase.INPUTS, "deadline")
        lam.pump()
    if (u3 := manifest(Phase.INPUTS)) is not None and devs["m0"].result(cid) is None:
        for c in u3.members:  # round 3b: every survivor signs U3 before anyone reveals
            rounds[c].sign_inputs(u3)
        for c in u3.members:
            rounds[c].unmask(u2, u3)
        lam.pump()
    return cfg, devs["m0"].result(cid)


def test_secagg_honest_members_apply(store: S3Store, env: pytest.MonkeyPatch) -> None:
    """The harness itself: five honest members apply one version."""
    _, res = run_secagg(store, env)
    assert res is not None and res.status == "applied" and res.included == MEMBERS, res


def test_secagg_codes_beyond_the_members_range_abort(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """GIVEN m4 adding 3 * levels to one coordinate of its codes (the sum stays below 2^32:
    without the check it would decode as +6 * clip on that coordinate) THEN the cohort
    aborts with the reason and no version is committed."""

    def forge(codes: np.ndarray, q: Quantizer) -> np.ndarray:
        codes[3] += np.uint32(3 * q.levels)
        return codes

    _, res = run_secagg(store, env, forge=forge)
    assert res is not None and res.status == "aborted", res
    assert "out of honest bounds" in res.reason and "code range" in res.reason, res.reason
    assert find_head(store) == 0


def test_secagg_negative_weight_that_amplifies_the_mean_aborts(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """GIVEN four honest members of weight 10/100 and m4 declaring weight -0.39 (a code in
    range) THEN the total weight 0.01 is below count/cap = 0.05, what honest members can
    declare: the cohort aborts (applied, the mean would be scaled up x40)."""

    def forge(codes: np.ndarray, q: Quantizer) -> np.ndarray:
        codes[-1] = np.uint32(round((-0.39 + q.clip) / q.step))
        return codes

    _, res = run_secagg(store, env, forge=forge)
    assert res is not None and res.status == "aborted", res
    assert "decoded total weight" in res.reason, res.reason
    assert find_head(store) == 0


def test_user_level_dp_with_too_few_survivors_aborts_unreleased(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """GIVEN user-level DP on a cohort of 5 sized for 10% dropouts (noise for 5 survivors)
    and MIN_COHORT_SIZE 3 WHEN one member never uploads THEN the cohort's minimum is 5, the
    input phase closes with 4 and the cohort aborts: nothing is unmasked or released (a
    release at 4 would exceed the config's per-release epsilon)."""
    env.setenv("DP_USER_NOISE", "0.5")
    env.setenv("DP_USER_CLIP", "1.0")
    cfg, res = run_secagg(store, env, drop_at_inputs="m2")
    assert cfg.dp is not None and cfg.min_members == cfg.dp.expected_survivors == 5
    assert cfg.dp.release(4, 35)["epsilon"] > cfg.dp.target_epsilon(35)
    assert res is not None and res.status == "aborted", res
    assert find_head(store) == 0
    assert store.head(layout.state_key(cfg.cohort_id, Phase.UNMASK)) is None
