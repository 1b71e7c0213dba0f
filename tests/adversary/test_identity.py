"""A malicious server cannot swap identities: devices check the operator's certificates.

The attack (issue 13, "server-pinned identities"): the function pins each member's
identity key in the config from ``clients/*/identity.json``, which the gateway role
can overwrite. A server that overwrites the identities of ``t`` of the victim's share
holders with keys of its own, and pins them, plays those members itself: the victim
encrypts its Shamir shares to the server's keys, and the server rebuilds the victim's
self-mask seed and mask key and unmasks its single update, with no colluding device.

Harness: a real cohort through the real handler (moto, events delivered synchronously
by the hostile corpus's ``Lambda.pump``). The victim and one other member are honest
devices that hold the operator's public key; the server replaces the identities of
four other members (t = 4 of the k + 1 = 6 holders) before formation. The
honest devices are driven through the device machine's ADVERTISE step by the real
``Runner``, which checks certificates before anything is published.

GIVEN / WHEN / THEN per scenario: a swapped identity.json (config pins the server's
keys), a forged certificate (signed by another key, or claiming the operator's id),
a missing certificate: every honest device refuses the cohort (``Outcome.REFUSED``,
logged with the reason) before advertising; the victim never uploads and nothing is
applied. Without the certificate check (``operator_key=None``, the devices trusting
the server's pins as before) the same attack rebuilds the victim's update exactly.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pytest

from fedcore import layout
from fedcore.codec import decode_tensors
from fedcore.device.machine import (
    Advertise,
    Allowed,
    Leave,
    Outcome,
    Say,
    Settings,
    join,
    step,
)
from fedcore.device.runner import Runner, SyntheticDevice, Update
from fedcore.device.secure import SecureRound, flatten_weighted
from fedcore.errors import NotFoundError
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, Manifest, Mode, parse_manifest
from fedcore.operator import certify
from fedcore.participant import Participant
from fedcore.secagg import crypto, shamir
from fedcore.secagg.protocol import (
    DOMAIN_CERTIFICATE,
    SHARE_BYTES,
    Certificate,
    CertificateError,
    encode_certificate,
    encode_identity,
    member_index,
    operator_key_id,
    parse_certificate,
    parse_keys,
    parse_shares,
)
from fedcore.storage import S3Store
from fedcore.versions import find_head
from tests.helpers import TINY, delta_for, function_env
from tests.hostile import test_corpus as corpus
from tests.hostile.test_corpus import Lambda

caplog = corpus.caplog  # the fixture: pytest's caplog, also fed by fedcore's loggers

VICTIM, HONEST = "v0", "h4"
# honest devices whose identities the server replaces (t of them)
SWAPPED = ["s1", "s2", "s3", "s4"]
MEMBERS = sorted([VICTIM, *SWAPPED, HONEST])
SAMPLES = 10
CAP = 100  # SECAGG_WEIGHT_CAP


@pytest.fixture
def env(store: S3Store, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A secure cohort of the five members; deadlines far away (events drive it)."""
    return function_env(
        monkeypatch, store, s3_endpoint, SECAGG_WEIGHT_CAP=str(CAP), AGGREGATION_MODE="secagg",
        COHORT_SIZE=str(len(MEMBERS)), MIN_COHORT_SIZE="3",
    )  # fmt: skip


class World:
    """The operator, the enrolled and certified devices, and the server's sybil keys."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self.operator_sk, self.operator_pk = crypto.ed25519_keypair()
        self.device_sk = {c: crypto.ed25519_keypair()[0] for c in MEMBERS}
        self.sybil_sk = {c: crypto.ed25519_keypair()[0] for c in SWAPPED}
        for c, sk in self.device_sk.items():  # enrollment: identity and certificate
            Participant(store, c, mode="secagg", signing_key=sk).enroll()
            certify(store, self.operator_sk, c, crypto.ed25519_public(sk))

    def honest(self, client: str, *, check: bool = True) -> Participant:
        """An honest device; ``check=False``: no operator key (trusts the server's pins)."""
        return Participant(
            self.store, client, mode="secagg", signing_key=self.device_sk[client],
            operator_key=self.operator_pk if check else None,
        )  # fmt: skip

    def swap_identities(self) -> dict[str, Participant]:
        """The server overwrites the swapped members' identity.json with keys it holds (the
        gateway role can: no write-once condition) and plays those members itself."""
        out = {}
        for c, sk in self.sybil_sk.items():
            self.store.put(
                layout.identity_key(c),
                encode_identity(c, crypto.ed25519_public(sk), 0.0),
                content_type="application/json",
            )
            out[c] = Participant(self.store, c, mode="secagg", signing_key=sk)
        return out


def form(store: S3Store, parts: dict[str, Participant]) -> tuple[Lambda, CohortConfig]:
    """Every member checks in (the server's sybils for the swapped ones); the function
    forms the cohort, pinning the identities it reads from identity.json."""
    lam = Lambda(store)
    tickets = {c: p.check_in(0) for c, p in parts.items()}
    lam.pump()
    cfg = parts[VICTIM].find_cohort(tickets[VICTIM])[0]
    assert cfg is not None and sorted(cfg.members) == MEMBERS
    return lam, cfg


def train(client: str) -> Update:
    return Update(delta_for(client, TINY, 0.05), SAMPLES)


def advertise(p: Participant, cfg: CohortConfig) -> tuple[Runner, Any, list[Any]]:
    """The device machine from joining ``cfg`` to its ADVERTISE answer, by the real runner."""
    state, actions = join(Settings(p.client_id, Mode.SECAGG), cfg)
    state, actions = step(state, Allowed())  # no user-level DP terms to refuse
    assert isinstance(actions[-1], Advertise)
    runner = Runner(p, SyntheticDevice(lambda cfg, c=p.client_id: train(c)))
    obs = runner.perform(actions[-1])
    state, actions = step(state, obs)
    for action in actions:
        if isinstance(action, Say | Leave):
            runner.perform(action)  # the lines logged; a Leave drops the cohort's secrets
    return runner, state, actions


def manifest(store: S3Store, cid: str, phase: Phase) -> Manifest | None:
    try:
        return parse_manifest(store.get(layout.state_key(cid, phase)).body, where=phase.value)
    except NotFoundError:
        return None


def attack(store: S3Store, cfg: CohortConfig, lam: Lambda, rounds: dict[str, SecureRound]) -> Any:
    """The malicious server's rounds with the members that advertised; returns the victim's
    weighted update rebuilt from its shares to the sybils and its masked input, or None
    if the victim never uploaded one."""
    cid = cfg.cohort_id
    for c in SWAPPED:
        rounds[c].advertise()
    lam.pump()
    u1 = manifest(store, cid, Phase.KEYS)
    if u1 is None or VICTIM not in u1.members:
        return None
    for c in u1.members:
        rounds[c].share(u1)
    lam.pump()
    u2 = manifest(store, cid, Phase.SHARES)
    assert u2 is not None
    for c in (VICTIM, HONEST):
        rounds[c].upload(u2, train(c).delta, num_samples=SAMPLES)
    # The server reads the victim's masked input (it may: it is the aggregation function)
    # and decrypts the victim's shares addressed to the sybils, whose keys it holds.
    masked_key = layout.member_key(cid, Kind.MASKED, VICTIM)
    try:
        blob = store.get(masked_key).body
    except NotFoundError:
        return None
    y = np.array(decode_tensors(blob, where=masked_key)[0]["masked"], dtype=np.uint32)
    shares_key = layout.member_key(cid, Kind.SHARES, VICTIM)
    victim_keys = parse_keys(
        store.get(layout.member_key(cid, Kind.KEYS, VICTIM)).body,
        identity=crypto.ed25519_public(rounds[VICTIM].p.signing_key or b""),
        cohort_id=cid, client_id=VICTIM, where="victim keys",
    )  # fmt: skip
    b_pts, s_pts = {}, {}
    for c in SWAPPED:
        msg = parse_shares(
            store.get(shares_key).body, identity=None, cohort_id=cid, client_id=VICTIM,
            where=shares_key, receiver=c,
        )  # fmt: skip
        plain = crypto.decrypt_share(
            msg.ciphertexts[c], private=rounds[c]._c_sk, peer_public=victim_keys.c_pk,
            cohort_id=cid, sender=VICTIM, receiver=c,
        )  # fmt: skip
        x = member_index(MEMBERS, c)
        s_pts[x] = shamir.share_from_bytes(plain[:SHARE_BYTES])
        b_pts[x] = shamir.share_from_bytes(plain[SHARE_BYTES:])
    t = cfg.secagg.t if cfg.secagg else 0
    b = shamir.reconstruct(b_pts, threshold=t)
    s_sk = shamir.reconstruct(s_pts, threshold=t)
    assert crypto.x25519_public(s_sk) == victim_keys.s_pk  # the victim's mask key itself
    pair_seeds = {
        v: crypto.pair_mask_seed(s_sk, rounds[v].s_pk, cohort_id=cid, me=VICTIM, peer=v)
        for v in u2.members
        if v != VICTIM
    }
    terms = [(-1, b)] + [(-crypto.pair_sign(VICTIM, v), s) for v, s in pair_seeds.items()]
    codes = crypto.add_masks(y.copy(), terms)
    assert cfg.secagg is not None
    q = cfg.secagg.quantizer()
    return codes.astype(np.float64) * q.step - cfg.secagg.clip


def victim_update(cfg: CohortConfig) -> np.ndarray:
    assert cfg.secagg is not None
    return flatten_weighted(train(VICTIM).delta, cfg.secagg.weight(SAMPLES))


# -- scenarios ---------------------------------------------------------------------------


def test_swapped_identities_rebuild_the_victims_update_without_certificate_checks(
    store: S3Store, env: pytest.MonkeyPatch
) -> None:
    """The attack itself, with the defence off: GIVEN devices that trust the identities the
    server pins (no operator key) WHEN the server swaps t = 4 holders' identities THEN it
    rebuilds the victim's single update to within one quantization step."""
    world = World(store)
    sybils = world.swap_identities()
    devs = {VICTIM: world.honest(VICTIM, check=False), HONEST: world.honest(HONEST, check=False)}
    lam, cfg = form(store, {**devs, **sybils})
    rounds: dict[str, SecureRound] = {c: SecureRound(p, cfg) for c, p in sybils.items()}
    for c, p in devs.items():
        runner, state, _ = advertise(p, cfg)
        assert state.outcome is None and runner.round is not None  # advertised
        rounds[c] = runner.round
    got = attack(store, cfg, lam, rounds)
    assert got is not None
    assert cfg.secagg is not None
    np.testing.assert_allclose(got, victim_update(cfg), atol=2 * cfg.secagg.quantizer().step)


@pytest.mark.parametrize("how", ["swapped-identity", "forged-foreign", "forged-as-ours", "missing"])
def test_honest_devices_refuse_a_cohort_with_an_uncertified_identity(
    store: S3Store, env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """GIVEN devices holding the operator's public key WHEN the server swaps four holders'
    identities (identity.json and the config's pins), and for the forged variants also
    replaces their certificates with its own (signed by its own key naming itself, or
    claiming the operator's id), or deletes them THEN the victim and the other honest
    device refuse the cohort before advertising (REFUSED, a warning with the reason), the
    victim never uploads, its update is never rebuilt and nothing is applied."""
    world = World(store)
    sybils = world.swap_identities()
    fake_sk = crypto.ed25519_keypair()[0]
    for c, sk in world.sybil_sk.items():
        key = layout.certificate_key(c)
        cert = Certificate(c, crypto.ed25519_public(sk), 0.0)
        if how == "forged-foreign":
            store.put(key, encode_certificate(cert, fake_sk))
        elif how == "forged-as-ours":
            doc = {
                "format": "fedcore.certificate.v1", "client_id": c,
                "ed25519": crypto.b64(cert.ed25519), "issued_at": 0.0,
                "operator": operator_key_id(world.operator_pk),
            }  # fmt: skip
            doc["signature"] = crypto.sign(fake_sk, DOMAIN_CERTIFICATE, doc)
            store.put(key, json.dumps(doc).encode())
        elif how == "missing":
            store.delete(key)
    devs = {VICTIM: world.honest(VICTIM), HONEST: world.honest(HONEST)}
    lam, cfg = form(store, {**devs, **sybils})
    expect = {
        "swapped-identity": "that the operator did not certify",
        "forged-foreign": "not ours",
        "forged-as-ours": "bad signature",
        "missing": "no operator certificate",
    }[how]
    rounds: dict[str, SecureRound] = {c: SecureRound(p, cfg) for c, p in sybils.items()}
    with caplog.at_level(logging.INFO):
        for c, p in devs.items():
            _, state, actions = advertise(p, cfg)
            leave = next(a for a in actions if isinstance(a, Leave))
            assert leave.outcome is Outcome.REFUSED and expect in leave.reason, leave
            assert state.rounds == 0  # a refused cohort is not counted
            assert store.head(layout.member_key(cfg.cohort_id, Kind.KEYS, c)) is None
    warned = [
        r for r in caplog.records if r.levelno >= logging.WARNING and expect in r.getMessage()
    ]
    assert {getattr(r, "client_id", None) for r in warned} >= {VICTIM, HONEST}
    assert attack(store, cfg, lam, rounds) is None  # the victim never uploads
    assert store.head(layout.member_key(cfg.cohort_id, Kind.MASKED, VICTIM)) is None
    assert find_head(store) == 0


def test_certified_cohort_advertises(store: S3Store, env: pytest.MonkeyPatch) -> None:
    """GIVEN every member enrolled and certified, nothing swapped THEN each device's
    certificate check passes and it advertises (the defence refuses only forgeries)."""
    world = World(store)
    devs = {c: world.honest(c) for c in MEMBERS}
    _, cfg = form(store, devs)
    for p in devs.values():
        runner, _, actions = advertise(p, cfg)
        assert not any(isinstance(a, Leave) for a in actions), actions
        assert runner.round is not None and set(p.certified) >= {p.client_id}
    assert all(store.head(layout.member_key(cfg.cohort_id, Kind.KEYS, c)) for c in MEMBERS)


def test_a_certificate_binds_its_client_id_and_operator() -> None:
    """GIVEN a certificate of a's key THEN it does not certify b (moved), nor verify under
    another operator key, and a one-byte change breaks it."""
    op_sk, op_pk = crypto.ed25519_keypair()
    ident = crypto.ed25519_keypair()[1]
    blob = encode_certificate(Certificate("a", ident, 1.0), op_sk)
    assert parse_certificate(blob, operator_key=op_pk, client_id="a", where="x").ed25519 == ident
    with pytest.raises(CertificateError, match="certifies 'a', not 'b'"):
        parse_certificate(blob, operator_key=op_pk, client_id="b", where="x")
    with pytest.raises(CertificateError, match="not ours"):
        parse_certificate(blob, operator_key=crypto.ed25519_keypair()[1], client_id="a", where="x")
    tampered = blob.replace(b'"issued_at":1.0', b'"issued_at":2.0')
    assert tampered != blob
    with pytest.raises(CertificateError, match="bad signature"):
        parse_certificate(tampered, operator_key=op_pk, client_id="a", where="x")


def test_a_token_bound_to_the_certified_key_enrolls_no_other_key(store: S3Store) -> None:
    """GIVEN a token the operator issued for a device's certified key WHEN someone holding
    the token (a compromised gateway's caller, a thief) enrolls another key with it THEN
    the gateway refuses; the certified key itself enrolls."""
    from fedcore.access import enroll_request
    from fedcore.gateway import Denied, Gateway, issue_token

    device_sk, thief_sk = crypto.ed25519_keypair()[0], crypto.ed25519_keypair()[0]
    token = issue_token(store, "d1", ttl_s=60, public_key=crypto.ed25519_public(device_sk))
    gateway = Gateway(store, signer=None)  # type: ignore[arg-type]  # enroll signs no URL
    with pytest.raises(Denied, match="issued for another key"):
        gateway.enroll(enroll_request("d1", thief_sk, token))
    assert gateway.enroll(enroll_request("d1", device_sk, token))["enrolled"] is True


def test_the_enrollment_tool_certifies_and_prints_the_operator_key(
    store: S3Store, s3_endpoint: str, tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """GIVEN ``python -m infra.enroll`` with an operator folder THEN ``operator-key`` creates
    the key (0600) and prints its public half, and ``issue --public-key`` certifies the
    device's key under it and prints a token bound to that key."""
    from infra import enroll

    folder = tmp_path / "operator"
    assert enroll.main(["--operator-dir", str(folder), "operator-key"]) == 0
    operator_pk = crypto.unb64(capsys.readouterr().out.strip(), what="printed key", size=32)
    assert (folder / "operator.ed25519").stat().st_mode & 0o777 == 0o600
    device_pk = crypto.ed25519_keypair()[1]
    args = ["--operator-dir", str(folder), "issue", "--client", "d2"]
    args += ["--public-key", crypto.b64(device_pk), "--bucket", store.bucket]
    args += ["--endpoint-url", s3_endpoint]
    assert enroll.main(args) == 0
    assert capsys.readouterr().out.strip()  # the token
    blob = store.get(layout.certificate_key("d2")).body
    cert = parse_certificate(blob, operator_key=operator_pk, client_id="d2", where="d2")
    assert cert.ed25519 == device_pk


def test_a_secure_device_through_the_gateway_needs_the_operator_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without the operator's key a device could check no certificate and would trust the
    identities the function pins, which is the attack above; the CLI refuses to start."""
    from edge_client.__main__ import parse_args

    for name in ("FL_OPERATOR_KEY", "BUCKET", "CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    run = ["run", "--gateway", "http://127.0.0.1:1", "--client-id", "dev-1"]
    with pytest.raises(SystemExit):
        parse_args(run)
    assert "secure mode through the gateway needs --operator-key" in capsys.readouterr().err
    assert parse_args([*run, "--plaintext"]).operator_key is None
    assert parse_args([*run, "--operator-key", "b64key"]).operator_key == "b64key"
    monkeypatch.setenv("FL_OPERATOR_KEY", "from-env")
    assert parse_args(run).operator_key == "from-env"
