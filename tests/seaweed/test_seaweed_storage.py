"""The storage contract on SeaweedFS: the moto suite's tests, run against this server.

Plus the one listing difference found: SeaweedFS keeps an emptied "folder"
listed as a common prefix, and the code that lists prefixes copes with it.
"""

from __future__ import annotations

from fedcore import layout
from fedcore.participant import Participant
from fedcore.server.coordinator import Coordinator
from fedcore.server.settings import ServerSettings
from fedcore.storage import S3Store
from tests.integration.test_protocol import tiny_seed
from tests.integration.test_storage_s3 import (
    test_concurrent_cas_increments_lose_nothing,
    test_concurrent_write_once_has_exactly_one_winner,
    test_conditional_get_and_errors,
    test_delete_many_and_ranged_reads,
    test_listing_paginates_and_lists_prefixes,
    test_put_if_match_is_compare_and_swap,
    test_put_if_match_on_missing_key_is_conflict,
    test_put_new_is_write_once,
)

__all__ = [
    "test_concurrent_cas_increments_lose_nothing",
    "test_concurrent_write_once_has_exactly_one_winner",
    "test_conditional_get_and_errors",
    "test_delete_many_and_ranged_reads",
    "test_listing_paginates_and_lists_prefixes",
    "test_put_if_match_is_compare_and_swap",
    "test_put_if_match_on_missing_key_is_conflict",
    "test_put_new_is_write_once",
]


def test_emptied_folder_stays_listed_and_cohort_discovery_looks_past_it(store: S3Store) -> None:
    """GIVEN a cohort folder whose only object was deleted after a device checked in
    THEN SeaweedFS still lists it as a prefix (AWS and moto drop it: prefixes exist only
    through objects), formation counts it when picking the next id, and the device
    still finds the cohort formed after it."""
    tiny_seed(store)
    device = Participant(store, "a", mode="plaintext")
    tickets = {"a": device.check_in(0), "b": Participant(store, "b", mode="plaintext").check_in(0)}
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
