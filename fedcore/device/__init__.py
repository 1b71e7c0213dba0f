"""The device's protocol: one pure machine, one crypto object, one runner (torch-free).

- ``machine``: ``step(state, observation) -> (state, actions)`` over a frozen
  ``DeviceState``; every stage, abort path and DP refusal, and the safety rules
  (``manifest_fault``, ``not_admitted``); no I/O, no clock.
- ``secure``: ``SecureRound``, the four secure-aggregation rounds' crypto and
  the per-cohort secrets (``flatten_weighted``: what the cohort sums).
- ``runner``: ``Runner.perform(action) -> observation | None`` against a
  ``Participant``, a ``SecureRound`` and a ``LocalDevice`` (training, privacy);
  ``drive`` is the blocking loop, ``run_cohort`` one known cohort.
- ``faults``: the ``DropHook`` the runner asks at a request's ``vanish_point``.

How a loop drives it (``edge_client.device.Device`` does exactly this)::

    state, actions = machine.start(Settings(client_id, Mode.SECAGG, ...))
    runner = Runner(participant, local_device, drop=RandomDrop(...), sleep=jittered)
    state = drive(runner, state, actions)  # until DONE; state.rounds, state.outcome

A step-wise simulator interleaves many devices instead. Per device it keeps
``(state, actions)`` and a non-blocking runner (``Runner(..., blocking=False)``),
and whenever that device may act:

    *effects, request = actions            # effects first (Say, BookRelease, Leave)
    for e in effects: runner.perform(e)    # Leave: the participation is over (report it)
    obs = runner.perform(request)          # one look / one write; Pending if nothing yet
    if not isinstance(obs, Pending):
        state, actions = machine.step(state, obs)

``request`` tells it what the device waits for (``AwaitPhase``, ``Train``, ...),
so it may answer some requests itself from a view shared by its devices
(``CohortFound`` from one listing, ``ManifestRead`` from one read of a manifest)
or queue ``Train`` requests and perform them later; the machine only needs the
observation. Waits time out on the runner's clock from their first look
(``TimedOut``); a simulator that answers a wait itself also decides its timeout.
``runner.perform`` may raise a ``StorageError`` (transient): the request was not
performed; perform it again later. ``state.stage is Stage.DONE`` (no request
left) when the device stops joining.
"""

from fedcore.device.faults import NO_DROP, DropAt, DropHook, NoDrop, RandomDrop
from fedcore.device.machine import (
    DROP_POINTS,
    DeviceState,
    DropPoint,
    Outcome,
    Settings,
    Stage,
    manifest_fault,
    not_admitted,
    params_fault,
    start,
    step,
)
from fedcore.device.runner import (
    LINES,
    LocalDevice,
    Polling,
    Runner,
    SyntheticDevice,
    Update,
    drive,
    run_cohort,
)
from fedcore.device.secure import SecureRound, flatten_weighted

__all__ = [
    "DROP_POINTS",
    "LINES",
    "NO_DROP",
    "DeviceState",
    "DropAt",
    "DropHook",
    "DropPoint",
    "LocalDevice",
    "NoDrop",
    "Outcome",
    "Polling",
    "RandomDrop",
    "Runner",
    "SecureRound",
    "Settings",
    "Stage",
    "SyntheticDevice",
    "Update",
    "drive",
    "flatten_weighted",
    "manifest_fault",
    "not_admitted",
    "params_fault",
    "run_cohort",
    "start",
    "step",
]
