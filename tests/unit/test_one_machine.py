"""The blocking device loop and the many-device simulator run one protocol machine.

Issue 12's acceptance: no second copy of the device's stages. Cheap and torch-free:
the source has no stage enum outside ``fedcore.device``, and a plaintext cohort
played by the simulator's ``Worker`` and by the blocking ``drive`` loop (both with
``SyntheticDevice`` updates, over a dict-backed bucket) steps
``fedcore.device.machine.step`` for every answer.
"""

from __future__ import annotations

import ast
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedcore.device.runner as runner_module
import sim.worker as worker_module
from fedcore import layout
from fedcore.device import SyntheticDevice, Update, machine, run_cohort
from fedcore.device.machine import Outcome
from fedcore.errors import AlreadyExistsError, NotFoundError
from fedcore.layout import Kind
from fedcore.messages import CohortConfig, Mode, Pointer
from fedcore.participant import Participant
from fedcore.secagg import crypto
from fedcore.storage import ObjectInfo, StoredObject
from sim.worker import SimDevice, SimSettings, Worker, _ModelCache

ROOT = Path(__file__).resolve().parents[2]
KEY = crypto.ed25519_keypair()[0]  # plaintext updates are signed


class DictStore:
    """Just enough of ``ObjectStore`` for check-ins and plaintext uploads."""

    bucket = "test"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def get(self, key: str, *, if_none_match: str | None = None) -> StoredObject:
        if key not in self.objects:
            raise NotFoundError(key)
        body = self.objects[key]
        return StoredObject(key, body, hashlib.md5(body).hexdigest())

    def head(self, key: str) -> ObjectInfo | None:
        body = self.objects.get(key)
        return None if body is None else ObjectInfo(key, len(body), "", time.time())

    def put_new(self, key: str, body: bytes, **kwargs: Any) -> str:
        if key in self.objects:
            raise AlreadyExistsError(key)
        self.objects[key] = body
        return hashlib.md5(body).hexdigest()

    def list_prefixes(self, prefix: str, *, start_after: str | None = None) -> list[str]:
        found = {
            prefix + k[len(prefix) :].split("/", 1)[0] + "/"
            for k in self.objects
            if k.startswith(prefix) and "/" in k[len(prefix) :]
        }
        return sorted(p for p in found if start_after is None or p > start_after)


def plain_config(members: list[str], nonces: dict[str, str]) -> CohortConfig:
    return CohortConfig(
        cohort_id="c00000001", base_version=0, members={m: nonces[m] for m in members},
        mode=Mode.PLAINTEXT, min_members=len(members), created_at=time.time(),
        phase_s={"inputs": 60.0}, secagg=None,
    )  # fmt: skip


def synthetic(cfg: CohortConfig) -> Update:
    return Update({"w": np.ones(3, np.float32)}, num_samples=5, loss=0.5)


@pytest.fixture
def counted_step(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of the machine's ``step``, by the module that made it."""
    calls: list[str] = []
    real = machine.step

    def counting(module: str) -> Any:
        def step(state: machine.DeviceState, obs: machine.Observation) -> Any:
            calls.append(module)
            return real(state, obs)

        return step

    # Both drivers hold the machine's own function (not a copy) under the name ``step``.
    assert worker_module.step is real and runner_module.step is real
    monkeypatch.setattr(worker_module, "step", counting("sim"))
    monkeypatch.setattr(runner_module, "step", counting("loop"))
    return calls


@pytest.mark.parametrize("path", ["sim/worker.py", "edge_client/device.py"])
def test_no_stage_machine_outside_fedcore_device(path: str) -> None:
    """Neither driver defines an enum of its own (the old ``Stage`` copy)."""
    tree = ast.parse((ROOT / path).read_text())
    enums = [
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef)
        and any(getattr(b, "id", getattr(b, "attr", "")).endswith("Enum") for b in node.bases)
    ]
    assert enums == [], f"{path} defines {enums}: the stages belong to fedcore.device.machine"


def test_simulator_worker_and_blocking_loop_both_step_the_machine(
    counted_step: list[str],
) -> None:
    # GIVEN two plaintext devices played by one simulator worker, a version 0 to train from
    store = DictStore()
    settings = SimSettings(devices=2, workers=1, mode="plaintext", client_prefix="t")
    devices = [
        SimDevice(i, c, np.arange(1), p, SyntheticDevice(synthetic))
        for i, c in enumerate(settings.client_id(i) for i in range(2))
        for p in [Participant(store, c, mode="plaintext", signing_key=KEY)]  # type: ignore[arg-type]
    ]
    events: list[dict[str, Any]] = []
    worker = Worker(store, settings, devices, models=_ModelCache(store), report=events.append)  # type: ignore[arg-type]
    worker.view.pointer = Pointer(0, "global/v0", "", time.time())

    # WHEN each checks in, a cohort takes both check-ins, and the worker trains and uploads
    for d in devices:
        worker._step(d)
    assert all(d.stage is machine.Stage.CHECKED_IN for d in devices)
    nonces = {d.client_id: d.state.ticket.nonce for d in devices}  # type: ignore[union-attr]
    cfg = plain_config(list(nonces), nonces)
    for client, nonce in nonces.items():
        worker.view.taken[(client, nonce)] = cfg
    for d in devices:
        worker._step(d)
    while worker._train_queue:
        worker._train_next()

    # THEN both completed through the machine's step, and their updates are in the bucket
    assert [e["outcome"] for e in events] == ["completed", "completed"]
    assert all(d.stage is machine.Stage.IDLE and d.state.rounds == 1 for d in devices)  # type: ignore[union-attr]
    assert all(layout.member_key(cfg.cohort_id, Kind.PLAIN, c) in store.objects for c in nonces)
    sim_steps = counted_step.count("sim")
    assert sim_steps >= 2 * 6  # version, budget, check-in, cohort, admission, trained, written

    # AND the blocking loop plays the same cohort for a device through the same step
    store.objects.clear()
    p = Participant(store, "t-0000", mode="plaintext", signing_key=KEY)  # type: ignore[arg-type]
    state = run_cohort(p, cfg, synthetic)
    assert state.outcome is Outcome.COMPLETED
    assert counted_step.count("loop") >= 3  # admission, trained, written
