"""The demo's "waiting for vN" lines say why (issue 16, item 5), from a constructed status."""

from __future__ import annotations

from fedcore.status import BucketView, CohortView
from infra.watch import waiting_lines

NOW = 1_000_000.0


def view(*cohorts: CohortView) -> BucketView:
    return BucketView(pointer_version=2, head_version=2, cohorts=list(cohorts))


def test_each_open_cohort_says_its_phase_who_it_waits_for_and_its_deadline() -> None:
    """GIVEN two open cohorts (inputs, 3 of 5 written, deadline in 37 s; keys, deadline
    4 s ago), one being finalized, an applied one and two aborted ones, one of which was
    already explained THEN the header counts the open cohorts and there is one line per
    open cohort and per unexplained abort, with its reason; the applied one is silent."""
    lines = waiting_lines(
        view(
            CohortView("c00000003", 1, 5, 0, ["keys"], "applied", 2),
            CohortView("c00000004", 1, 5, 0, [], "aborted", reason="inputs: 1 valid < 2"),
            CohortView("c00000005", 1, 5, 0, [], "aborted", reason="old news"),
            CohortView(
                "c00000006",
                2,
                5,
                0,
                ["keys", "shares"],
                open_phase="inputs",
                expected=5,
                written=3,
                deadline_at=NOW + 37.2,
            ),
            CohortView(
                "c00000007",
                2,
                4,
                0,
                [],
                open_phase="keys",
                expected=4,
                written=4,
                deadline_at=NOW - 4.0,
            ),
            CohortView(
                "c00000008", 2, 5, 0, ["keys", "shares", "inputs", "unmask"], open_phase="finalize"
            ),
        ),
        next_version=3,
        elapsed_s=125.4,
        now=NOW,
        reported={"c00000005"},
    )
    assert lines == [
        "... waiting for v3 (125s): 3 open cohorts",
        "    c00000006 (base v2): inputs, waiting for 2 of 5, deadline in 37s",
        "    c00000007 (base v2): keys, waiting for 0 of 4, deadline passed 4s ago",
        "    c00000008 (base v2): every phase closed, being finalized",
        "    c00000004 aborted: inputs: 1 valid < 2",
    ]


def test_no_open_cohort_says_so_and_a_cohort_without_a_limit_says_that() -> None:
    """GIVEN nothing open THEN one line saying so; GIVEN an open phase whose config sets
    no limit THEN its line says there is no deadline rather than inventing one."""
    assert waiting_lines(view(), next_version=1, elapsed_s=10.0, now=NOW) == [
        "... waiting for v1 (10s): no open cohort"
    ]
    one = CohortView("c00000001", 0, 2, 1, [], open_phase="inputs", expected=2, written=1)
    assert waiting_lines(view(one), next_version=1, elapsed_s=10.0, now=NOW)[1:] == [
        "    c00000001 (base v0): inputs, waiting for 1 of 2, no deadline"
    ]
