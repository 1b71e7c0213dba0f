"""Adaptive inputs deadlines: sizing from reported training seconds, and the metadata fields
(plaintext ``UpdateMeta.train_s``, the signed ``MaskedMeta.train_s`` of secure uploads)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from fedcore.codec import UpdateMeta, encode_tensors, parse_header
from fedcore.errors import IntegrityError, NotFoundError
from fedcore.secagg import crypto
from fedcore.secagg.protocol import (
    DOMAIN_MASKED,
    MASKED_TENSOR,
    MaskedMeta,
    masked_metadata,
    parse_masked_metadata,
)
from fedcore.server import secure
from fedcore.server.deadlines import (
    TRAIN_P90,
    TRAIN_REPORTS,
    RecentTraining,
    inputs_deadline_s,
    percentile,
    train_metrics,
)
from fedcore.server.settings import ServerSettings


def test_percentile_is_nearest_rank() -> None:
    assert percentile([5.0], 90) == 5.0
    assert percentile([float(i) for i in range(1, 11)], 90) == 9.0
    assert percentile([3.0, 1.0, 2.0], 90) == 3.0
    assert train_metrics([]) == {}
    assert train_metrics([1.0, 2.0, 30.0]) == {TRAIN_P90: 30.0, "train_s_reports": 3}


def test_deadline_is_margin_times_the_slowest_recent_p90_within_bounds() -> None:
    """GIVEN margin 2 and bounds [10, 100] THEN recent p90s of 12 and 30 give 60; tiny ones
    give the minimum, huge ones the maximum; no reports, or margin 0, keep the fixed one."""
    s = ServerSettings(
        round_deadline_s=600.0, deadline_margin=2.0, deadline_min_s=10.0, deadline_max_s=100.0
    )
    assert inputs_deadline_s(s, [12.0, 30.0]) == 60.0
    assert inputs_deadline_s(s, [1.0]) == 10.0
    assert inputs_deadline_s(s, [500.0]) == 100.0
    assert inputs_deadline_s(s, []) == 600.0
    fixed = ServerSettings(round_deadline_s=600.0)
    assert inputs_deadline_s(fixed, [30.0]) == 600.0
    with pytest.raises(ValueError):
        ServerSettings(deadline_min_s=10.0, deadline_max_s=5.0)


def test_recent_training_reads_each_version_once_and_skips_what_it_cannot_use() -> None:
    """GIVEN versions 1-4 (v2 without reports, v3 unreadable, v4 malformed) THEN the window
    yields what is usable, and each version is read once however often formation asks."""
    reads: list[int] = []
    metrics = {1: {TRAIN_P90: 8.0}, 2: {}, 4: {TRAIN_P90: "fast"}, 5: {TRAIN_P90: 20.0}}

    def read(version: int) -> dict:  # type: ignore[type-arg]
        reads.append(version)
        if version == 3:
            raise NotFoundError("v3")
        return metrics[version]

    recent = RecentTraining(read)
    assert recent.p90s(5, 5) == [20.0, 8.0]
    assert recent.p90s(5, 2) == [20.0]
    assert reads == [5, 4, 3, 2, 1]
    assert recent.p90s(5, 5) == [20.0, 8.0]
    assert reads == [5, 4, 3, 2, 1, 3]  # only the unreadable one is read again
    assert recent.p90s(0, 5) == []  # version 0 is the seed: never trained


def test_update_meta_train_s_is_optional_and_byte_compatible() -> None:
    """GIVEN an update without train_s THEN its metadata is what it was before the field
    (no key); old metadata parses; a reported value round-trips; nonsense is refused."""
    old = UpdateMeta("c00000001", "a", 0, 10, 0.5)
    doc = json.loads(old.to_metadata()["fedcore"])
    assert "train_s" not in doc
    assert UpdateMeta.from_metadata(old.to_metadata(), where="k") == old
    new = UpdateMeta("c00000001", "a", 0, 10, 0.5, train_s=12.5)
    assert UpdateMeta.from_metadata(new.to_metadata(), where="k").train_s == 12.5
    for bad in (-1.0, 1e9, "12", True, float("nan")):
        meta = new.to_metadata()
        raw = json.loads(meta["fedcore"])
        raw["train_s"] = bad
        with pytest.raises(IntegrityError):
            UpdateMeta.from_metadata({**meta, "fedcore": json.dumps(raw)}, where="k")


def test_masked_meta_train_s_is_optional_signed_and_byte_compatible() -> None:
    """GIVEN a masked upload's signed metadata without train_s THEN it is byte for byte what
    it was before the field (no key, the same signature) and still verifies; a reported
    value round-trips under the signature; changing it breaks the signature; nonsense
    that is validly signed is refused."""
    sk, pk = crypto.ed25519_keypair()
    ids = {"identity": pk, "cohort_id": "c00000001", "client_id": "a", "where": "k"}
    old = MaskedMeta("c00000001", "a", 0, 36, "0" * 64)
    md = masked_metadata(old, sk)
    doc = json.loads(md["fedcore"])
    assert "train_s" not in doc
    body = {k: v for k, v in doc.items() if k != "signature"}
    assert doc["signature"] == crypto.sign(sk, DOMAIN_MASKED, body)  # as before the field
    assert parse_masked_metadata(md, **ids) == old
    new = MaskedMeta("c00000001", "a", 0, 36, "0" * 64, train_s=12.5)
    md = masked_metadata(new, sk)
    assert parse_masked_metadata(md, **ids).train_s == 12.5
    raw = json.loads(md["fedcore"])
    raw["train_s"] = 1.0  # the server (or anyone) shortening what the member reported
    with pytest.raises(IntegrityError, match="signature"):
        parse_masked_metadata({**md, "fedcore": json.dumps(raw)}, **ids)
    for bad in (-1.0, 1e9, "12", True):
        raw = {k: v for k, v in json.loads(md["fedcore"]).items() if k != "signature"}
        raw["train_s"] = bad
        raw["signature"] = crypto.sign(sk, DOMAIN_MASKED, raw)
        with pytest.raises(IntegrityError, match="train_s"):
            parse_masked_metadata({**md, "fedcore": json.dumps(raw)}, **ids)


def test_masked_sum_carries_the_members_training_seconds_to_the_finalize() -> None:
    """GIVEN a sum written with the input round's training metrics THEN the finalize reads
    them back; a sum written without any has the metadata of before (no metrics key)."""
    total = np.arange(5, dtype=np.uint32)
    plain = secure.encode_sum(total, ["b", "a"], "c00000001", train_metrics([]))
    assert secure.sum_metrics(plain, where="k") == {}
    assert set(parse_header(plain, where="k").metadata) == {"format", "cohort_id", "members"}
    train = train_metrics([10.0, 40.0])
    blob = secure.encode_sum(total, ["a", "b"], "c00000001", train)
    assert secure.sum_metrics(blob, where="k") == {TRAIN_P90: 40.0, TRAIN_REPORTS: 2}
    got = secure.decode_sum(blob, where="k", length=5, members=["a", "b"])
    np.testing.assert_array_equal(got, total)


def test_check_masked_returns_the_signed_training_seconds() -> None:
    """GIVEN a member's masked upload reporting 33 s THEN ``check_masked`` (what the input
    round's close streams) hands the value on with the vector."""
    sk, pk = crypto.ed25519_keypair()
    vec = np.arange(4, dtype=np.uint32)
    meta = MaskedMeta(
        "c00000001", "a", 0, 4, hashlib.sha256(vec.tobytes()).hexdigest(), train_s=33.0
    )
    blob = encode_tensors({MASKED_TENSOR: vec}, masked_metadata(meta, sk))
    got, signed = secure.check_masked(
        blob, where="k", length=4, identity=pk, cohort_id="c00000001", client_id="a",
        base_version=0,
    )  # fmt: skip
    np.testing.assert_array_equal(got, vec)
    assert signed.train_s == 33.0
