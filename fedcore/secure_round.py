"""The device's side of one cohort's secure aggregation (four rounds over the bucket).

Security warnings first: the two X25519 private keys and the self-mask seed
exist only in this object's memory (never on disk, never in logs) and
``erase`` drops them when the cohort ends; every message is signed with the
device's long-term key; the device decides which kind of share to reveal for
each neighbour from the write-once input manifest and never reveals both.

Rounds (Bonawitz et al. 2017, section 4; SecAgg+ neighbour graph):
  1. advertise: publish c_pk (share encryption) and s_pk (mask agreement)
  2. share:     Shamir-split s_sk and the self-mask seed b among the neighbours
                in U1, each share AES-GCM-encrypted to its holder
  3. upload:    quantize [w * delta, w], add PRG(b) and the pairwise masks with
                the neighbours in U2, upload the uint32 vector
  4. unmask:    for each neighbour in U2: reveal its b-share if it is in U3
                (it uploaded), its s_sk-share if it is not (it dropped)
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping

import numpy as np

from fedcore import layout
from fedcore.codec import encode_tensors
from fedcore.dp.distributed import secure_generator
from fedcore.errors import (
    AlreadyExistsError,
    IntegrityError,
    NotFoundError,
    ProtocolError,
    UnusableUpdateError,
)
from fedcore.layout import Kind, Phase
from fedcore.messages import CohortConfig, Manifest, Mode, parse_manifest
from fedcore.participant import Participant
from fedcore.secagg import crypto, shamir
from fedcore.secagg.masking import mask_input
from fedcore.secagg.protocol import (
    MASKED_TENSOR,
    SHARE_BYTES,
    KeysMsg,
    MaskedMeta,
    SharesMsg,
    UnmaskMsg,
    commit_seed,
    encode_keys,
    encode_shares,
    encode_unmask,
    masked_metadata,
    member_index,
    parse_identity,
    parse_keys,
    parse_shares,
    pinned_identity,
)

log = logging.getLogger(__name__)


def flatten_weighted(delta: Mapping[str, np.ndarray], weight: float) -> np.ndarray:
    """[w * delta (parameters in sorted-name order), w]: what the cohort sums.

    Written straight into one float64 vector: no per-tensor temporaries, and the
    result is the caller's own, so the quantizer may work on it in place.
    """
    names = sorted(delta)
    out = np.empty(sum(np.size(delta[n]) for n in names) + 1, dtype=np.float64)
    at = 0
    for name in names:
        part = np.asarray(delta[name]).ravel()
        np.multiply(part, weight, out=out[at : at + part.size])
        at += part.size
    out[at] = weight
    return out


class SecureRound:
    def __init__(self, participant: Participant, cfg: CohortConfig) -> None:
        if cfg.mode is not Mode.SECAGG or cfg.secagg is None:
            raise ProtocolError(
                f"cohort {cfg.cohort_id} runs {cfg.mode.value!r}; this device requires secagg"
            )
        if participant.signing_key is None:
            raise ValueError("secure aggregation needs a signing key")
        self.p = participant
        self.cfg = cfg
        self.me = participant.client_id
        where = layout.config_key(cfg.cohort_id)
        if participant.client_id not in cfg.members:
            raise IntegrityError(f"{where}: {participant.client_id} is not a member")
        self.params = cfg.secagg  # validated for the member count by parse_config
        self.members = sorted(cfg.members)
        self.neighbours = self.params.graph(self.members)[self.me]
        self._c_sk, self.c_pk = crypto.x25519_keypair()
        self._s_sk, self.s_pk = crypto.x25519_keypair()
        self._b: bytes | None = None
        self._own_b_share = 0
        self._peer_keys: dict[str, KeysMsg] = {}
        self._identities: dict[str, bytes] = {}
        self.clipped = 0  # coordinates clipped by the quantizer (the range was too small)
        self.dp_norm: float | None = None  # L2 norm of the delta before the user-level clip
        self.privacy_rdp: list[float] | None = None  # user-level RDP this upload may spend

    # -- helpers ------------------------------------------------------------
    @property
    def _sk(self) -> bytes:
        assert self.p.signing_key is not None
        return self.p.signing_key

    def _identity(self, client: str) -> bytes:
        if (pinned := pinned_identity(self.cfg.identities, client)) is not None:
            return pinned  # pinned by the function when it formed the cohort
        if client not in self._identities:
            key = layout.identity_key(client)
            self._identities[client] = parse_identity(
                self.p.store.get(key).body, client_id=client, where=key
            ).ed25519
        return self._identities[client]

    def _put(self, kind: Kind, body: bytes, content_type: str = "application/json") -> str:
        key = layout.member_key(self.cfg.cohort_id, kind, self.me)
        self.p.store.put_new(key, body, content_type=content_type)
        return key

    def wait(
        self,
        phase: Phase,
        *,
        timeout_s: float,
        poll_s: float = 0.5,
        should_stop: Callable[[], bool] = lambda: False,
    ) -> Manifest | None:
        """The phase's manifest once written; None if the cohort ended or time ran out."""
        key = layout.state_key(self.cfg.cohort_id, phase)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not should_stop():
            try:
                return self._checked_manifest(
                    parse_manifest(self.p.store.get(key).body, where=key), phase, key
                )
            except NotFoundError:
                pass
            if self.p.result(self.cfg.cohort_id) is not None:
                return None
            time.sleep(poll_s)
        return None

    def _checked_manifest(self, m: Manifest, phase: Phase, key: str) -> Manifest:
        """A manifest that says what it should: this cohort, this phase, only its members.

        A manifest is the function's word on who counts; one that names another
        cohort or a stranger would make the device mask with, or reveal shares
        for, the wrong set, so the device abandons the cohort instead.
        """
        if m.cohort_id != self.cfg.cohort_id or m.phase != phase.value:
            raise IntegrityError(
                f"{key}: manifest names {m.cohort_id}/{m.phase}, expected "
                f"{self.cfg.cohort_id}/{phase.value}"
            )
        if strangers := sorted(set(m.members) - set(self.cfg.members)):
            raise IntegrityError(f"{key}: manifest names non-members {strangers}")
        return m

    # -- round 1 -------------------------------------------------------------
    def advertise(self) -> str:
        msg = KeysMsg(self.cfg.cohort_id, self.me, self.c_pk, self.s_pk)
        return self._put(Kind.KEYS, encode_keys(msg, self._sk))

    # -- round 2 -------------------------------------------------------------
    def share(self, u1: Manifest) -> str:
        if self.me not in u1.members:
            raise ProtocolError(f"{self.me} is not in U1 of {self.cfg.cohort_id}")
        cid = self.cfg.cohort_id
        peers = sorted(self.neighbours & set(u1.members))
        for v in peers:
            key = layout.member_key(cid, Kind.KEYS, v)
            self._peer_keys[v] = parse_keys(
                self.p.store.get(key).body,
                identity=self._identity(v),
                cohort_id=cid,
                client_id=v,
                where=key,
            )
        self._b = os.urandom(32)
        # The holders are the live neighbours and this member itself (it keeps its own
        # share of b in memory and reveals it when it unmasks; its share of s_sk never).
        mine = member_index(self.members, self.me)
        xs = [member_index(self.members, v) for v in peers]
        if len(xs) + 1 < self.params.t:
            raise ProtocolError(
                f"{self.cfg.cohort_id}: {len(xs)} live neighbours cannot hold a "
                f"{self.params.t}-out-of-{len(xs) + 1} sharing"
            )
        s_shares = shamir.split(self._s_sk, xs=[*xs, mine], threshold=self.params.t)
        b_shares = shamir.split(self._b, xs=[*xs, mine], threshold=self.params.t)
        self._own_b_share = b_shares[mine]
        cts = {}
        for v, x in zip(peers, xs, strict=True):
            plain = shamir.share_to_bytes(s_shares[x]) + shamir.share_to_bytes(b_shares[x])
            cts[v] = crypto.encrypt_share(
                plain,
                private=self._c_sk,
                peer_public=self._peer_keys[v].c_pk,
                cohort_id=cid,
                sender=self.me,
                receiver=v,
            )
        msg = SharesMsg(cid, self.me, commit_seed(self._b), cts)
        return self._put(Kind.SHARES, encode_shares(msg, self._sk))

    # -- round 3 -------------------------------------------------------------
    def upload(self, u2: Manifest, delta: Mapping[str, np.ndarray], *, num_samples: int) -> str:
        if self.me not in u2.members or self._b is None:
            raise ProtocolError(f"{self.me} is not in U2 of {self.cfg.cohort_id}")
        if (
            dp := self.cfg.dp
        ) is not None:  # user-level DP: clip, quantize, add this member's noise
            flat = flatten_weighted(delta, 1.0)[:-1]
            q, self.dp_norm = dp.privatize(flat, secure_generator())
            if self.dp_norm > dp.clip:  # expected under DP: the clip bounds each member's say
                log.info(
                    "delta scaled down to the user-level DP clip",
                    extra={
                        "client_id": self.me,
                        "cohort_id": self.cfg.cohort_id,
                        "norm": round(self.dp_norm, 4),
                        "clip": dp.clip,
                    },
                )
            self.privacy_rdp = dp.worst_case_rdp(self.cfg.min_members, flat.size)
        else:
            weight = min(num_samples, self.params.weight_cap) / self.params.weight_cap
            vec = flatten_weighted(delta, weight)
            rng = np.random.default_rng(secrets.randbits(128))  # rounding only; not a secret
            q, self.clipped = self.params.quantizer().quantize(vec, rng, in_place=True)
        pair_seeds = {
            v: crypto.pair_mask_seed(
                self._s_sk,
                self._peer_keys[v].s_pk,
                cohort_id=self.cfg.cohort_id,
                me=self.me,
                peer=v,
            )
            for v in sorted(self.neighbours & set(u2.members))
        }
        masked = mask_input(q, me=self.me, self_seed=self._b, pair_seeds=pair_seeds)
        meta = MaskedMeta(
            self.cfg.cohort_id, self.me, self.cfg.base_version, int(masked.size),
            hashlib.sha256(memoryview(masked)).hexdigest(),
        )  # fmt: skip
        blob = encode_tensors({MASKED_TENSOR: masked}, masked_metadata(meta, self._sk))
        if self.clipped:
            log.warning(
                "values clipped before masking",
                extra={
                    "client_id": self.me,
                    "cohort_id": self.cfg.cohort_id,
                    "clipped": self.clipped,
                },
            )
        return self._put(Kind.MASKED, blob, "application/octet-stream")

    # -- round 4 -------------------------------------------------------------
    def unmask(self, u2: Manifest, u3: Manifest) -> str:
        """Reveal, per neighbour in U2, exactly one kind of share, chosen by U3."""
        if self.me not in u3.members:
            raise ProtocolError(f"{self.me} is not in U3 of {self.cfg.cohort_id}")
        if not set(u3.members) <= set(u2.members):
            raise IntegrityError(
                f"{self.cfg.cohort_id}: U3 is not a subset of U2; refusing to unmask"
            )
        # Revealing self-mask shares for fewer than the minimum would expose a sum of
        # too few members (Bonawitz et al.: abort when |U3| < t); an ended cohort needs nothing.
        if len(u3.members) < max(self.cfg.min_members, self.params.t):
            raise ProtocolError(
                f"{self.cfg.cohort_id}: only {len(u3.members)} inputs "
                f"(minimum {self.cfg.min_members}); refusing to unmask"
            )
        if self.p.result(self.cfg.cohort_id) is not None:
            raise ProtocolError(f"{self.cfg.cohort_id}: cohort already ended; nothing to unmask")
        cid = self.cfg.cohort_id
        self_shares: dict[str, int] = {self.me: self._own_b_share}
        key_shares: dict[str, int] = {}
        for v in sorted(self.neighbours & set(u2.members)):
            key = layout.member_key(cid, Kind.SHARES, v)
            try:
                msg = parse_shares(
                    self.p.store.get(key).body,
                    identity=None,  # the AEAD below authenticates it (see parse_shares)
                    cohort_id=cid,
                    client_id=v,
                    where=key,
                    receiver=self.me,
                )
                if self.me not in msg.ciphertexts:
                    raise IntegrityError(
                        f"{key}: no share addressed to {self.me} "
                        f"(addressed to {sorted(msg.ciphertexts)[:5]})"
                    )
                plain = crypto.decrypt_share(
                    msg.ciphertexts[self.me], private=self._c_sk, peer_public=self._peer_keys[v].c_pk,
                    cohort_id=cid, sender=v, receiver=self.me,
                )  # fmt: skip
            except (IntegrityError, NotFoundError) as exc:
                log.warning(
                    "cannot use a neighbour's share",
                    extra={"cohort_id": cid, "client_id": v, "key": key, "reason": str(exc)},
                )
                continue
            s_share = shamir.share_from_bytes(plain[:SHARE_BYTES])
            b_share = shamir.share_from_bytes(plain[SHARE_BYTES:])
            if v in u3.members:
                self_shares[v] = b_share
            else:
                key_shares[v] = s_share
        return self._put(
            Kind.UNMASK, encode_unmask(UnmaskMsg(cid, self.me, self_shares, key_shares), self._sk)
        )

    def erase(self) -> None:
        """Forget every per-cohort secret (Python cannot wipe memory; we drop the references)."""
        self._c_sk = self._s_sk = b""
        self._b = None
        self._own_b_share = 0
        self._peer_keys.clear()


DROP_POINTS = (
    "keys",
    "shares",
    "inputs",
)  # vanish before advertising, after sharing, after uploading

Update = tuple[Mapping[str, np.ndarray], int]  # (delta, num_samples)


def not_admitted(m: Manifest, cfg: CohortConfig, me: str) -> str | None:
    """Why member ``me`` cannot go on past the closed phase ``m``; None if it can.

    Shared by the blocking driver below and the step-wise simulation
    (``edge_client.simulate``), so both leave a cohort for the same reasons.
    """
    if me not in m.members:
        return f"{cfg.cohort_id}: not counted in {m.phase} (late or rejected)"
    if len(m.members) < cfg.min_members:
        return f"{cfg.cohort_id}: only {len(m.members)} members in {m.phase}; the cohort aborts"
    return None


def run_secure_cohort(
    participant: Participant,
    cfg: CohortConfig,
    train: Callable[[], Update],
    *,
    drop_at: str | None = None,
    poll_s: float = 0.5,
    slack_s: float = 30.0,
    should_stop: Callable[[], bool] = lambda: False,
    say: Callable[[str], None] = lambda m: None,
    on_uploaded: Callable[[SecureRound], None] = lambda rnd: None,
) -> str:
    """Play one cohort's four rounds; returns how it ended for this device.

    ``train`` runs after the shares are out (while the others finish theirs),
    so the input round's time limit has to cover training. ``drop_at`` makes
    the device vanish at that point, for dropout experiments.
    """
    if drop_at is not None and drop_at not in DROP_POINTS:
        raise ValueError(f"drop_at must be one of {DROP_POINTS}")
    cid, me = cfg.cohort_id, participant.client_id
    try:
        rnd = SecureRound(participant, cfg)
    except (IntegrityError, ProtocolError) as exc:
        _abandon(say, cid, me, exc)
        return "abandoned"

    def wait(phase: Phase) -> Manifest | None:
        limit = sum(cfg.phase_s.values()) + slack_s
        m = rnd.wait(phase, timeout_s=limit, poll_s=poll_s, should_stop=should_stop)
        if m is None:
            say(f"{cid}: ended before {phase.value} closed")
        elif (why := not_admitted(m, cfg, me)) is not None:
            say(why)
            return None
        return m

    try:
        if drop_at == "keys":
            say(f"{cid}: dropping out before advertising keys")
            return "dropped"
        rnd.advertise()
        if (u1 := wait(Phase.KEYS)) is None:
            return "abandoned"
        rnd.share(u1)
        if drop_at == "shares":
            say(f"{cid}: dropping out after sharing keys")
            return "dropped"
        delta, num_samples = train()
        if (u2 := wait(Phase.SHARES)) is None:
            return "abandoned"
        rnd.upload(u2, delta, num_samples=num_samples)
        on_uploaded(rnd)  # e.g. the device books the release's privacy cost
        detail = f"{num_samples} samples, {rnd.clipped} values clipped"
        if rnd.dp_norm is not None:
            detail += f", delta L2 norm {rnd.dp_norm:.3f} before the DP clip"
        say(f"{cid}: masked update uploaded ({detail})")
        if drop_at == "inputs":
            say(f"{cid}: dropping out after uploading")
            return "dropped"
        if (u3 := wait(Phase.INPUTS)) is None:
            return "abandoned"
        try:
            rnd.unmask(u2, u3)
        except ProtocolError as exc:
            say(str(exc))
            return "abandoned"
        say(f"{cid}: unmask shares revealed for {len(u3.members)} survivors")
        return "completed"
    except UnusableUpdateError as exc:
        say(f"{cid}: {exc}")
        return "abandoned"
    except AlreadyExistsError as exc:
        # Our slot already holds an object: an earlier run of this device, or a forgery.
        # Write-once keys mean we cannot replace it; the function judges what is there.
        say(f"{cid}: cannot write ({exc}); leaving the cohort")
        return "abandoned"
    except (IntegrityError, ProtocolError, NotFoundError) as exc:
        # Something this device read (a manifest, a peer's keys, the base model) is
        # malformed or lies: leave the cohort (the function counts us as a dropout)
        # rather than mask with, or reveal shares for, a set we cannot trust.
        _abandon(say, cid, me, exc)
        return "abandoned"
    finally:
        rnd.erase()


def _abandon(say: Callable[[str], None], cid: str, me: str, exc: Exception) -> None:
    log.warning(
        "device abandons the cohort", extra={"cohort_id": cid, "client_id": me, "reason": str(exc)}
    )
    say(f"{cid}: abandoning the cohort: {exc}")
