"""Random check-ins of the update (``fedcore.dp.amplification``): the amplification bound
against reference computations, the coin from the OS CSPRNG, and budgets that hold."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedcore.dp import amplification as amp
from fedcore.dp import rdp
from fedcore.dp.distributed import DistributedDP
from fedcore.dp.ledger import STATE_FILE, DeviceLedger
from fedcore.errors import BudgetExceededError
from fedcore.messages import CohortConfig, Mode
from fedcore.secagg.protocol import SecAggParams

ORDERS = rdp.INTEGER_ORDERS
GAUSSIAN = [(1.0, 0.1, 50), (0.8, 0.05, 200), (2.0, 0.3, 20), (5.0, 0.01, 1000)]


def _gaussian(sigma: float) -> list[float]:
    """The Gaussian mechanism's RDP at sensitivity 1: alpha / (2 sigma^2)."""
    return [a / (2 * sigma**2) for a in ORDERS]


def _release(m: int = 90, dim: int = 1_200_000) -> list[float]:
    """A user-level release as the device books it: z = 1, cohort of 100, minimum 90."""
    dp = DistributedDP.for_cohort(
        clip=1.0, noise_multiplier=1.0, delta=1e-5, n=100, min_survivors=m
    )
    return dp.worst_case_rdp(m, dim)


def _eps(curve: list[float], times: int = 1) -> float:
    return rdp.epsilon(ORDERS, [times * r for r in curve], 1e-5)[0]


# --------------------------------------------------------------------------- the bound
@pytest.mark.parametrize(("sigma", "q", "steps"), GAUSSIAN)
def test_the_sum_without_the_factor_3_is_dp_accountings_sampled_gaussian(
    sigma: float, q: float, steps: int
) -> None:
    """GIVEN the Gaussian's RDP WHEN the theorem's sum is taken with factor 1 THEN it is the
    exact RDP of the Poisson-sampled Gaussian that dp_accounting's RDP accountant computes
    (Mironov et al. 2019, integer orders): the sum is the right one, term by term."""
    dpa = pytest.importorskip("dp_accounting")
    import dp_accounting.rdp

    acc = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))
    acc.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)))
    reference = list(acc._rdp)  # the accountant's per-order RDP of one event
    ours = amp.poisson_subsampled(rdp=_gaussian(sigma), orders=ORDERS, q=q, factor=1.0)
    assert ours == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize(("sigma", "q", "steps"), GAUSSIAN)
def test_the_bound_upper_bounds_the_pld_of_the_poisson_sampled_gaussian(
    sigma: float, q: float, steps: int
) -> None:
    """GIVEN the Gaussian WHEN amplified with the general bound (factor 3) THEN every order
    is at least the exact sampled-Gaussian RDP and at most the unsampled one, and the
    epsilon of ``steps`` releases is at least dp_accounting's PLD epsilon of
    PoissonSampledDpEvent(q, GaussianDpEvent(sigma)) composed as often: never optimistic."""
    dpa = pytest.importorskip("dp_accounting")
    import dp_accounting.pld

    ours = amp.poisson_subsampled(rdp=_gaussian(sigma), orders=ORDERS, q=q)
    exact = rdp.sampled_gaussian(q=q, sigma=sigma, orders=ORDERS)
    assert all(e <= o * (1 + 1e-12) for e, o in zip(exact, ours, strict=True))
    assert all(o <= g for o, g in zip(ours, _gaussian(sigma), strict=True))
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
    reference = pld.get_epsilon(1e-5)
    assert reference <= _eps(ours, steps)
    assert _eps(ours, steps) < _eps(_gaussian(sigma), steps)  # and it does amplify


def test_the_bound_matches_the_theorem_evaluated_directly() -> None:
    """GIVEN a user-level Skellam release THEN the module's log-space bound equals Zhu and
    Wang's theorem 6 written out plainly (math.comb, floats) at the orders where that
    does not overflow."""
    base = _release()
    q = 0.2
    ours = amp.poisson_subsampled(rdp=base, orders=ORDERS, q=q)
    eps = dict(zip((int(a) for a in ORDERS), base, strict=True))
    for alpha in range(2, 13):
        total = (1 - q) ** (alpha - 1) * (alpha * q - q + 1)
        total += math.comb(alpha, 2) * q**2 * (1 - q) ** (alpha - 2) * math.exp(eps[2])
        for ell in range(3, alpha + 1):
            total += (
                3 * math.comb(alpha, ell) * q**ell * (1 - q) ** (alpha - ell)
                * math.exp((ell - 1) * eps[ell])
            )  # fmt: skip
        direct = min(eps[alpha], math.log(total) / (alpha - 1))
        assert ours[alpha - 2] == pytest.approx(direct, rel=1e-9)


def test_amplification_shrinks_a_release_and_grows_with_the_rate() -> None:
    """GIVEN the release a device books THEN rate 1 books it unchanged, rate 0 books
    nothing, and in between its epsilon grows with the rate and stays below the release's."""
    base = _release()
    assert amp.poisson_subsampled(rdp=base, orders=ORDERS, q=1.0) == base
    assert amp.poisson_subsampled(rdp=base, orders=ORDERS, q=0.0) == [0.0] * len(base)
    spent = [
        _eps(amp.poisson_subsampled(rdp=base, orders=ORDERS, q=q), 10) for q in (0.05, 0.1, 0.5)
    ]
    assert spent == sorted(spent) and spent[-1] < _eps(base, 10)
    assert spent[1] < 0.25 * _eps(base, 10)  # 10 releases at q = 0.1: about 4.4 against 20.3


def test_the_bound_refuses_orders_it_is_not_stated_for() -> None:
    with pytest.raises(ValueError, match="integer orders"):
        amp.poisson_subsampled(rdp=[0.1, 0.2], orders=[1.5, 2.0], q=0.5)
    with pytest.raises(ValueError, match="every integer order"):
        amp.poisson_subsampled(rdp=[0.1, 0.2], orders=[2.0, 4.0], q=0.5)
    with pytest.raises(ValueError):
        amp.poisson_subsampled(rdp=[0.1], orders=[2.0], q=1.5)


# --------------------------------------------------------------------------- the coin
def test_the_coin_comes_from_the_csprng_not_the_seed() -> None:
    """GIVEN every seedable generator seeded alike (what --seed does) WHEN a device draws
    256 coins twice THEN the two sequences differ: the coin is os.urandom's, which no seed
    reaches, and it lands heads at about the rate asked."""
    runs = []
    for _ in range(2):
        random.seed(0)
        np.random.seed(0)
        runs.append([amp.draw_checkin(0.5) for _ in range(256)])
    assert runs[0] != runs[1]  # equal with probability 2^-256
    heads = sum(runs[0]) + sum(runs[1])
    assert 180 < heads < 332  # Binomial(512, 0.5): about 7 standard deviations either side


def test_the_coin_never_lands_heads_more_often_than_asked() -> None:
    """GIVEN the extreme draws THEN heads needs draw < floor(p * 2^53): all-zero bits are
    heads for any p > 0, all-one bits tails for any p < 1; p = 0 never, p = 1 always."""
    zeros, ones = (lambda n: bytes(n)), (lambda n: b"\xff" * n)
    assert amp.draw_checkin(1e-15, entropy=zeros) and not amp.draw_checkin(0.0, entropy=zeros)
    assert not amp.draw_checkin(1 - 1e-15, entropy=ones) and amp.draw_checkin(1.0, entropy=ones)
    with pytest.raises(ValueError):
        amp.draw_checkin(1.5)


def test_amplification_is_booked_only_where_the_coin_stays_hidden() -> None:
    """GIVEN a device's check-in probability THEN it may book it only for a secure cohort
    with distributed DP (only the noisy sum is unmasked); a plaintext upload or a cohort
    without user-level DP books the release unamplified (rate 1)."""
    assert amp.booked_rate(0.1, secure=True, distributed_dp=True) == 0.1
    assert amp.booked_rate(0.1, secure=False, distributed_dp=True) == 1.0
    assert amp.booked_rate(0.1, secure=True, distributed_dp=False) == 1.0
    assert amp.booked_rate(1.0, secure=True, distributed_dp=True) == 1.0
    with pytest.raises(ValueError):
        amp.booked_rate(0.0, secure=True, distributed_dp=True)


# --------------------------------------------------------------------------- budgets
def test_amplified_budget_is_never_exceeded_and_both_spends_are_kept(tmp_path: Path) -> None:
    """GIVEN a device booking amplified releases (q = 0.1) against a user-level target 5
    WHEN it joins until its ledger refuses THEN the booked epsilon never exceeds 5 (saved
    and reloaded each time), it joins more often than it could unamplified, and the
    unamplified spend of the same releases stays on record, at least the booked one."""
    base = _release()
    booked = amp.poisson_subsampled(rdp=base, orders=ORDERS, q=0.1)
    target, joined = 5.0, 0
    while True:
        ledger = DeviceLedger.load(tmp_path)
        try:
            ledger.check_user(booked, target, 1e-5)
        except BudgetExceededError:
            break
        ledger.record_release(booked, unamplified=base)
        ledger.save(tmp_path)
        joined += 1
        assert DeviceLedger.load(tmp_path).user_epsilon() <= target
    ledger = DeviceLedger.load(tmp_path)
    unamplified_joins = next(k for k in range(1, 100) if _eps(base, k + 1) > target)
    assert joined > 3 * unamplified_joins
    assert ledger.user_epsilon() <= target < ledger.user_epsilon_unamplified()
    doc = json.loads((tmp_path / STATE_FILE).read_text())
    assert doc["user_epsilon_unamplified"] == pytest.approx(ledger.user_epsilon_unamplified())
    assert doc["user_ledger_unamplified"]["events"] == joined


def test_a_ledger_from_before_amplification_loads_its_spend_as_unamplified(
    tmp_path: Path,
) -> None:
    """GIVEN a privacy.json written before random check-ins THEN its user-level spend loads
    as both the booked and the unamplified spend (nothing was amplified then)."""
    base = _release()
    ledger = DeviceLedger()
    ledger.user_ledger = ledger.user_ledger.plus(base)  # what book_release did before
    ledger.save(tmp_path)
    doc = json.loads((tmp_path / STATE_FILE).read_text())
    del doc["user_ledger_unamplified"], doc["user_epsilon_unamplified"]
    (tmp_path / STATE_FILE).write_text(json.dumps(doc))
    loaded = DeviceLedger.load(tmp_path)
    assert loaded.user_epsilon() > 0
    assert loaded.user_epsilon_unamplified() == pytest.approx(loaded.user_epsilon())


# --------------------------------------------------------------------------- the device
MEMBERS = ("a", "b", "c", "me")


def _cfg(mode: Mode = Mode.SECAGG, cid: str = "c00000001") -> CohortConfig:
    dp = DistributedDP.for_cohort(clip=1.0, noise_multiplier=1.0, delta=1e-5, n=4, min_survivors=3)
    return CohortConfig(
        cohort_id=cid, base_version=0, members={c: "n1" for c in MEMBERS}, mode=mode,
        min_members=3, created_at=1.7e9, phase_s={"inputs": 10.0},
        secagg=SecAggParams(k=3, t=3, graph_seed="00", clip=1.0, bits=dp.bits, weight_cap=100)
        if mode is Mode.SECAGG else None, dp=dp,
    )  # fmt: skip


class _Participant:
    client_id, mode = "me", "secagg"

    def __init__(self) -> None:
        from edge_client.model import build, to_numpy

        self.base = to_numpy(build())

    def fetch_model(self, version: int) -> dict[str, Any]:
        return self.base


def _device(tmp_path: Path, p: float) -> Any:
    pytest.importorskip("torch")
    from edge_client.device import Device, DevicePrivacy, LoopSettings, UserDPRequirement
    from edge_client.train import TrainSettings

    gen = np.random.default_rng(0)
    x, y = gen.random((8, 28, 28), dtype=np.float32), gen.integers(0, 10, 8)
    user = UserDPRequirement(target_epsilon=1e6, checkin_p=p)
    return Device(
        _Participant(), x, y, TrainSettings(batch_size=8), LoopSettings(), log=lambda m: None,
        privacy=DevicePrivacy(tmp_path, user=user),
    )  # fmt: skip


def test_the_device_books_the_same_amplified_curve_whichever_way_its_coin_falls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN a device with check-in probability 0.1 admitted to a secure DP cohort WHEN its
    coin lands tails THEN it still trains, its update is all zeros, and it books the
    amplified release; heads: its real update, the same booking (the spend reveals no
    coin). The unamplified spend is on record beside it."""
    import edge_client.device as device_mod

    worst = _cfg().dp.worst_case_rdp(3, 1_200_000)  # type: ignore[union-attr]
    spent = []
    for heads in (False, True):
        monkeypatch.setattr(device_mod, "draw_checkin", lambda p, heads=heads: heads)
        dev = _device(tmp_path / str(heads), 0.1)
        cfg = _cfg()
        assert dev.user_dp_refusal(cfg) is None
        update = dev.train_update(cfg)
        norm = math.sqrt(
            sum(float(np.sum(v.astype(np.float64) ** 2)) for v in update.delta.values())
        )
        assert (norm > 0) is heads and update.num_samples == 8
        dev.book_release(worst)
        spent.append((dev.budget.user_epsilon(), dev.budget.user_epsilon_unamplified()))
    assert spent[0] == spent[1]
    amplified = _eps(amp.poisson_subsampled(rdp=worst, orders=ORDERS, q=0.1))
    assert spent[0][0] == pytest.approx(amplified) and spent[0][1] == pytest.approx(_eps(worst))


def test_the_device_books_unamplified_what_it_cannot_justify(tmp_path: Path) -> None:
    """GIVEN check-in probability 1 (no coin) THEN the release is booked as it is; and a
    booking for which no cohort was admitted (no rate on record) is unamplified too."""
    worst = _cfg().dp.worst_case_rdp(3, 1_200_000)  # type: ignore[union-attr]
    dev = _device(tmp_path / "one", 1.0)
    assert dev.user_dp_refusal(_cfg()) is None
    dev.book_release(worst)
    assert dev.budget.user_epsilon() == pytest.approx(_eps(worst))
    dev = _device(tmp_path / "none", 0.1)
    dev.book_release(worst)
    assert dev.budget.user_epsilon() == pytest.approx(_eps(worst))


def test_amplification_is_torch_free_and_the_function_never_loads_it() -> None:
    """The coin and the bound are the devices' business: the module loads neither torch nor
    dp_accounting (nor scipy), and the functions' handlers do not import it at all."""
    import subprocess
    import sys

    code = (
        "import sys, fedcore.dp.amplification; "
        "bad = {'torch', 'dp_accounting', 'scipy'} & set(sys.modules); "
        "del sys.modules['fedcore.dp.amplification']; "
        "import functions.aggregator.app, functions.sweeper.app, functions.gateway.app; "
        "sys.exit(bool(bad) or 'fedcore.dp.amplification' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_device_books_the_model_it_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GIVEN a federation seeded with the 26k-parameter DP model WHEN a device weighs two
    user-level DP cohorts THEN both worst cases are sized for that model's dimension (the
    release's sensitivity after quantization grows with it), and the model is fetched once."""
    from fedcore.dp.distributed import DistributedDP
    from fedcore.modelspec import DP_CNN, init_params

    dims: list[int] = []
    real = DistributedDP.worst_case_rdp

    def spy(self: DistributedDP, min_members: int, dim: int) -> list[float]:
        dims.append(dim)
        return real(self, min_members, dim)

    monkeypatch.setattr(DistributedDP, "worst_case_rdp", spy)
    dev = _device(tmp_path, 1.0)
    fetched: list[int] = []
    params = init_params(DP_CNN)
    dev.p.fetch_model = lambda version: fetched.append(version) or params
    assert dev.user_dp_refusal(_cfg(cid="c00000001")) is None
    assert dev.user_dp_refusal(_cfg(cid="c00000002")) is None
    assert dims == [26_106, 26_106] and fetched == [0]
