"""The one listing difference SeaweedFS showed from moto and AWS, and that the code copes.

SeaweedFS keeps an emptied "folder" listed as a common prefix. The storage
contract itself runs on both servers in tests/integration/test_storage_s3.py.
"""

from __future__ import annotations

from fedcore import layout
from fedcore.server.coordinator import Coordinator
from fedcore.server.settings import ServerSettings
from fedcore.storage import S3Store
from tests.helpers import participant
from tests.integration.test_protocol import tiny_seed


def test_emptied_folder_stays_listed_and_cohort_discovery_looks_past_it(store: S3Store) -> None:
    """GIVEN a cohort folder whose only object was deleted after a device checked in
    THEN SeaweedFS still lists it as a prefix (AWS and moto drop it: prefixes exist only
    through objects), formation counts it when picking the next id, and the device
    still finds the cohort formed after it."""
    tiny_seed(store)
    device = participant(store, "a")  # enrolled: formation checks signed check-ins
    tickets = {"a": device.check_in(0), "b": participant(store, "b").check_in(0)}
    stray = layout.COHORTS_PREFIX + layout.cohort_id(1) + "/"
    store.put_new(stray + "junk", b"x")
    store.delete(stray + "junk")
    assert list(store.list(stray)) == []
    assert store.list_prefixes(layout.COHORTS_PREFIX) == [stray]  # the difference
    coord = Coordinator(store, ServerSettings(cohort_size=2, min_cohort_size=2, mode="plaintext"))
    (formed,) = coord.form_cohorts()
    assert formed == layout.cohort_id(2)
    cfg, _ = device.find_cohort(tickets["a"])
    assert cfg is not None and cfg.cohort_id == formed and set(cfg.members) == {"a", "b"}
