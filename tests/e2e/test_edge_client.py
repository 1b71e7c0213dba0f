"""End to end on a tiny slice: real `python -m edge_client` processes, real handlers,
real S3 events, the moto server, and the real MNIST data (a few hundred images)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from edge_client.model import build, to_numpy
from edge_client.train import TrainSettings, evaluate, train_local
from fedcore.modelspec import SIMPLE_CNN, init_params, num_parameters
from fedcore.storage import S3Store
from fedcore.versions import find_head, read_meta
from infra.stack import LocalStack
from tests.helpers import assert_consistent


def test_model_matches_the_torch_free_spec() -> None:
    """GIVEN the torch model and the numpy init THEN names, shapes and parameter count agree."""
    model = build(init_params(seed=1))
    params = to_numpy(model)
    assert {k: v.shape for k, v in params.items()} == SIMPLE_CNN
    assert num_parameters() == 1_199_882 == sum(v.size for v in params.values())
    np.testing.assert_array_equal(params["fc2.bias"], init_params(seed=1)["fc2.bias"])


def test_local_training_learns() -> None:
    from edge_client.data import load_mnist

    m = load_mnist(progress=None)
    model = build(init_params())
    before, _ = evaluate(model, m.test_x[:500], m.test_y[:500])
    res = train_local(
        model, m.train_x[:1000], m.train_y[:1000], TrainSettings(epochs=1, batch_size=32)
    )
    after, _ = evaluate(model, m.test_x[:500], m.test_y[:500])
    assert res.num_samples == 1000 and res.steps == 32
    assert after > max(0.6, before + 0.3)


def _run_devices(
    s3_endpoint: str,
    store: S3Store,
    state_dir: Path,
    *,
    until_version: int,
    extra: list[str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Three `python -m edge_client run` processes with 200 images each, until a version;
    their environment and outputs (each must exit 0)."""
    env = dict(
        os.environ, S3_ENDPOINT_URL=s3_endpoint, BUCKET=store.bucket, FL_STATE_DIR=str(state_dir)
    )
    procs = [
        subprocess.Popen(
            [
                *[sys.executable, "-m", "edge_client", "run", "--client-id", f"dev-{i}"],
                *["--num-shards", "3", "--shard", str(i), "--max-samples", "200"],
                *["--until-version", str(until_version), "--poll-s", "0.2", *(extra or [])],
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    return env, outputs


def test_devices_train_two_versions_through_the_stack(
    s3_endpoint: str, store: S3Store, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """GIVEN 3 device processes with 200 images each, cohorts of 3 under secure aggregation,
    every event delivered twice and shuffled WHEN they run until version 2 THEN two versions
    exist, each applying one cohort of all 3 devices, and `evaluate` and `status` read them."""
    settings = {
        "cohort_size": 3,
        "min_cohort_size": 2,
        "round_deadline_s": 120,
        "short_round_s": 30,
    }
    with LocalStack(
        endpoint_url=s3_endpoint,
        bucket=store.bucket,
        settings=settings,
        duplicate=True,
        shuffle=True,
    ):
        env, outputs = _run_devices(s3_endpoint, store, tmp_path, until_version=2)
    assert find_head(store) == 2
    for v in (1, 2):
        assert len(read_meta(store, v).members) == 3
    assert "masked update uploaded" in outputs[0] and "epoch 1/1" in outputs[0]
    assert "enrolled identity" in outputs[0] and "completed" in outputs[0]
    assert (tmp_path / "dev-0" / "identity.ed25519").stat().st_mode & 0o777 == 0o600
    assert_consistent(store)
    cli = [sys.executable, "-m", "edge_client"]
    ev = subprocess.run(
        [*cli, "evaluate", "--version", "2"], env=env, capture_output=True, text=True, timeout=120
    )
    assert ev.returncode == 0, ev.stderr
    assert "version 2: test accuracy" in ev.stdout
    st = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, timeout=60)
    assert st.returncode == 0, st.stderr
    assert "head version 2" in st.stdout and "applied v2" in st.stdout


def test_devices_train_the_dp_model_with_dp_sgd_through_the_stack(
    s3_endpoint: str, store: S3Store, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """GIVEN a bucket seeded with the DP-friendly model WHEN 3 device processes (no model
    flag: the bucket decides) train a secure cohort with DP-SGD at epsilon 3 THEN version 1
    is that model, and each device logged its noise and the epsilon it spent."""
    from fedcore.modelspec import model_of
    from fedcore.versions import load_model

    settings = {"cohort_size": 3, "min_cohort_size": 2, "round_deadline_s": 120}
    with LocalStack(
        endpoint_url=s3_endpoint, bucket=store.bucket, settings=settings, model="dp_cnn"
    ):
        dp_flags = [
            "--dp-epsilon", "3", "--dp-max-grad-norm", "0.1",
            "--batch-size", "50", "--lr", "2", "--momentum", "0.9",
        ]  # fmt: skip
        _, outputs = _run_devices(s3_endpoint, store, tmp_path, until_version=1, extra=dp_flags)
    params, _, _ = load_model(store, 1)
    assert model_of(params) == "dp_cnn"
    assert all(np.isfinite(v).all() for v in params.values())
    for out in outputs:
        assert "DP-SGD (noise" in out and "sample-level epsilon spent" in out
    assert_consistent(store)
