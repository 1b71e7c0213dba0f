"""One member cannot lie about its weight: the weight slot must equal the signed declarations.

The attack (issue 13, "the weight slot"): a member's FedAvg weight travels inside its
masked vector, so the function sees only the cohort's total. A member that declares
few samples but writes a large weight in its slot scales its own delta up against the
others'; within the range honest members can produce, the decoded total's bounds
cannot tell. Each member now signs its sample count in its masked upload's metadata
(``MaskedMeta.samples``, at least one) and writes the exact code of that weight
(``SecAggParams.weight_code``); the function checks the unmasked slot against the sum
of the counted members' declarations (``fedcore.server.secure.check_weight_slot``).

Harness: five members through the four rounds against the real handler (moto, events
delivered synchronously by the hostile corpus's ``Lambda.pump``); the liar's codes pass
through a forge after quantization, before masking, so its upload is signed and masked
like an honest one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from fedcore import layout
from fedcore.codec import decode_tensors, encode_tensors
from fedcore.errors import IntegrityError
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, Manifest, parse_manifest
from fedcore.participant import Participant
from fedcore.secagg import crypto
from fedcore.secagg.protocol import (
    DOMAIN_MASKED,
    MaskedMeta,
    masked_metadata,
    parse_masked_metadata,
)
from fedcore.secagg.quantize import Quantizer
from fedcore.secure_round import SecureRound
from fedcore.server import secure
from fedcore.server.finalize import declared_samples
from fedcore.server.vocabulary import CohortAborted
from fedcore.storage import S3Store
from fedcore.versions import find_head, read_meta
from tests.helpers import TINY, delta_for, function_env
from tests.hostile import test_corpus as corpus
from tests.hostile.test_corpus import Lambda

caplog = corpus.caplog  # the fixture: pytest's caplog, also fed by fedcore's loggers

CAP = 100  # SECAGG_WEIGHT_CAP
MEMBERS = ["w0", "w1", "w2", "w3", "w4"]
LIAR = "w4"
SAMPLES = {"w0": 10, "w1": 20, "w2": 30, "w3": 40, "w4": 10}


@pytest.fixture
def env(store: S3Store, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A secure cohort of the five members, no user-level DP; deadlines far away."""
    return function_env(
        monkeypatch, store, s3_endpoint, SECAGG_WEIGHT_CAP=str(CAP), AGGREGATION_MODE="secagg",
        COHORT_SIZE=str(len(MEMBERS)), MIN_COHORT_SIZE="3",
    )  # fmt: skip


Forge = Callable[[np.ndarray, Quantizer], np.ndarray]


def run(
    store: S3Store, env: pytest.MonkeyPatch, *, forge: Forge | None = None
) -> tuple[CohortConfig, Any]:
    """The cohort through its four rounds; the liar's codes pass through ``forge``."""
    lam = Lambda(store)
    devs = {
        c: Participant(store, c, mode="secagg", signing_key=crypto.ed25519_keypair()[0])
        for c in MEMBERS
    }
    for p in devs.values():
        p.enroll()
    tickets = {c: p.check_in(0) for c, p in devs.items()}
    lam.pump()
    cfg = devs[MEMBERS[0]].find_cohort(tickets[MEMBERS[0]])[0]
    assert cfg is not None and sorted(cfg.members) == MEMBERS
    cid = cfg.cohort_id
    rounds = {c: SecureRound(devs[c], cfg) for c in MEMBERS}

    def manifest(phase: Phase) -> Manifest:
        m = parse_manifest(store.get(layout.state_key(cid, phase)).body, where=phase.value)
        assert m.members == MEMBERS, m
        return m

    for c in MEMBERS:
        rounds[c].advertise()
    lam.pump()
    u1 = manifest(Phase.KEYS)
    for c in MEMBERS:
        rounds[c].share(u1)
    lam.pump()
    u2 = manifest(Phase.SHARES)
    real = Quantizer.quantize
    for c in MEMBERS:
        if c == LIAR and forge is not None:

            def forged(self: Quantizer, x: np.ndarray, rng: Any, **kw: Any) -> Any:
                codes, clipped = real(self, x, rng, **kw)
                return forge(codes, self), clipped

            env.setattr(Quantizer, "quantize", forged)
        rounds[c].upload(u2, delta_for(c, TINY, 0.05), num_samples=SAMPLES[c])
        env.setattr(Quantizer, "quantize", real)
    lam.pump()
    u3 = manifest(Phase.INPUTS)
    for c in MEMBERS:  # round 3b: every survivor signs U3 before anyone reveals
        rounds[c].sign_inputs(u3)
    for c in MEMBERS:
        rounds[c].unmask(u2, u3)
    lam.pump()
    return cfg, devs[MEMBERS[0]].result(cid)


def declared_weight(cfg: CohortConfig) -> float:
    assert cfg.secagg is not None
    return sum(cfg.secagg.weight(SAMPLES[c]) for c in MEMBERS)


def claim_the_cap(codes: np.ndarray, q: Quantizer) -> np.ndarray:
    """The liar declares 10 samples (weight 0.1) but writes the code of weight 1.0 (the cap):
    inside what honest members can produce, so only the declarations can tell."""
    codes[-1] = np.uint32(round((1.0 + q.clip) / q.step))
    return codes


# -- scenarios ---------------------------------------------------------------------------


def test_honest_cohort_applies_with_exactly_the_declared_weight(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """GIVEN five honest members declaring 10, 20, 30, 40 and 10 samples THEN the cohort
    applies, the inputs manifest records each signed declaration, and the version's
    weight is the sum of the declared weights (exact slot codes: no rounding noise)."""
    cfg, res = run(store, env)
    assert res is not None and res.status == "applied", res
    inputs = parse_manifest(
        store.get(layout.state_key(cfg.cohort_id, Phase.INPUTS)).body, where="inputs"
    )
    assert inputs.verified == {c: str(SAMPLES[c]) for c in MEMBERS}
    assert cfg.secagg is not None
    step = cfg.secagg.quantizer().step
    assert read_meta(store, 1).metrics["total_weight"] == pytest.approx(
        declared_weight(cfg), abs=len(MEMBERS) * step
    )


def test_a_weight_slot_that_lies_aborts_the_cohort(
    store: S3Store, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """GIVEN a member declaring 10 samples whose weight slot holds the code of the cap
    (x10 its declared weight, within the honest range) THEN the cohort aborts with the
    reason logged, before anything is committed."""
    with caplog.at_level(logging.INFO):
        _, res = run(store, env, forge=claim_the_cap)
    assert res is not None and res.status == "aborted", res
    assert "declared weights" in res.reason and "lied about its weight" in res.reason, res.reason
    assert find_head(store) == 0
    assert any("declared weights" in str(getattr(r, "reason", "")) for r in caplog.records), (
        "the abort is logged with its reason"
    )


def test_without_the_slot_check_the_lie_is_applied(store: S3Store, env: pytest.MonkeyPatch) -> None:
    """The attack itself, with the defence off (``check_weight_slot`` a no-op in this test
    only): the same lie passes every other bound and is applied with the inflated weight."""
    env.setattr(secure, "check_weight_slot", lambda total, **kw: None)
    cfg, res = run(store, env, forge=claim_the_cap)
    assert res is not None and res.status == "applied", res
    assert cfg.secagg is not None
    lied = declared_weight(cfg) - cfg.secagg.weight(10) + 1.0
    assert read_meta(store, 1).metrics["total_weight"] == pytest.approx(lied, abs=0.01)


def test_a_device_never_declares_fewer_than_one_sample(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """GIVEN a member whose training processed no samples THEN it declares one (and writes
    that weight), and the cohort applies with it."""
    env.setitem(SAMPLES, "w2", 0)
    cfg, res = run(store, env)
    assert res is not None and res.status == "applied", res
    blob = store.get(layout.member_key(cfg.cohort_id, Kind.MASKED, "w2")).body
    meta = decode_tensors(blob, where="w2")[1]
    assert '"samples":1' in meta["fedcore"] or '"samples": 1' in meta["fedcore"], meta


@pytest.mark.parametrize(("samples", "reason"), [(0, "not an integer >= 1"), (None, "no signed")])
def test_an_upload_declaring_less_than_one_sample_is_refused(
    samples: int | None, reason: str
) -> None:
    """GIVEN signed masked metadata declaring 0 samples, or none at all (an older device)
    THEN the function refuses that upload (the member counts as a dropout) with the reason."""
    sk, pk = crypto.ed25519_keypair()
    meta = MaskedMeta("c00000001", "x", 0, 36, "0" * 64)
    md = masked_metadata(meta, sk)
    if samples is not None:  # hand-made: masked_metadata itself writes what it is given
        doc = json.loads(md["fedcore"])
        doc.pop("signature")
        doc["samples"] = samples
        doc["signature"] = crypto.sign(sk, DOMAIN_MASKED, doc)
        md["fedcore"] = json.dumps(doc, sort_keys=True)
        with pytest.raises(IntegrityError, match=reason):
            parse_masked_metadata(md, identity=pk, cohort_id="c00000001", client_id="x", where="k")
        return
    vec = np.zeros(36, np.uint32)
    meta = MaskedMeta("c00000001", "x", 0, 36, hashlib.sha256(vec.tobytes()).hexdigest())
    blob = encode_tensors({"masked": vec}, masked_metadata(meta, sk))
    with pytest.raises(IntegrityError, match=reason):
        secure.check_masked(
            blob, where="k", length=36, identity=pk, cohort_id="c00000001", client_id="x",
            base_version=0, require_samples=True,
        )  # fmt: skip
    # Under user-level DP (no ``declared``) the same upload is fine: every weight is 1.
    secure.check_masked(
        blob, where="k", length=36, identity=pk, cohort_id="c00000001", client_id="x",
        base_version=0,
    )  # fmt: skip


def test_missing_inputs_manifest_declaration_aborts() -> None:
    """GIVEN an inputs manifest without a counted member's declaration THEN the finalize
    refuses to decode (CohortAborted with the reason), rather than skip the check."""
    m = Manifest("c00000001", "inputs", ["a", "b"], {}, "all-members", 0.0, "", {"a": "3"})
    with pytest.raises(CohortAborted, match="no declared weight for b"):
        declared_samples(m, ["a", "b"])
    assert declared_samples(m, ["a"]) == {"a": 3}
