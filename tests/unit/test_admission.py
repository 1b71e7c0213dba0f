"""The SecAgg+ admission rules, pure (GIVEN / WHEN / THEN); and the coordinator's outcomes."""

from __future__ import annotations

import secrets

import pytest

from fedcore.errors import FedError, IntegrityError
from fedcore.secagg import admission, crypto
from fedcore.secagg.protocol import (
    SHARE_PLAINTEXT_BYTES,
    KeysMsg,
    SharesMsg,
    UnmaskMsg,
    encode_keys,
    encode_shares,
    encode_unmask,
)
from fedcore.server.vocabulary import CohortAborted, Outcome

COHORT = "c000001"
SIGNER = crypto.ed25519_keypair()[0]
IDENTITY = crypto.ed25519_public(SIGNER)
WHO = {"identity": IDENTITY, "cohort_id": COHORT, "client_id": "a", "where": "k"}


def shares_to(*receivers: str) -> bytes:
    cts = {r: secrets.token_bytes(SHARE_PLAINTEXT_BYTES + 28) for r in receivers}
    return encode_shares(SharesMsg(COHORT, "a", "0" * 64, cts), SIGNER)


def test_keys_are_admitted_signed_and_give_their_mask_key() -> None:
    """GIVEN a signed keys message WHEN admitted THEN its public value is s_pk (base64)."""
    c_pk, s_pk = secrets.token_bytes(32), secrets.token_bytes(32)
    msg = admission.admit_keys(encode_keys(KeysMsg(COHORT, "a", c_pk, s_pk), SIGNER), **WHO)
    assert admission.public_value(msg) == crypto.b64(s_pk)


def test_keys_signed_by_another_key_are_refused() -> None:
    """GIVEN keys signed by someone else WHEN admitted against a's identity THEN refused."""
    blob = encode_keys(
        KeysMsg(COHORT, "a", secrets.token_bytes(32), secrets.token_bytes(32)),
        crypto.ed25519_keypair()[0],
    )
    with pytest.raises(IntegrityError):
        admission.admit_keys(blob, **WHO)


def test_shares_go_to_exactly_the_neighbours_counted_in_round_one() -> None:
    """GIVEN neighbours {b, c, d} of which U1 holds b and c WHEN a sends shares THEN only
    {b, c} is admitted: one missing or one extra refuses the message."""
    rules = {"neighbours": {"b", "c", "d"}, "u1": {"a", "b", "c"}}
    msg = admission.admit_shares(shares_to("b", "c"), **WHO, **rules)  # type: ignore[arg-type]
    assert admission.public_value(msg) == "0" * 64
    for wrong in (("b",), ("b", "c", "d")):
        with pytest.raises(IntegrityError, match="shares addressed to"):
            admission.admit_shares(shares_to(*wrong), **WHO, **rules)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("self_shares", "key_shares", "ok"),
    [
        ({"a": 1, "b": 2}, {"c": 3}, True),  # survivors' seeds, a dropout's key
        ({"c": 1}, {}, False),  # a self-mask share of a dropout
        ({}, {"b": 3}, False),  # a key share of a survivor: would unmask b's input
        ({}, {"e": 3}, False),  # a key share of a non-neighbour
    ],
)
def test_unmask_reveals_only_what_the_rules_allow(
    self_shares: dict[str, int], key_shares: dict[str, int], ok: bool
) -> None:
    """GIVEN U2 = {a, b, c, e}, U3 = {a, b} and a's neighbours {b, c} WHEN a reveals
    THEN self-mask shares only of survivors and key shares only of dropped neighbours."""
    blob = encode_unmask(UnmaskMsg(COHORT, "a", self_shares, key_shares), SIGNER)
    rules = {"neighbours": {"b", "c"}, "u2": {"a", "b", "c", "e"}, "u3": {"a", "b"}}
    if ok:
        msg = admission.admit_unmask(blob, **WHO, **rules)  # type: ignore[arg-type]
        assert admission.public_value(msg) is None
    else:
        with pytest.raises(IntegrityError):
            admission.admit_unmask(blob, **WHO, **rules)  # type: ignore[arg-type]


def test_outcomes_read_as_the_words_logged_before() -> None:
    """GIVEN the outcome enum THEN each compares, formats and serializes as its old string."""
    assert Outcome.CLOSED == "closed" and f"{Outcome.NOOP}" == "noop"
    assert {o.value for o in Outcome} == {
        "ignored", "formed", "waiting", "noop", "rejected", "early", "late", "closed",
        "applied", "aborted",
    }  # fmt: skip


def test_cohort_aborted_is_a_fed_error_with_its_reason() -> None:
    exc = CohortAborted("inputs: 1 valid members < minimum 2", {"b": "bad"})
    assert isinstance(exc, FedError) and str(exc) == exc.reason and exc.rejected == {"b": "bad"}
