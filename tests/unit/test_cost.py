"""The cost report's arithmetic and request classes (prices from infra/aws-prices.json)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from infra.cost import InvocationMeter, S3Usage, estimate, load_prices, price_class


@pytest.mark.parametrize(
    ("method", "path", "cls"),
    [
        ("PUT", "/bkt/cohorts/c1/keys/a.json", "tier1"),
        ("POST", "/bkt", "tier1"),  # DeleteObjects
        ("GET", "/bkt", "tier1"),  # ListObjectsV2
        ("GET", "/bkt/", "tier1"),
        ("GET", "/bkt/global/v1.safetensors", "tier2"),
        ("HEAD", "/bkt/global/v1.safetensors", "tier2"),
        ("DELETE", "/bkt/checkins/a/n.json", "free"),
    ],
)
def test_requests_fall_into_s3_price_classes(method: str, path: str, cls: str) -> None:
    assert price_class(method, path) == cls


def test_estimate_prices_each_line_and_divides_per_version_and_participation() -> None:
    prices = load_prices()
    usage = S3Usage(
        requests=Counter({("device", "tier1"): 6000, ("function", "tier2"): 50000}),
        bytes_out=Counter({"device": 2 * 1024**3, "function": 10**9}),
    )
    meter = InvocationMeter()
    meter.calls.update({"aggregator": 1000, "gateway": 1000})
    meter.seconds.update({"aggregator": 2048.0, "gateway": 100.0})
    out = estimate(
        usage, meter, stored_bytes=1024**3, versions=10, participations=50, prices=prices
    )
    c, p = out["cost_usd"], prices
    assert c["s3_tier1_requests"] == pytest.approx(6 * p["s3"]["tier1_per_1000"])
    assert c["s3_tier2_requests"] == pytest.approx(50 * p["s3"]["tier2_per_1000"])
    assert c["transfer_out_to_devices"] == pytest.approx(2 * p["s3"]["transfer_out_gb"])
    assert c["s3_storage_month"] == pytest.approx(p["s3"]["storage_gb_month"])
    gb_s = 2048.0 * 1024 / 1024 + 100.0 * 256 / 1024  # the template's memory sizes
    assert c["lambda_duration"] == pytest.approx(gb_s * p["lambda"]["gb_second_arm64"], rel=1e-5)
    assert c["lambda_requests"] == pytest.approx(2000 * p["lambda"]["per_million_requests"] / 1e6)
    run = sum(v for k, v in c.items() if k != "s3_storage_month")
    assert out["run_usd"] == pytest.approx(run, abs=1e-5)
    assert out["per_version_usd"] == pytest.approx(run / 10, abs=1e-5)
    assert out["per_participation_usd"] == pytest.approx(run / 50, abs=1e-5)


def test_the_price_file_matches_the_template_s_memory_and_architecture() -> None:
    text = (Path(__file__).resolve().parents[2] / "template.yaml").read_text()
    dep = load_prices()["deployment"]
    assert f"Architectures: [{dep['architecture']}]" in text
    assert f"MemorySize: {dep['memory_mb']['aggregator']}" in text
    assert f"MemorySize: {dep['memory_mb']['gateway']}" in text


def test_the_embedded_server_meters_requests_by_caller_role() -> None:
    """GIVEN a device and a function client tagged with their roles WHEN they use the
    embedded S3 server THEN its meter counts each request in its class, with the bytes."""
    from fedcore.storage import S3Store
    from infra.s3server import EmbeddedS3

    with EmbeddedS3() as server:
        assert server.meter is not None
        fn = S3Store.connect("metered", server.endpoint_url, role="function")
        fn.ensure_bucket()
        dev = S3Store.connect("metered", server.endpoint_url, role="device")
        dev.put_new("checkins/a/1.json", b"x" * 100)
        assert dev.get("checkins/a/1.json").body == b"x" * 100
        list(fn.list("checkins/"))
        fn.delete("checkins/a/1.json")
        used = server.meter.usage
        assert used.requests[("device", "tier1")] == 1
        assert used.requests[("device", "tier2")] == 1
        assert used.requests[("function", "tier1")] >= 2  # create bucket, list
        assert used.requests[("function", "free")] == 1
        assert used.bytes_in["device"] == 100
        assert used.bytes_out["device"] >= 100
