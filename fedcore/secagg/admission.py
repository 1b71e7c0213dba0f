"""Which SecAgg+ messages the function admits into a round, and what it keeps from them.

Pure: the caller reads the message and says who it comes from, which identity key
verifies it and who was counted in the earlier rounds; nothing here touches the
bucket. A refused message raises ``IntegrityError`` naming the object (``where``),
and the function counts its sender as a dropout of that round.

The rules (Bonawitz et al. 2017, section 4, with Bell et al. 2020's neighbour graph):

- every message is signed by its sender's Ed25519 key as pinned in the cohort config
  (the enrolled key for a cohort that pins none), under the round's domain tag, and
  names its cohort and sender (``fedcore.secagg.protocol`` parses and verifies);
- round 2 (shares): a member encrypts a share for exactly its neighbours that were
  counted in round 1 (U1), no more and no fewer;
- round 3 (masked input): checked while streaming the sum, by
  ``fedcore.server.secure.check_masked`` (same signature rule, base version, length,
  digest);
- round 3b (consistency): each survivor signs the input set U3 it was shown (cohort id
  and sorted members); a member reveals, and the function unmasks, only once at least
  ``t`` members of U3 signed exactly that set (``signed_quorum``; Bonawitz et al. 2017,
  section 4, ConsistencyCheck);
- round 4 (unmask): a survivor reveals self-mask shares only for neighbours (or
  itself) that are in the sum (U3), and mask-key shares only for neighbours that
  shared keys (U2) but are not in the sum, never both kinds for one member; the
  reveal names the input set it was made for, which must be that U3.

What the function copies into the round's manifest (``Manifest.verified``) is the one
public value per member that unmasking needs, so a finalize re-reads n messages
instead of 3n: the mask-agreement key ``s_pk`` (round 1) and the self-mask seed
commitment (round 2).
"""

from __future__ import annotations

from collections.abc import Mapping, Set

from fedcore.errors import IntegrityError
from fedcore.secagg import crypto
from fedcore.secagg.protocol import (
    ConsistencyMsg,
    KeysMsg,
    SharesMsg,
    UnmaskMsg,
    parse_consistency,
    parse_keys,
    parse_shares,
    parse_unmask,
)


def admit_keys(
    blob: bytes, *, identity: bytes, cohort_id: str, client_id: str, where: str
) -> KeysMsg:
    """Round 1: a signed pair of X25519 keys from ``client_id``."""
    return parse_keys(
        blob, identity=identity, cohort_id=cohort_id, client_id=client_id, where=where
    )


def admit_shares(
    blob: bytes,
    *,
    identity: bytes,
    cohort_id: str,
    client_id: str,
    where: str,
    neighbours: Set[str],
    u1: Set[str],
) -> SharesMsg:
    """Round 2: signed, with one ciphertext for each neighbour in U1 and no other."""
    msg = parse_shares(
        blob, identity=identity, cohort_id=cohort_id, client_id=client_id, where=where
    )
    expected = neighbours & u1
    if set(msg.ciphertexts) != expected:
        raise IntegrityError(
            f"{where}: shares addressed to {sorted(msg.ciphertexts)}, expected {sorted(expected)}"
        )
    return msg


def admit_unmask(
    blob: bytes,
    *,
    identity: bytes,
    cohort_id: str,
    client_id: str,
    where: str,
    neighbours: Set[str],
    u2: Set[str],
    u3: Set[str],
) -> UnmaskMsg:
    """Round 4: signed; self-mask shares only for survivors, key shares only for dropouts.

    A reveal of both shares of one member would unmask its individual input, so a
    message that asks for more than the rules allow is refused whole.
    """
    msg = parse_unmask(
        blob, identity=identity, cohort_id=cohort_id, client_id=client_id, where=where
    )
    if not set(msg.self_shares) <= (neighbours | {client_id}) & u3:
        raise IntegrityError(
            f"{where}: self-mask shares for non-survivors {sorted(set(msg.self_shares) - u3)}"
        )
    if not set(msg.key_shares) <= neighbours & (u2 - u3):
        raise IntegrityError(
            f"{where}: key shares for members that are not dropouts {sorted(set(msg.key_shares) - (u2 - u3))}"
        )
    if msg.inputs != tuple(sorted(u3)):
        differ = sorted(set(msg.inputs) ^ set(u3))
        raise IntegrityError(
            f"{where}: reveal made for another input set ({len(msg.inputs)} members; "
            f"{differ[:5]} differ from the U3 unmasked with)"
        )
    return msg


def admit_consistency(
    blob: bytes, *, identity: bytes, cohort_id: str, client_id: str, where: str
) -> ConsistencyMsg:
    """Round 3b: a member's signature over the input set it was shown (itself included)."""
    return parse_consistency(
        blob, identity=identity, cohort_id=cohort_id, client_id=client_id, where=where
    )


def agreeing(msgs: Mapping[str, ConsistencyMsg], *, cohort_id: str, inputs: Set[str]) -> list[str]:
    """The members of ``inputs`` whose verified signature is over exactly ``inputs``.

    ``msgs`` maps the member whose identity key verified the message to it. A signature
    from a non-member of the set, for another cohort, by another sender or over any other
    set never counts: the quorum is of the set's own members agreeing on it.
    """
    want = tuple(sorted(inputs))
    return sorted(
        c
        for c, m in msgs.items()
        if c in inputs and m.client_id == c and m.cohort_id == cohort_id and m.inputs == want
    )


def quorum_size(n: int, t: int) -> int:
    """How many members of U3 must sign the identical U3 before anyone reveals: ``t``.

    Bonawitz et al. 2017, section 4 (ConsistencyCheck): at least ``t`` signatures.
    ``t`` is the Shamir threshold, which every device has checked is a strict majority
    of a member's ``k + 1`` share holders (``fedcore.device.machine.params_fault``); ``n``
    (the cohort's size) is what a stricter rule would need. The device machine, the
    device's ``SecureRound`` and the function all ask here, so the rule is one line.
    """
    return t


def signed_quorum(
    msgs: Mapping[str, ConsistencyMsg], *, cohort_id: str, inputs: Set[str], n: int, t: int
) -> list[str]:
    """The members of ``inputs`` who signed exactly ``inputs``; ``IntegrityError`` (with the
    reason) if they are fewer than ``quorum_size(n, t)``: then no member reveals and the
    function does not unmask. The device and the function call this one rule."""
    need = quorum_size(n, t)
    if need < 1:
        raise IntegrityError(f"a quorum of {need} (t={t}) is no quorum")
    signers = agreeing(msgs, cohort_id=cohort_id, inputs=inputs)
    if len(signers) < need:
        raise IntegrityError(
            f"only {len(signers)} members of the input set of {len(inputs)} signed it; "
            f"need {need} (t={t})"
        )
    return signers


def public_value(msg: KeysMsg | SharesMsg | UnmaskMsg) -> str | None:
    """What a finalize needs from a verified message (``Manifest.verified``); None for unmask.

    Round 1: the mask-agreement key ``s_pk`` (base64); round 2: the self-mask seed
    commitment (sha256 hex).
    """
    if isinstance(msg, KeysMsg):
        return crypto.b64(msg.s_pk)
    if isinstance(msg, SharesMsg):
        return str(msg.self_commit)
    return None
