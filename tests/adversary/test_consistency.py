"""A malicious server against the consistency round (issue 13, item 1): the victim's update
is never reconstructed by what the round is there to stop.

The server is the test: it shows each device the manifests it chooses, serves any reader
any body for a key (or none: withholding), and may hold a colluding member's secrets.
The honest devices are the product's own protocol machine (``fedcore.device.machine``)
performed by its ``Runner`` and ``SecureRound`` over an in-memory bucket the server
controls; the last test runs the honest function on moto.

"Reconstructed" is literal: from the reveals written to the bucket (plus the colluders'
own shares) the server rebuilds the victim's self-mask seed and mask key, strips every
mask from the victim's masked upload and compares the result with the victim's update.

Each defence is switched off by monkeypatching it in the test that shows it matters
(``*_without_the_defence``); nothing in the product can switch a defence off.

What the rule "at least t members of U3 signed the identical U3" does not stop is
recorded here too (``test_equivocation_with_one_colluding_neighbour``): a quorum of ``t``
is never harder for the server to gather than ``t`` shares of each kind, so with one
colluding neighbour the split still works; a quorum of a strict majority of the cohort
stops it in a sparse (SecAgg+) graph.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load as load_tensors

from fedcore import layout
from fedcore.device import machine as m
from fedcore.device.runner import Runner, SyntheticDevice, Update
from fedcore.device.secure import SecureRound, flatten_weighted
from fedcore.errors import AlreadyExistsError, IntegrityError, NotFoundError, ProtocolError
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, Manifest, Mode
from fedcore.secagg import admission, crypto, shamir
from fedcore.secagg.graph import default_threshold
from fedcore.secagg.protocol import (
    SHARE_BYTES,
    ConsistencyMsg,
    SecAggParams,
    encode_consistency,
    member_index,
    parse_keys,
    parse_shares,
    parse_unmask,
)
from fedcore.secagg.quantize import bits_for
from fedcore.storage import StoredObject
from tests.helpers import delta_for

CID = "c00000005"
SAMPLES = 10
WEIGHT_CAP = 100
SPEC = {"w": (3,)}
PHASES = ("keys", "shares", "inputs", "unmask")


# --------------------------------------------------------------------------- the server
class Bucket:
    """The server's bucket: write-once for devices, but the server decides what each
    reader sees (``shown`` bodies, ``hidden`` keys, per-reader ``manifests``)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.shown: dict[tuple[str, str], bytes] = {}
        self.hidden: set[tuple[str, str]] = set()
        self.manifests: dict[tuple[str, str], Manifest] = {}  # (reader or "*", phase)
        self.archive: dict[str, bytes] = {}  # what the server read and then hid

    def hide(self, kinds: tuple[Kind, ...]) -> None:
        """Delete these kinds from the bucket, keeping a copy (the server remembers)."""
        for key in [k for k in self.objects if layout.parse_key(k).kind in kinds]:
            self.archive[key] = self.objects.pop(key)

    def close(self, phase: Phase, members: list[str], reader: str = "*") -> Manifest:
        man = Manifest(CID, phase.value, sorted(members), {}, "deadline", 1.7e9)
        self.manifests[(reader, phase.value)] = man
        return man


@dataclass
class View:
    bucket: Bucket
    reader: str

    def get(self, key: str, **_: object) -> StoredObject:
        if (self.reader, key) in self.bucket.hidden:
            raise NotFoundError(key)
        body = self.bucket.shown.get((self.reader, key), self.bucket.objects.get(key))
        if body is None:
            raise NotFoundError(key)
        return StoredObject(key, body, "etag")

    def put_new(self, key: str, body: bytes, **_: object) -> None:
        if key in self.bucket.objects:
            raise AlreadyExistsError(key)
        self.bucket.objects[key] = body


@dataclass
class Member:
    """Just what ``Runner`` and ``SecureRound`` ask of a ``Participant``."""

    store: View
    client_id: str
    signing_key: bytes
    mode: str = "secagg"
    operator_key: bytes | None = (
        None  # trusts the config's pins (test_identity covers certificates)
    )

    def result(self, cohort_id: str) -> None:
        return None

    def manifest(self, cohort_id: str, phase: Phase) -> Manifest | None:
        shown = self.store.bucket.manifests
        return shown.get((self.client_id, phase.value), shown.get(("*", phase.value)))


@dataclass
class Cohort:
    n: int
    k: int
    t: int
    members: list[str] = field(init=False)
    keys: dict[str, bytes] = field(init=False)
    params: SecAggParams = field(init=False)
    cfg: CohortConfig = field(init=False)

    def __post_init__(self) -> None:
        self.members = [f"m{i:02d}" for i in range(self.n)]
        self.keys = {c: crypto.ed25519_keypair()[0] for c in self.members}
        self.params = SecAggParams(
            k=self.k, t=self.t, graph_seed="5eed" * 8, clip=1.0, bits=bits_for(self.n),
            weight_cap=WEIGHT_CAP,
        )  # fmt: skip
        self.cfg = CohortConfig(
            cohort_id=CID, base_version=0, members={c: "n1" for c in self.members},
            mode=Mode.SECAGG, min_members=max(2, self.t), created_at=1.7e9,
            phase_s=dict.fromkeys(PHASES, 10.0), secagg=self.params,
            identities={c: crypto.b64(crypto.ed25519_public(k)) for c, k in self.keys.items()},
        )  # fmt: skip

    def holders(self, victim: str) -> list[str]:
        """The victim's neighbours: with the victim, the k + 1 holders of its shares."""
        return sorted(self.params.graph(self.members)[victim])

    def member(self, bucket: Bucket, client: str) -> Member:
        return Member(View(bucket, client), client, self.keys[client])


def update(client: str) -> Update:
    return Update(delta_for(client, SPEC, 0.1), SAMPLES)


# --------------------------------------------------------------------------- honest devices
@dataclass
class Device:
    """An honest device: the protocol machine, its runner, and what it has left with."""

    client: str
    runner: Runner
    state: m.DeviceState
    request: m.Request | None = None
    left: m.Leave | None = None

    def act(self, actions: list[m.Action]) -> None:
        self.request = None
        for a in actions:
            if isinstance(a, m.Say | m.BookRelease | m.Leave):
                self.runner.perform(a)
                if isinstance(a, m.Leave):
                    self.left = a
            elif self.left is None:
                self.request = a


def device_settings(client: str) -> m.Settings:
    """An honest device's standing terms: the product's defaults (floors included)."""
    return m.Settings(client, Mode.SECAGG)


def honest(cohort: Cohort, bucket: Bucket, client: str, now: list[float]) -> Device:
    runner = Runner(
        cohort.member(bucket, client),  # type: ignore[arg-type]
        SyntheticDevice(lambda cfg: update(client)),
        blocking=False, clock=lambda: now[0],
    )  # fmt: skip
    state, actions = m.join(device_settings(client), cohort.cfg)
    d = Device(client, runner, state)
    d.act(actions)
    return d


def drive(devices: list[Device]) -> None:
    """Perform every device's requests until none can move (all wait, or have left)."""
    moved = True
    while moved:
        moved = False
        for d in devices:
            if d.request is None:
                continue
            obs = d.runner.perform(d.request)
            if obs is None or isinstance(obs, m.Pending):
                continue
            moved = True
            d.state, actions = m.step(d.state, obs)
            d.act(actions)


@dataclass
class Run:
    cohort: Cohort
    bucket: Bucket
    devices: dict[str, Device]
    colluders: dict[str, SecureRound]
    now: list[float]
    u2: Manifest

    def finish(self) -> None:
        """Let every wait run out (devices without a quorum leave), then drive once more."""
        drive(list(self.devices.values()))
        self.now[0] += 1e6
        drive(list(self.devices.values()))


def rounds_1_to_3(cohort: Cohort, colluding: list[str]) -> Run:
    """Honest devices (the machine) and colluders (their own ``SecureRound``) advertise,
    share and upload; the server closes U1 and U2 with every member."""
    bucket, now = Bucket(), [0.0]
    devices = {c: honest(cohort, bucket, c, now) for c in cohort.members if c not in colluding}
    colluders = {c: SecureRound(cohort.member(bucket, c), cohort.cfg) for c in colluding}  # type: ignore[arg-type]
    drive(list(devices.values()))
    for r in colluders.values():
        r.advertise()
    u1 = bucket.close(Phase.KEYS, cohort.members)
    drive(list(devices.values()))
    for r in colluders.values():
        r.share(u1)
    u2 = bucket.close(Phase.SHARES, cohort.members)
    drive(list(devices.values()))
    for c, r in colluders.items():
        r.upload(u2, update(c).delta, num_samples=SAMPLES)
    for d in devices.values():
        assert d.state.stage is m.Stage.INPUTS, (d.client, d.state.stage, d.left)
    return Run(cohort, bucket, devices, colluders, now, u2)


# --------------------------------------------------------------------------- reconstruction
def colluder_shares(bucket: Bucket, r: SecureRound, victim: str) -> tuple[int, int]:
    """(share of s_sk, share of b) of ``victim`` that colluder ``r`` holds, decrypted."""
    key = layout.member_key(CID, Kind.SHARES, victim)
    msg = parse_shares(
        bucket.objects[key], identity=None, cohort_id=CID, client_id=victim, where=key,
        receiver=r.me,
    )  # fmt: skip
    plain = crypto.decrypt_share(
        msg.ciphertexts[r.me], private=r._c_sk, peer_public=r._peer_keys[victim].c_pk,
        cohort_id=CID, sender=victim, receiver=r.me,
    )  # fmt: skip
    return (
        shamir.share_from_bytes(plain[:SHARE_BYTES]),
        shamir.share_from_bytes(plain[SHARE_BYTES:]),
    )


def revealed(run: Run, victim: str) -> tuple[dict[int, int], dict[int, int]]:
    """Shares of the victim's self-mask seed and of its mask key the server holds."""
    c, x = run.cohort, (lambda who: member_index(run.cohort.members, who))
    seed_pts: dict[int, int] = {}
    key_pts: dict[int, int] = {}
    for key, body in [*run.bucket.archive.items(), *run.bucket.objects.items()]:
        parsed = layout.parse_key(key)
        if parsed.kind is not Kind.UNMASK:
            continue
        who = parsed.client_id
        assert who is not None
        msg = parse_unmask(
            body, identity=crypto.ed25519_public(c.keys[who]), cohort_id=CID, client_id=who,
            where=key,
        )  # fmt: skip
        if victim in msg.self_shares:
            seed_pts[x(who)] = msg.self_shares[victim]
        if victim in msg.key_shares:
            key_pts[x(who)] = msg.key_shares[victim]
    for who, r in run.colluders.items():  # a colluder hands over both of its shares
        s_share, b_share = colluder_shares(run.bucket, r, victim)
        seed_pts[x(who)], key_pts[x(who)] = b_share, s_share
    return seed_pts, key_pts


def reconstructed(run: Run, victim: str) -> bool:
    """Whether the server can strip every mask from the victim's upload and read it."""
    c = run.cohort
    seed_pts, key_pts = revealed(run, victim)
    if len(seed_pts) < c.t or len(key_pts) < c.t:
        return False
    b = shamir.reconstruct(seed_pts, threshold=c.t)
    s_sk = shamir.reconstruct(key_pts, threshold=c.t)
    masked_key = layout.member_key(CID, Kind.MASKED, victim)
    masked = load_tensors(run.bucket.objects[masked_key])["masked"].copy()
    terms = [(-1, b)]
    for u in sorted(set(c.holders(victim)) & set(run.u2.members)):
        key = layout.member_key(CID, Kind.KEYS, u)
        s_pk = parse_keys(
            run.bucket.objects[key], identity=crypto.ed25519_public(c.keys[u]), cohort_id=CID,
            client_id=u, where=key,
        ).s_pk  # fmt: skip
        seed = crypto.pair_mask_seed(s_sk, s_pk, cohort_id=CID, me=victim, peer=u)
        terms.append((-crypto.pair_sign(victim, u), seed))
    plain = c.params.quantizer().dequantize_sum(crypto.add_masks(masked, terms), 1)
    truth = flatten_weighted(update(victim).delta, min(SAMPLES, WEIGHT_CAP) / WEIGHT_CAP)
    return bool(np.max(np.abs(plain - truth)) <= c.params.quantizer().step * 1.01)


# --------------------------------------------------------------------------- scenarios
def equivocate(cohort: Cohort, colluding: int) -> Run:
    """The issue's attack. The server shows the victim and some of its holders a U3 with
    the victim (they reveal shares of its self-mask seed) and other holders one without it
    (they reveal shares of its mask key), tops each group up with other members so that
    each set gathers as many signatures as it can, and serves each reader the colluders'
    signature over the reader's own set."""
    victim = cohort.members[0]
    holders = cohort.holders(victim)
    colluders, honest_holders = holders[:colluding], holders[colluding:]
    run = rounds_1_to_3(cohort, colluders)
    need = admission.quorum_size(cohort.n, cohort.t)
    seed_side = honest_holders[: max(0, cohort.t - 1 - colluding)]
    key_side = honest_holders[len(seed_side) : len(seed_side) + max(0, cohort.t - colluding)]
    rest = [c for c in cohort.members if c not in {victim, *colluders, *seed_side, *key_side}]
    top_up = max(0, need - (1 + len(seed_side) + colluding))
    with_v, without_v = cohort.members, [c for c in cohort.members if c != victim]
    shown = dict.fromkeys([victim, *seed_side, *rest[:top_up]], with_v)
    shown |= dict.fromkeys([*key_side, *rest[top_up:]], without_v)
    for reader, u3 in shown.items():
        run.bucket.close(Phase.INPUTS, u3, reader)
        for c in colluders:
            sig = encode_consistency(ConsistencyMsg(CID, c, tuple(sorted(u3))), cohort.keys[c])
            run.bucket.shown[(reader, layout.member_key(CID, Kind.CONSISTENCY, c))] = sig
    run.finish()
    return run


def no_quorum_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence off: a device reveals for whatever U3 it signed, with no signature read."""
    monkeypatch.setattr(SecureRound, "quorum", lambda self, u3: sorted(u3.members))


def test_equivocating_manifests_without_a_colluder_never_reconstruct_the_victim() -> None:
    """GIVEN a server that shows half of the victim's holders a U3 with the victim and the
    other half one without it, and no colluder WHEN the honest devices sign, wait for a
    quorum and reveal THEN the victim's update is not reconstructed and every reveal names
    the set its sender signed (the full graph of 5 and a sparse graph of 12)."""
    for cohort in (Cohort(5, 4, 4), Cohort(12, 8, 6)):
        run = equivocate(cohort, colluding=0)
        assert not reconstructed(run, cohort.members[0])
        for key, body in run.bucket.objects.items():
            if layout.parse_key(key).kind is Kind.UNMASK:
                who = layout.parse_key(key).client_id
                signed = json.loads(run.bucket.objects[key.replace("/unmask/", "/consistency/")])
                assert json.loads(body)["inputs"] == signed["inputs"], who


@pytest.mark.parametrize(("n", "k"), [(5, 4), (12, 8)])
def test_equivocation_with_one_colluding_neighbour(n: int, k: int) -> None:
    """GIVEN the issue's attack with one colluding neighbour, in the full graph of 5 and a
    sparse graph of 12, at the threshold the server chooses and every device demands
    (``default_threshold``: t > (k + 1 + 1) / 2, so t = 4 and t = 6) WHEN the honest
    devices sign, wait for a quorum and reveal THEN the victim's update is not
    reconstructed: the honest holders, who reveal one kind each, cannot give t - 1 of
    both kinds."""
    cohort = Cohort(n, k, default_threshold(k))
    assert not reconstructed(equivocate(cohort, colluding=1), cohort.members[0])


@pytest.mark.parametrize(("n", "k"), [(5, 4), (12, 8)])
def test_equivocation_with_one_colluding_neighbour_without_the_defence(
    n: int, k: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control: devices that accept a bare strict majority (t = 3 of 5 holders, t = 5 of 9:
    their colluder floor switched off) are split, and the victim is reconstructed, quorum
    of t signatures and all (measured first on the shipped round, design note 39)."""
    monkeypatch.setattr(
        sys.modules[__name__],
        "device_settings",
        lambda client: m.Settings(client, Mode.SECAGG, colluders=0),
    )
    cohort = Cohort(n, k, default_threshold(k, colluders=0))
    assert reconstructed(equivocate(cohort, colluding=1), cohort.members[0])


def test_devices_refuse_a_threshold_one_colluder_could_split() -> None:
    """The floor itself: a config with t = 5 at k = 8 (a bare strict majority) is refused
    by every device, with the reason, before it advertises a key."""
    cohort = Cohort(12, 8, 5)
    fault = m.params_fault(cohort.cfg, device_settings(cohort.members[0]))
    assert fault is not None and "collude" in fault


# -- a live member declared dropped, then asked for its self-mask ------------------------
def rounds_by_hand(cohort: Cohort, bucket: Bucket) -> dict[str, SecureRound]:
    """Every member advertises, shares and uploads through its ``SecureRound`` (a driver
    other than the machine: the harnesses and benchmarks call it so)."""
    rounds = {c: SecureRound(cohort.member(bucket, c), cohort.cfg) for c in cohort.members}  # type: ignore[arg-type]
    for r in rounds.values():
        r.advertise()
    u1 = bucket.close(Phase.KEYS, cohort.members)
    for r in rounds.values():
        r.share(u1)
    u2 = bucket.close(Phase.SHARES, cohort.members)
    for c, r in rounds.items():
        r.upload(u2, update(c).delta, num_samples=SAMPLES)
    return rounds


def sign_then_reveal(rounds: dict[str, SecureRound], u2: Manifest, u3: Manifest) -> dict[str, str]:
    """What honest drivers do after U3: each signs it; then each reveals once t members
    signed it. Member -> what happened."""
    out: dict[str, str] = {}
    for c, r in rounds.items():
        try:
            r.sign_inputs(u3)
        except (AlreadyExistsError, IntegrityError) as exc:
            out[c] = f"refused to sign: {exc}"
    for c, r in rounds.items():
        if c in out:
            continue
        try:
            if r.quorum(u3) is None:
                out[c] = "no quorum"
                continue
            r.unmask(u2, u3)
        except (AlreadyExistsError, IntegrityError, ProtocolError) as exc:
            out[c] = f"refused to reveal: {exc}"
            continue
        out[c] = "revealed"
    return out


def declare_dropped_then_ask(cohort: Cohort) -> tuple[Run, dict[str, str]]:
    """The server closes U3 without the live victim (its holders reveal its mask key), then
    hides those signatures and reveals and shows the holders a U3 with the victim."""
    bucket = Bucket()
    rounds = rounds_by_hand(cohort, bucket)
    victim = cohort.members[0]
    u2 = bucket.close(Phase.SHARES, cohort.members)
    without_v = bucket.close(Phase.INPUTS, [c for c in cohort.members if c != victim])
    first = sign_then_reveal({c: rounds[c] for c in without_v.members}, u2, without_v)
    assert set(first.values()) == {"revealed"}, first
    bucket.hide((Kind.CONSISTENCY, Kind.UNMASK))  # to the devices, nothing was signed or revealed
    with_v = bucket.close(Phase.INPUTS, cohort.members)
    second = sign_then_reveal(rounds, u2, with_v)
    run = Run(cohort, bucket, {}, {}, [0.0], u2)
    return run, second


def test_a_live_member_declared_dropped_cannot_then_be_asked_for_its_self_mask() -> None:
    """GIVEN a server that declared a live victim dropped (its holders revealed shares of
    its mask key) WHEN it hides that and shows them a U3 with the victim THEN each refuses
    to sign a second set, the victim finds no quorum, nobody reveals a share of its
    self-mask seed, and its update is not reconstructed."""
    cohort = Cohort(5, 4, 4)
    victim = cohort.members[0]
    run, second = declare_dropped_then_ask(cohort)
    assert all(o.startswith("refused to sign") for c, o in second.items() if c != victim), second
    assert second[victim] == "no quorum"
    seed_pts, _ = revealed(run, victim)
    assert seed_pts == {}
    assert not reconstructed(run, victim)


def test_a_live_member_declared_dropped_without_the_defence(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Control: a device that forgets the set it signed (the defence off) signs and reveals
    again, and the server reads the victim's update."""
    sign = SecureRound.sign_inputs

    def forgetful(self: SecureRound, u3: Manifest) -> str:
        self._signed_for = None
        self._signatures.clear()
        return sign(self, u3)

    monkeypatch.setattr(SecureRound, "sign_inputs", forgetful)
    cohort = Cohort(5, 4, 4)
    run, second = declare_dropped_then_ask(cohort)
    assert set(second.values()) == {"revealed"}, second
    assert reconstructed(run, cohort.members[0])


# -- withholding signatures, forging a quorum below t -----------------------------------
def trusting_admit(
    blob: bytes, *, identity: bytes, cohort_id: str, client_id: str, where: str
) -> ConsistencyMsg:
    """Defence off: the device's signature check replaced by one accepting anything."""
    doc = json.loads(blob)
    return ConsistencyMsg(cohort_id, client_id, tuple(doc["inputs"]))


def withhold(cohort: Cohort, *, forge: bool) -> Run:
    """Everyone is shown the same U3, but each reader sees only one other member's real
    signature (t - 1 with its own); in place of the others the server serves nothing
    (``forge=False``) or forgeries: one signed with the server's own key, one member's
    genuine signature served as another's, and one the member made in another cohort."""
    run = rounds_1_to_3(cohort, [])
    u3 = run.bucket.close(Phase.INPUTS, cohort.members)
    inputs = tuple(u3.members)
    server_key = crypto.ed25519_keypair()[0]
    for i, reader in enumerate(cohort.members):
        others = [cohort.members[(i + j) % cohort.n] for j in range(1, cohort.n)]
        for j, other in enumerate(others[cohort.t - 2 :]):  # the first t - 2 stay visible
            key = layout.member_key(CID, Kind.CONSISTENCY, other)
            if not forge:
                run.bucket.hidden.add((reader, key))
                continue
            forged = [
                encode_consistency(ConsistencyMsg(CID, other, inputs), server_key),
                encode_consistency(ConsistencyMsg(CID, reader, inputs), cohort.keys[reader]),
                encode_consistency(ConsistencyMsg("c00000099", other, inputs), cohort.keys[other]),
            ][j % 3]
            run.bucket.shown[(reader, key)] = forged
    run.finish()
    return run


@pytest.mark.parametrize("forge", [False, True], ids=["withheld", "forged"])
def test_withheld_or_forged_signatures_never_make_a_quorum(
    forge: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """GIVEN a server that lets each device see t - 1 valid signatures over its U3 and
    withholds the rest, or serves forgeries for them (another key, another member's
    signature, a replay from another cohort) WHEN the devices wait for a quorum THEN each
    leaves once its wait runs out, revealing nothing, and each forgery is logged."""
    caplog.set_level(logging.WARNING, logger="fedcore.device.secure")
    cohort = Cohort(6, 5, default_threshold(5))  # 3 withheld per reader: one of each forgery
    run = withhold(cohort, forge=forge)
    assert not [k for k in run.bucket.objects if layout.parse_key(k).kind is Kind.UNMASK]
    for d in run.devices.values():
        assert d.left is not None and d.left.outcome is m.Outcome.ABANDONED, d.client
        assert "revealing nothing" in d.left.reason
    assert not reconstructed(run, cohort.members[0])
    refused = [
        r.reason for r in caplog.records if r.getMessage() == "consistency signature refused"
    ]  # type: ignore[attr-defined]
    if forge:
        assert any("bad signature" in r for r in refused)
        assert any("replayed or misplaced" in r and "c00000099" in r for r in refused)
        assert any("replayed or misplaced" in r and "c00000005/m" in r for r in refused)


def test_forged_signatures_without_the_defence(monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: with the device's signature check accepting anything, the forgeries make a
    quorum and every device reveals."""
    monkeypatch.setattr(admission, "admit_consistency", trusting_admit)
    cohort = Cohort(5, 4, 4)
    run = withhold(cohort, forge=True)
    assert all(
        d.left is not None and d.left.outcome is m.Outcome.COMPLETED for d in run.devices.values()
    )
    assert len([k for k in run.bucket.objects if layout.parse_key(k).kind is Kind.UNMASK]) == 5


# -- the function: only an agreed input set is unmasked ---------------------------------
def function_cohort(store: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A secure cohort of 4 on the honest function whose members reveal without any
    consistency signature in the bucket (as when a compromised gateway served them forged
    ones): the function must not unmask."""
    from fedcore.versions import seed
    from tests.helpers import TINY, participant
    from tests.sync_functions import SyncFunctions

    seed(store, {k: np.zeros(s, np.float32) for k, s in TINY.items()})
    settings = {
        "mode": "secagg", "cohort_size": 4, "min_cohort_size": 3, "short_round_s": 60.0,
        "round_deadline_s": 60.0, "checkin_wait_s": 60.0, "checkin_ttl_s": 1e6,
        "secagg_weight_cap": 100,
    }  # fmt: skip
    h = SyncFunctions(store, settings, monkeypatch)
    parts = [participant(store, f"d{i}", "secagg") for i in range(4)]
    cfg = h.join(parts)
    rounds = {p.client_id: SecureRound(p, cfg) for p in parts}
    for r in rounds.values():
        r.advertise()
    h.deliver()
    u1 = h.manifest(cfg, Phase.KEYS)
    for r in rounds.values():
        r.share(u1)
    h.deliver()
    u2 = h.manifest(cfg, Phase.SHARES)
    for c, r in rounds.items():
        r.upload(u2, delta_for(c, TINY, 0.05), num_samples=10)
    h.deliver()
    u3 = h.manifest(cfg, Phase.INPUTS)
    monkeypatch.setattr(SecureRound, "quorum", lambda self, u3: sorted(u3.members))
    for r in rounds.values():
        r._signed_for = tuple(sorted(u3.members))  # "signed", but nothing in the bucket
        r.unmask(u2, u3)
    h.deliver()
    return h.result(cfg)


def test_the_function_unmasks_only_an_input_set_t_members_signed(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN every member's reveal for U3 but no consistency signature over it WHEN the
    unmask round closes THEN the function aborts the cohort with the reason and logs each
    missing signature; nothing is applied."""
    # The function's own logger: a LocalStack earlier in this process may have routed
    # its parents to a file (no propagation), so caplog and stdout would miss it.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    coordinator_log = logging.getLogger("fedcore.server.coordinator")
    coordinator_log.addHandler(handler)
    try:
        res = function_cohort(store, monkeypatch)
    finally:
        coordinator_log.removeHandler(handler)
    assert res is not None and res.status == "aborted", res
    assert "no consistency quorum over the input set" in res.reason
    assert "only 0 members of the input set of 4 signed it" in res.reason
    missing = [r for r in records if r.getMessage() == "consistency signature not counted"]
    assert len(missing) == 4


def test_the_function_without_the_defence(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: with the function's quorum check off, it unmasks a set nobody signed."""
    monkeypatch.setattr(
        admission, "signed_quorum", lambda msgs, *, cohort_id, inputs, n, t: sorted(inputs)
    )
    res = function_cohort(store, monkeypatch)
    assert res is not None and res.status == "applied", res
