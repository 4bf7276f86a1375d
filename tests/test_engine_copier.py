"""The engine's link: the simulator's link rules on the wall clock, with real copies; and the slot pool."""

from __future__ import annotations

import time

import pytest
import torch

from offload.engine.copier import DEMAND, PREFETCH, ThrottledCopier
from offload.engine.device_pool import DevicePool


def _tensors(n_floats: int) -> tuple[dict, dict]:
    return {"w": torch.arange(n_floats, dtype=torch.float32)}, {"w": torch.zeros(n_floats)}


def _submit(copier: ThrottledCopier, n_floats: int, priority: int = DEMAND, key=(0, 0)):
    src, dst = _tensors(n_floats)
    return copier.submit(key, src, dst, 4 * n_floats, priority), dst


def test_transfer_of_b_bytes_takes_at_least_b_over_bandwidth():
    bandwidth = 1e6  # 1 MB/s: 100 kB must take >= 0.1 s
    copier = ThrottledCopier(bandwidth)
    t0 = time.perf_counter()
    copy, dst = _submit(copier, 25_000)
    copier.wait(copy)
    elapsed = time.perf_counter() - t0
    assert torch.equal(dst["w"], torch.arange(25_000, dtype=torch.float32))
    assert elapsed >= copy.nbytes / bandwidth
    assert elapsed < 0.1 + 0.5  # and it is a throttle, not a hang
    assert copier.ready(copy) and copier.bytes_copied == 100_000


def test_link_is_serial_so_prefetches_arrive_one_transfer_apart():
    bandwidth = 2e6
    copier = ThrottledCopier(bandwidth)
    copies = [_submit(copier, 10_000, PREFETCH, key=(0, i))[0] for i in range(5)]  # 5 x 40 kB = 0.1 s
    t0 = time.perf_counter()
    for c in copies:
        copier.wait(c)
    assert time.perf_counter() - t0 >= 0.1 - 0.03  # the first started before t0
    arrivals = [c.arrival for c in copies]
    assert all(b - a == pytest.approx(40_000 / bandwidth) for a, b in zip(arrivals, arrivals[1:], strict=False))


def test_demand_jumps_ahead_of_queued_prefetches_and_queued_ones_cancel():
    copier = ThrottledCopier(1e6)
    first, _ = _submit(copier, 5_000, PREFETCH, key=(0, 0))  # 20 ms on the link, starts at once
    assert copier.started(first)
    queued = [_submit(copier, 5_000, PREFETCH, key=(0, i))[0] for i in (1, 2)]
    assert not copier.started(queued[0])
    demand, dst = _submit(copier, 5_000, DEMAND, key=(1, 0))
    assert torch.equal(dst["w"], torch.arange(5_000, dtype=torch.float32))  # issued at once by the caller
    assert copier.cancel(queued[1]) and queued[1].start is None
    copier.wait(demand)
    copier.wait(queued[0])
    assert demand.arrival < queued[0].arrival  # overtook the prefetch queued before it
    assert first.arrival == pytest.approx(demand.start)  # but never interrupts the copy on the link
    assert not copier.cancel(first)
    assert copier.copies == 3  # the cancelled prefetch moved nothing


def test_promotion_starts_a_queued_prefetch_next():
    copier = ThrottledCopier(1e6)
    _submit(copier, 5_000, PREFETCH, key=(0, 0))
    a, _ = _submit(copier, 5_000, PREFETCH, key=(0, 1))
    b, dst = _submit(copier, 5_000, PREFETCH, key=(0, 2))
    copier.promote(b)
    assert copier.started(b) and not copier.started(a)
    copier.wait(a)
    assert b.arrival < a.arrival and torch.equal(dst["w"], torch.arange(5_000, dtype=torch.float32))


def test_demand_is_usable_only_on_arrival():
    copier = ThrottledCopier(1e6)
    copy, _ = _submit(copier, 25_000)  # 0.1 s on the link
    assert not copier.ready(copy)  # copied already, but the emulated link has not delivered it
    copier.wait(copy)
    assert copier.ready(copy) and time.perf_counter() >= copy.arrival


def test_unthrottled_copies_are_ready_at_once():
    copier = ThrottledCopier(None)
    copy, dst = _submit(copier, 100, PREFETCH)
    assert copier.ready(copy) and torch.equal(dst["w"], torch.arange(100, dtype=torch.float32))


def test_non_positive_bandwidth_is_refused():
    for bad in (0, -5e9):
        with pytest.raises(ValueError):
            ThrottledCopier(bad)


def test_pool_slots_are_fixed_views():
    pool = DevicePool(3, {"a": (torch.Size([2, 4]), torch.float32), "b": (torch.Size([4]), torch.float16)})
    assert pool.nbytes == 3 * (8 * 4 + 4 * 2)
    pool.slot(1)["a"].fill_(7)
    assert pool.slot(1)["a"].sum() == 56 and pool.slot(0)["a"].sum() == 0
    with pytest.raises(ValueError):
        DevicePool(0, {"a": (torch.Size([1]), torch.float32)})
