"""Bucket layout: keys round-trip through the parser; anything else is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fedcore import layout
from fedcore.errors import UnknownKeyError
from fedcore.layout import Kind, Phase

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)


@given(client=ids, nonce=ids, seq=st.integers(0, 99_999_999), version=st.integers(0, 10**7))
def test_every_key_parses_back(client: str, nonce: str, seq: int, version: int) -> None:
    cid = layout.cohort_id(seq)
    assert layout.parse_key(layout.model_key(version)).version == version
    p = layout.parse_key(layout.checkin_key(client, nonce))
    assert (p.kind, p.client_id, p.nonce) == (Kind.CHECKIN, client, nonce)
    assert layout.parse_key(layout.config_key(cid)).cohort_id == cid
    for kind in (Kind.KEYS, Kind.SHARES, Kind.MASKED, Kind.PLAIN, Kind.UNMASK):
        p = layout.parse_key(layout.member_key(cid, kind, client))
        assert (p.kind, p.cohort_id, p.client_id) == (kind, cid, client)
    for phase in Phase:
        assert layout.parse_key(layout.state_key(cid, phase)).phase is phase


@pytest.mark.parametrize(
    "key",
    [
        "global/latest.json.bak",
        "global/v1/model.safetensors",
        "checkins/../x.json",
        "checkins/a/b/c.json",
        "cohorts/c1/config.json",
        "cohorts/c00000001/plain/../../x.safetensors",
        "cohorts/c00000001/plain/a.json",
        "cohorts/c00000001/state/bogus.json",
        "cohorts/c00000001/other/a.json",
        "random",
        "",
        "global/latest.json\n",  # `$` alone would let a trailing newline through
        "cohorts/c00000001/config.json\n",
    ],
)
def test_keys_outside_the_layout_are_refused(key: str) -> None:
    with pytest.raises(UnknownKeyError):
        layout.parse_key(key)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "-x", ".x", "a" * 65, "a b", "ä", "a\n"])
def test_unsafe_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        layout.checkin_key(bad, "n1")
