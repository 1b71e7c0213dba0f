"""The device access policy (fedcore.access): properties over random clients and keys."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from fedcore import access, layout
from fedcore.access import CohortFacts
from fedcore.errors import UnknownKeyError
from fedcore.layout import Kind, Phase

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,15}", fullmatch=True)
cohorts = st.integers(0, 99_999_999).map(layout.cohort_id)
member_kinds = st.sampled_from(
    [Kind.KEYS, Kind.SHARES, Kind.MASKED, Kind.PLAIN, Kind.CONSISTENCY, Kind.UNMASK]
)
modes = st.sampled_from(["secagg", "plaintext"])
ops = st.sampled_from(access.OPS)


def everyone(mode: str = "secagg") -> access.CohortLookup:
    """A lookup under which every client is a member of every cohort (the adversary's best)."""

    class _All(frozenset[str]):
        def __contains__(self, item: object) -> bool:
            return True

    return lambda cid: CohortFacts(_All(), mode)


def members(cid: str, who: set[str], mode: str = "secagg") -> access.CohortLookup:
    return lambda c: CohortFacts(frozenset(who), mode) if c == cid else None


def layout_keys(client: str) -> st.SearchStrategy[str]:
    """Keys of every kind in the layout, with ``client`` in the client slot where there is one."""
    return st.one_of(
        st.just(layout.LATEST_KEY),
        st.integers(0, 10**6).map(layout.model_key),
        st.just(layout.identity_key(client)),
        ids.map(lambda n: layout.checkin_key(client, n)),
        cohorts.map(layout.config_key),
        st.builds(layout.state_key, cohorts, st.sampled_from(list(Phase))),
        st.builds(layout.sum_key, cohorts, st.text("0123456789abcdef", min_size=16, max_size=16)),
        st.builds(lambda c, k: layout.member_key(c, k, client), cohorts, member_kinds),
    )


@settings(max_examples=150, deadline=None)
@given(a=ids, b=ids, data=st.data(), mode=modes)
def test_no_key_in_another_clients_slot_is_ever_writable(a: str, b: str, data, mode: str) -> None:  # type: ignore[no-untyped-def]
    """GIVEN two distinct clients and a lookup that makes everyone a member of every cohort
    WHEN a asks to create any layout key that carries b's id THEN it is denied."""
    if a == b:
        return
    key = data.draw(layout_keys(b))
    assert not access.allowed(a, "put_new", key, cohort=everyone(mode)), key


@settings(max_examples=150, deadline=None)
@given(client=ids, key=st.text(string.printable, max_size=80), op=ops, mode=modes)
def test_whatever_is_writable_is_the_clients_own_layout_key(  # type: ignore[no-untyped-def]
    client: str, key: str, op: str, mode: str
) -> None:
    """GIVEN arbitrary text as a key WHEN the policy allows creating it THEN it parses as a
    check-in or member message whose client slot is the requester's."""
    if not access.allowed(client, "put_new", key, cohort=everyone(mode)):
        return
    parsed = layout.parse_key(key)
    assert parsed.client_id == client
    assert parsed.kind in (
        Kind.CHECKIN,
        Kind.KEYS,
        Kind.SHARES,
        Kind.MASKED,
        Kind.PLAIN,
        Kind.CONSISTENCY,
        Kind.UNMASK,
    )


@settings(max_examples=100, deadline=None)
@given(client=ids, data=st.data(), op=ops)
def test_server_objects_are_never_writable(client: str, data, op: str) -> None:  # type: ignore[no-untyped-def]
    """Identities, configs, manifests, sums, models and the pointer: never a device's to create."""
    cid = data.draw(cohorts)
    key = data.draw(
        st.sampled_from(
            [
                layout.LATEST_KEY,
                layout.model_key(data.draw(st.integers(0, 999))),
                layout.identity_key(client),
                layout.config_key(cid),
                layout.state_key(cid, data.draw(st.sampled_from(list(Phase)))),
                layout.sum_key(cid, "0123456789abcdef"),
            ]
        )
    )
    assert not access.allowed(client, "put_new", key, cohort=everyone())


@settings(max_examples=100, deadline=None)
@given(a=ids, b=ids, cid=cohorts, kind=st.sampled_from([Kind.MASKED, Kind.PLAIN, Kind.UNMASK]))
def test_other_members_inputs_and_reveals_are_unreadable(
    a: str, b: str, cid: str, kind: Kind
) -> None:
    """GIVEN a and b in the same cohort WHEN a asks to read b's input or reveal THEN denied
    (even though a may read b's key and share messages, which it needs)."""
    if a == b:
        return
    look = members(cid, {a, b})
    for op in access.READ_OPS:
        assert not access.allowed(a, op, layout.member_key(cid, kind, b), cohort=look)
        assert access.allowed(a, op, layout.member_key(cid, Kind.KEYS, b), cohort=look)
        assert access.allowed(a, op, layout.member_key(cid, Kind.SHARES, b), cohort=look)
        assert not access.allowed(a, op, layout.checkin_key(b, "n1"), cohort=look)
        assert not access.allowed(a, op, layout.sum_key(cid, "0123456789abcdef"), cohort=look)


@given(client=ids, cid=cohorts, kind=st.sampled_from([Kind.MASKED, Kind.PLAIN, Kind.UNMASK]))
def test_inputs_and_reveals_are_unreadable_even_to_their_sender(
    client: str, cid: str, kind: Kind
) -> None:
    """GIVEN a member WHEN it asks to read back its own input or reveal THEN denied: no device
    code reads one, so the gateway's role has no read grant on them (tests/infra/test_iam.py)."""
    look = members(cid, {client})
    for op in access.READ_OPS:
        assert not access.allowed(client, op, layout.member_key(cid, kind, client), cohort=look)


@given(a=ids, b=ids, cid=cohorts, kind=member_kinds, mode=modes)
def test_only_members_may_use_a_cohort(a: str, b: str, cid: str, kind: Kind, mode: str) -> None:
    """A non-member may neither write its slot in a cohort nor read members' keys or shares."""
    if a == b:
        return
    look = members(cid, {b}, mode)
    assert not access.allowed(a, "put_new", layout.member_key(cid, kind, a), cohort=look)
    assert not access.allowed(a, "get", layout.member_key(cid, Kind.KEYS, b), cohort=look)
    assert not access.allowed(a, "get", layout.member_key(cid, Kind.SHARES, b), cohort=look)


@given(client=ids, cid=cohorts, mode=modes)
def test_input_kind_must_match_the_cohort_mode(client: str, cid: str, mode: str) -> None:
    look = members(cid, {client}, mode)
    masked = access.allowed(
        client, "put_new", layout.member_key(cid, Kind.MASKED, client), cohort=look
    )
    plain = access.allowed(
        client, "put_new", layout.member_key(cid, Kind.PLAIN, client), cohort=look
    )
    assert (masked, plain) == ((True, False) if mode == "secagg" else (False, True))


@settings(max_examples=100, deadline=None)
@given(client=ids, prefix=st.text(string.printable, max_size=40))
def test_only_the_cohort_listings_are_allowed(client: str, prefix: str) -> None:
    """cohorts/ for anyone; cohorts/{id}/ only for the cohort's members (everyone here)."""
    ok = access.allowed(client, "list", prefix, cohort=everyone())
    expected = prefix == "cohorts/" or (
        prefix.startswith("cohorts/c")
        and prefix.endswith("/")
        and prefix.count("/") == 2
        and len(prefix) == len("cohorts/c00000000/")
        and prefix[9:17].isdigit()
    )
    assert ok == expected, prefix


def test_a_cohort_is_listed_and_its_config_and_manifests_read_only_by_its_members() -> None:
    """GIVEN dev-2 in c00000007 and dev-1 not THEN dev-1 may not list the cohort's objects
    (names, sizes, ETags) nor read its config, manifests or result; a config the lookup
    does not know (not written yet: S3 answers 404) is still asked for by discovery."""
    me, cid = "dev-1", "c00000007"
    look = members(cid, {"dev-2"})
    for op, target in [
        ("list", layout.cohort_prefix(cid)),
        ("get", layout.config_key(cid)),
        ("head", layout.config_key(cid)),
        *(("get", layout.state_key(cid, p)) for p in Phase),
    ]:
        decision = access.decide(me, op, target, cohort=look)
        assert not decision and decision.reason == "not a member of the cohort", target
        assert access.allowed("dev-2", op, target, cohort=look), target
    assert access.allowed(me, "get", layout.config_key("c00000099"), cohort=look)
    assert not access.allowed(me, "list", layout.cohort_prefix("c00000099"), cohort=look)


def test_devices_read_what_the_protocol_needs() -> None:
    """The reads the device code makes (participant.py, fedcore/device/secure.py, status.py)."""
    me, peer, cid = "dev-1", "dev-2", "c00000007"
    look = members(cid, {me, peer})
    for key in [
        layout.LATEST_KEY,
        layout.model_key(3),
        layout.identity_key(peer),
        layout.config_key("c00000099"),  # discovery asks for configs not written yet
        layout.state_key(cid, Phase.INPUTS),
        layout.state_key(cid, Phase.RESULT),
        layout.checkin_key(me, "abc"),
        layout.member_key(cid, Kind.KEYS, peer),
        layout.member_key(cid, Kind.SHARES, peer),
        layout.member_key(cid, Kind.KEYS, me),
    ]:
        assert access.allowed(me, "get", key, cohort=look), key
        assert access.allowed(me, "head", key, cohort=look), key
    assert access.allowed(me, "list", "cohorts/")
    assert access.allowed(me, "list", layout.cohort_prefix(cid), cohort=look)


def test_path_tricks_and_unknown_ops_are_denied() -> None:
    look = everyone()
    for key in [
        "cohorts/c00000001/keys/../masked/dev-1.safetensors",
        "checkins/dev-1/../dev-2/x.json",
        "enrollment/tokens/" + "0" * 64 + ".json",
        "gateway/nonces/dev-1/abcdefabcdefabcdef.json",
        "/checkins/dev-1/x.json",
        "",
    ]:
        for op in access.OPS:
            assert not access.allowed("dev-1", op, key, cohort=look), (op, key)
    for op in ("delete", "put", "put_if_match", "GET"):
        assert not access.allowed("dev-1", op, layout.checkin_key("dev-1", "n"), cohort=look)
    assert not access.allowed("../x", "get", layout.LATEST_KEY)
    # layout's patterns end in "$", which also matches before a final newline
    assert not access.allowed("dev-1\n", "get", layout.LATEST_KEY)
    assert not access.allowed("dev-1", "put_new", layout.checkin_key("dev-1", "n") + "\n")
    assert not access.valid_client_id("dev-1\n") and access.valid_client_id("dev-1")
    decision = access.decide("dev-1", "put_new", layout.checkin_key("dev-2", "n"))
    assert not decision and "another client" in decision.reason


def test_every_allowed_put_parses_in_the_layout() -> None:
    """Sanity link to the layout: a denied unknown key is one parse_key also refuses."""
    key = "cohorts/c00000001/other/dev-1.json"
    assert not access.allowed("dev-1", "put_new", key, cohort=everyone())
    try:
        layout.parse_key(key)
    except UnknownKeyError:
        pass
    else:  # pragma: no cover
        raise AssertionError("parse_key accepted a key outside the layout")
