"""The S3 client's timestamp parser gives exactly what botocore's default parser gives."""

from __future__ import annotations

from datetime import UTC, datetime

from botocore.utils import parse_timestamp
from hypothesis import given
from hypothesis import strategies as st

from fedcore.storage import make_s3_client, parse_s3_timestamp


def same(got: datetime, text: str | int) -> bool:
    """Equal to botocore's answer, with the same offset (or both without one)."""
    want = parse_timestamp(text)
    return got == want and got.utcoffset() == want.utcoffset()


MOMENTS = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@given(MOMENTS)
def test_iso_8601_as_s3_lists_it(moment: datetime) -> None:
    for text in (
        moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
        moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        moment.isoformat(),
    ):
        assert same(parse_s3_timestamp(text), text), text


@given(MOMENTS)
def test_rfc_1123_as_s3_sends_it_in_headers(moment: datetime) -> None:
    text = moment.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert same(parse_s3_timestamp(text), text)


def test_anything_else_is_botocores_answer() -> None:
    """Epoch seconds, a zone-less ISO time, RFC 1123 with ``-0000`` (which the email
    parser leaves naive): botocore decides, whatever it decides."""
    for value in (
        "1796170468",
        1796170468,
        "2026-12-02T00:14:28",
        "Wed, 02 Dec 2026 00:14:28 -0000",
    ):
        assert same(parse_s3_timestamp(value), value), value


def test_the_client_parses_with_it() -> None:
    client = make_s3_client("http://127.0.0.1:1")
    parser = client._endpoint._response_parser_factory._defaults["timestamp_parser"]
    assert parser is parse_s3_timestamp
