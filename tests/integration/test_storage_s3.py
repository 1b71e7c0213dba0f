"""The storage contract: conditional writes, listing and error mapping on real S3 APIs.

Every test runs on moto's server and on SeaweedFS (``both_backends``).
"""

from __future__ import annotations

import threading

import pytest

from fedcore.errors import AlreadyExistsError, ConflictError, NotFoundError, NotModifiedError
from fedcore.storage import S3Store
from tests.helpers import both_backends

pytestmark = both_backends


def test_put_new_is_write_once(store: S3Store) -> None:
    """GIVEN an object created with If-None-Match WHEN created again THEN AlreadyExistsError."""
    store.put_new("a/b.json", b"1")
    with pytest.raises(AlreadyExistsError, match=r"a/b\.json"):
        store.put_new("a/b.json", b"2")
    assert store.get("a/b.json").body == b"1"


def test_put_if_match_is_compare_and_swap(store: S3Store) -> None:
    """GIVEN a pointer read at ETag e WHEN someone else updates it first THEN our CAS fails."""
    etag = store.put_new("p.json", b"v0")
    e1 = store.put_if_match("p.json", b"v1", etag)
    with pytest.raises(ConflictError):
        store.put_if_match("p.json", b"stale", etag)
    store.put_if_match("p.json", b"v2", e1)
    assert store.get("p.json").body == b"v2"


def test_put_if_match_on_missing_key_is_conflict(store: S3Store) -> None:
    with pytest.raises(ConflictError):
        store.put_if_match("missing.json", b"x", '"abc"')


def test_concurrent_write_once_has_exactly_one_winner(store: S3Store) -> None:
    """GIVEN 16 threads racing to create one key THEN exactly one wins and its body is stored."""
    winners: list[int] = []
    barrier = threading.Barrier(16)

    def race(i: int) -> None:
        barrier.wait()
        try:
            store.put_new("race.bin", str(i).encode())
            winners.append(i)
        except AlreadyExistsError:
            pass

    threads = [threading.Thread(target=race, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1
    assert store.get("race.bin").body == str(winners[0]).encode()


def test_concurrent_cas_increments_lose_nothing(store: S3Store) -> None:
    """GIVEN 8 threads each incrementing a counter 5 times with CAS retry THEN it reads 40."""
    store.put_new("counter", b"0")

    def bump() -> None:
        for _ in range(5):
            while True:
                obj = store.get("counter")
                try:
                    store.put_if_match("counter", str(int(obj.body) + 1).encode(), obj.etag)
                    break
                except ConflictError:
                    continue

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("counter").body == b"40"


def test_conditional_get_and_errors(store: S3Store) -> None:
    etag = store.put_new("x", b"abc")
    with pytest.raises(NotModifiedError):
        store.get("x", if_none_match=etag)
    with pytest.raises(NotFoundError, match="nope"):
        store.get("nope")
    assert store.head("nope") is None
    assert store.get_range("x", 1, 1) == b"b"


def test_listing_paginates_and_lists_prefixes(store: S3Store) -> None:
    """GIVEN more keys than one list page THEN list follows continuation tokens, in order."""
    keys = [f"many/{i:05d}" for i in range(25)]
    for k in keys:
        store.put(k, b"")
    assert [o.key for o in store.list("many/", page_size=7)] == keys
    assert [o.key for o in store.list("many/", start_after="many/00020", page_size=2)] == keys[21:]
    for c in ("c1", "c2", "c3"):
        store.put(f"cohorts/{c}/config.json", b"{}")
        store.put(f"cohorts/{c}/state/x.json", b"{}")
    assert store.list_prefixes("cohorts/") == ["cohorts/c1/", "cohorts/c2/", "cohorts/c3/"]
    assert store.list_prefixes("cohorts/", start_after="cohorts/c1/~") == [
        "cohorts/c2/",
        "cohorts/c3/",
    ]


def test_delete_many_and_ranged_reads(store: S3Store) -> None:
    """GIVEN three objects WHEN delete_many names two of them and a missing key THEN those
    two are gone and the missing key is no error; ranged reads stop at the end of the object
    and are empty past it."""
    for k in ("d/1", "d/2", "d/3"):
        store.put_new(k, b"0123456789")
    store.delete_many(["d/1", "d/2", "d/missing"])
    store.delete_many([])
    assert [o.key for o in store.list("d/")] == ["d/3"]
    assert store.get_range("d/3", 2, 4) == b"234"
    assert store.get_range("d/3", 8, 20) == b"89"
    assert store.get_range("d/3", 10, 20) == b""
