"""The SecAgg+ admission rules, pure (GIVEN / WHEN / THEN); and the coordinator's outcomes."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore.errors import FedError, IntegrityError
from fedcore.secagg import admission, crypto
from fedcore.secagg.protocol import (
    SHARE_PLAINTEXT_BYTES,
    ConsistencyMsg,
    KeysMsg,
    SharesMsg,
    UnmaskMsg,
    encode_consistency,
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
    blob = encode_unmask(UnmaskMsg(COHORT, "a", self_shares, key_shares, ("a", "b")), SIGNER)
    rules = {"neighbours": {"b", "c"}, "u2": {"a", "b", "c", "e"}, "u3": {"a", "b"}}
    if ok:
        msg = admission.admit_unmask(blob, **WHO, **rules)  # type: ignore[arg-type]
        assert admission.public_value(msg) is None
    else:
        with pytest.raises(IntegrityError):
            admission.admit_unmask(blob, **WHO, **rules)  # type: ignore[arg-type]


@pytest.mark.parametrize("inputs", [(), ("a",), ("a", "b", "c")])
def test_a_reveal_made_for_another_input_set_is_refused(inputs: tuple[str, ...]) -> None:
    """GIVEN a reveal that names an input set other than the U3 the function unmasks with
    (an equivocating server showed its sender another U3) THEN it is refused."""
    blob = encode_unmask(UnmaskMsg(COHORT, "a", {"a": 1}, {}, inputs), SIGNER)
    rules = {"neighbours": {"b", "c"}, "u2": {"a", "b", "c"}, "u3": {"a", "b"}}
    with pytest.raises(IntegrityError, match="another input set"):
        admission.admit_unmask(blob, **WHO, **rules)  # type: ignore[arg-type]


def _signed(who: str, inputs: tuple[str, ...], cohort: str = COHORT) -> ConsistencyMsg:
    blob = encode_consistency(ConsistencyMsg(cohort, who, inputs), SIGNER)
    return admission.admit_consistency(
        blob, identity=IDENTITY, cohort_id=cohort, client_id=who, where="k"
    )


def test_consistency_quorum_counts_only_signatures_over_the_identical_set() -> None:
    """GIVEN members' signed input sets THEN only U3's members signing exactly U3 count,
    and fewer than t of them is refused with the reason."""
    u3 = ("a", "b", "c")
    msgs = {"a": _signed("a", u3), "b": _signed("b", u3), "c": _signed("c", ("a", "c"))}
    assert admission.signed_quorum(msgs, cohort_id=COHORT, inputs=set(u3), n=3, t=2) == ["a", "b"]
    with pytest.raises(
        IntegrityError, match=r"only 2 members of the input set of 3 signed it; need 3 \(t=3\)"
    ):
        admission.signed_quorum(msgs, cohort_id=COHORT, inputs=set(u3), n=3, t=3)
    with pytest.raises(IntegrityError, match="leaves it out"):
        _signed("d", u3)


def test_a_consistency_signature_by_another_key_or_for_another_cohort_is_refused() -> None:
    """GIVEN a signature under a key that is not the member's, or naming another cohort
    (replayed) THEN it is refused before it can count."""
    blob = encode_consistency(ConsistencyMsg(COHORT, "a", ("a", "b")), crypto.ed25519_keypair()[0])
    with pytest.raises(IntegrityError, match="bad signature"):
        admission.admit_consistency(
            blob, identity=IDENTITY, cohort_id=COHORT, client_id="a", where="k"
        )
    blob = encode_consistency(ConsistencyMsg("c00000099", "a", ("a", "b")), SIGNER)
    with pytest.raises(IntegrityError, match="replayed or misplaced"):
        admission.admit_consistency(
            blob, identity=IDENTITY, cohort_id=COHORT, client_id="a", where="k"
        )


_ids = st.sampled_from(["a", "b", "c", "d", "e", "f"])


@settings(max_examples=200, deadline=None)
@given(
    u3=st.sets(_ids, min_size=1),
    signed=st.dictionaries(
        _ids,
        st.tuples(st.sets(_ids), st.sampled_from([COHORT, "c00000099"]), _ids),
        max_size=6,
    ),
    t=st.integers(1, 6),
)
def test_quorum_holds_iff_t_members_of_the_set_signed_exactly_it(
    u3: set[str], signed: dict[str, tuple[set[str], str, str]], t: int
) -> None:
    """GIVEN any signatures (over any set, any cohort, by any named sender, keyed by the
    member whose key verified them) THEN the quorum holds iff at least t members of U3
    verified a message naming themselves, this cohort and exactly U3; the signers
    returned are exactly those, and two different sets never both reach a quorum of
    the same signatures when t is a strict majority of their union."""
    msgs = {c: ConsistencyMsg(cid, who, tuple(sorted(s))) for c, (s, cid, who) in signed.items()}
    expect = sorted(
        c
        for c, (s, cid, who) in signed.items()
        if c in u3 and s == u3 and cid == COHORT and who == c
    )
    if len(expect) >= t:
        assert admission.signed_quorum(msgs, cohort_id=COHORT, inputs=u3, n=6, t=t) == expect
    else:
        with pytest.raises(IntegrityError):
            admission.signed_quorum(msgs, cohort_id=COHORT, inputs=u3, n=6, t=t)
    other = set(u3) ^ {"a"}
    if other and 2 * t > len(u3 | other):
        agreed = [
            s for s in (u3, other) if len(admission.agreeing(msgs, cohort_id=COHORT, inputs=s)) >= t
        ]
        assert len(agreed) <= 1  # one message per member: majorities of the union overlap


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
