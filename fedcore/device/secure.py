"""The device's side of one cohort's secure aggregation: the crypto of the four rounds.

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
  3b. consistency: sign U3 (cohort id and sorted members, once per cohort); wait
                until at least t members of U3 signed the identical set
                (Bonawitz et al. 2017, section 4, ConsistencyCheck)
  4. unmask:    only for the one U3 this member signed, once t members agreed on
                it: for each neighbour in U2 reveal its b-share if it is in U3
                (it uploaded), its s_sk-share if it is not (it dropped); the
                reveal names U3

When to call each round, and when to leave instead, is ``fedcore.device.machine``'s
decision; ``fedcore.device.runner`` calls these methods when the machine says so.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Mapping

import numpy as np

from fedcore import layout
from fedcore.codec import encode_tensors
from fedcore.device.machine import not_a_member
from fedcore.dp.distributed import secure_generator
from fedcore.errors import IntegrityError, NotFoundError, ProtocolError
from fedcore.layout import Kind
from fedcore.messages import CohortConfig, Manifest, Mode
from fedcore.participant import Participant
from fedcore.secagg import admission, crypto, shamir
from fedcore.secagg.masking import mask_input
from fedcore.secagg.protocol import (
    MASKED_TENSOR,
    SHARE_BYTES,
    CertificateError,
    ConsistencyMsg,
    KeysMsg,
    MaskedMeta,
    SharesMsg,
    UnmaskMsg,
    commit_seed,
    encode_consistency,
    encode_keys,
    encode_shares,
    encode_unmask,
    masked_metadata,
    member_index,
    parse_certificate,
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
        if (fault := not_a_member(cfg, participant.client_id)) is not None:
            raise IntegrityError(fault)
        self.params = cfg.secagg  # validated for the member count by parse_config
        self.members = sorted(cfg.members)
        self.neighbours = self.params.graph(self.members)[self.me]
        self._c_sk, self.c_pk = crypto.x25519_keypair()
        self._s_sk, self.s_pk = crypto.x25519_keypair()
        self._b: bytes | None = None
        self._own_b_share = 0
        self._peer_keys: dict[str, KeysMsg] = {}
        self._identities: dict[str, bytes] = {}
        # Round 3b: the one input set this member signed (kept in memory: a server that
        # controls the bucket could hide the written signature and ask again), and the
        # verified signatures read so far (None: refused, never counted, not read again).
        self._signed_for: tuple[str, ...] | None = None
        self._signatures: dict[str, ConsistencyMsg | None] = {}
        self.clipped = 0  # coordinates clipped by the quantizer (the range was too small)
        self.dp_norm: float | None = None  # L2 norm of the delta before the user-level clip
        self.privacy_rdp: list[float] | None = None  # user-level RDP this upload may spend

    # -- helpers ------------------------------------------------------------
    @property
    def _sk(self) -> bytes:
        assert self.p.signing_key is not None
        return self.p.signing_key

    def _identity(self, client: str) -> bytes:
        if self.p.operator_key is not None:
            # Only ever the operator-certified key: the pin and identity.json are the server's.
            if client not in self.p.certified:
                self.check_certificates([client])
            return self.p.certified[client]
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

    # -- identities ----------------------------------------------------------
    def check_certificates(self, clients: list[str] | None = None) -> None:
        """Check the operator's certificate of each peer (default: this member and its
        neighbours, whose keys it will use); ``CertificateError`` names the first bad one.

        Security: the function pins identities in the config and the gateway writes
        ``identity.json``; either could swap a neighbour's key for its own and collect
        this member's shares. Only a certificate signed by the operator's key (which
        the device was given, never read from the bucket) says whose key is whose, so
        a missing or invalid one, or a config pin that disagrees with it, refuses the
        cohort before this member publishes anything. Checked keys are kept for the
        device's lifetime: an id is certified for one key only.
        """
        operator = self.p.operator_key
        if operator is None:
            return
        for client in sorted({self.me, *self.neighbours}) if clients is None else clients:
            if client not in self.p.certified:
                key = layout.certificate_key(client)
                try:
                    blob = self.p.store.get(key).body
                except NotFoundError:
                    raise CertificateError(f"{key}: no operator certificate for {client}") from None
                cert = parse_certificate(blob, operator_key=operator, client_id=client, where=key)
                self.p.certified[client] = cert.ed25519
            certified = self.p.certified[client]
            pinned = pinned_identity(self.cfg.identities, client)
            if pinned is not None and pinned != certified:
                raise CertificateError(
                    f"{layout.config_key(self.cfg.cohort_id)}: pins a key for {client} "
                    "that the operator did not certify"
                )
            if client == self.me and certified != crypto.ed25519_public(self._sk):
                raise CertificateError(
                    f"{layout.certificate_key(client)}: certifies another key than this device's"
                )

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
    def upload(
        self,
        u2: Manifest,
        delta: Mapping[str, np.ndarray],
        *,
        num_samples: int,
        train_s: float | None = None,
    ) -> str:
        """Round 3; ``train_s``, the seconds local training took, goes into the signed
        metadata to size later cohorts' deadlines (None: not reported)."""
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
            declared = None
        else:
            # The declaration is public and signed; a device never declares fewer than one
            # sample (a zero or negative weight would let one member cancel the others).
            declared = max(1, int(num_samples))
            vec = flatten_weighted(delta, self.params.weight(declared))
            rng = np.random.default_rng(secrets.randbits(128))  # rounding only; not a secret
            q, self.clipped = self.params.quantizer().quantize(
                vec, rng, in_place=True, exact_last=self.params.weight_code(declared)
            )  # the weight slot exact: the function checks it against the declarations
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
            train_s=None if train_s is None else round(min(max(float(train_s), 0.0), 1e6), 3),
            samples=declared,
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

    # -- round 3b ------------------------------------------------------------
    def sign_inputs(self, u3: Manifest) -> str:
        """Sign the input set we were shown; one set per cohort, ever (write-once object,
        and remembered here so a hidden signature cannot be asked for again)."""
        if self.me not in u3.members:
            raise ProtocolError(f"{self.me} is not in U3 of {self.cfg.cohort_id}")
        inputs = tuple(sorted(u3.members))
        if self._signed_for is not None and self._signed_for != inputs:
            raise IntegrityError(
                f"{self.cfg.cohort_id}: asked to sign a second, different input set; refusing"
            )
        self._signed_for = inputs
        msg = ConsistencyMsg(self.cfg.cohort_id, self.me, inputs)
        return self._put(Kind.CONSISTENCY, encode_consistency(msg, self._sk))

    def quorum(self, u3: Manifest) -> list[str] | None:
        """The members of U3 who signed exactly U3 once at least ``t`` have; None until then.

        Only for the set this member signed. Each call reads the signatures not read yet
        (a missing one may come later) and stops once ``t`` agree; a malformed or forged
        one, or one over another set (evidence that the server equivocated, or a
        malicious member), is logged and never counted.
        """
        cid = self.cfg.cohort_id
        inputs = tuple(sorted(u3.members))
        if self._signed_for != inputs:
            raise IntegrityError(f"{cid}: asked about an input set this member did not sign")
        t, n = self.params.t, len(self.members)
        agreed = len(admission.agreeing(self._valid(), cohort_id=cid, inputs=set(inputs)))
        for v in inputs:
            if agreed >= admission.quorum_size(n, t):
                break  # the remaining reads would change nothing
            if v in self._signatures:
                continue
            key = layout.member_key(cid, Kind.CONSISTENCY, v)
            try:
                blob = self.p.store.get(key).body
            except NotFoundError:
                continue
            try:
                msg = admission.admit_consistency(
                    blob, identity=self._identity(v), cohort_id=cid, client_id=v, where=key
                )
            except IntegrityError as exc:
                log.warning(
                    "consistency signature refused",
                    extra={"cohort_id": cid, "client_id": v, "key": key, "reason": str(exc)},
                )
                self._signatures[v] = None
                continue
            self._signatures[v] = msg
            agreed += msg.inputs == inputs
            if msg.inputs != inputs:
                log.warning(
                    "a member signed another input set (the server equivocated, or it lies)",
                    extra={"cohort_id": cid, "client_id": v, "key": key,
                           "reason": f"{len(msg.inputs)} members, ours {len(inputs)}"},
                )  # fmt: skip
        try:
            return admission.signed_quorum(
                self._valid(), cohort_id=cid, inputs=set(inputs), n=n, t=t
            )
        except IntegrityError:
            return None

    def _valid(self) -> dict[str, ConsistencyMsg]:
        return {c: m for c, m in self._signatures.items() if m is not None}

    # -- round 4 -------------------------------------------------------------
    def unmask(self, u2: Manifest, u3: Manifest) -> str:
        """Reveal, per neighbour in U2, exactly one kind of share, chosen by U3, and only for
        the U3 this member signed once ``t`` members of it signed the identical set."""
        if self.me not in u3.members:
            raise ProtocolError(f"{self.me} is not in U3 of {self.cfg.cohort_id}")
        if self._signed_for != tuple(sorted(u3.members)):
            # A second request with another U3 (a live member declared dropped, then asked
            # for) would hand out the other kind of share. The same set again reveals the
            # same shares: nothing new.
            raise IntegrityError(
                f"{self.cfg.cohort_id}: asked to reveal for an input set this member did not sign"
            )
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
        if self.quorum(u3) is None:  # the machine waited for it; never reveal without one
            raise ProtocolError(
                f"{self.cfg.cohort_id}: too few members signed this input set "
                f"(t={self.params.t}); refusing to unmask"
            )
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
        msg = UnmaskMsg(cid, self.me, self_shares, key_shares, tuple(sorted(u3.members)))
        return self._put(Kind.UNMASK, encode_unmask(msg, self._sk))

    def erase(self) -> None:
        """Forget every per-cohort secret (Python cannot wipe memory; we drop the references)."""
        self._c_sk = self._s_sk = b""
        self._b = None
        self._own_b_share = 0
        self._peer_keys.clear()
        self._signatures.clear()
