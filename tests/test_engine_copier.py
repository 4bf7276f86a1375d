"""The watchdog copier: throttling, priorities, cancellation, and the slot pool / host tier."""

from __future__ import annotations

import time

import pytest
import torch

from offload.engine.copier import CANCELLED, DEMAND, DONE, PREFETCH, QUEUED, CopyJob, ThrottledCopier
from offload.engine.device_pool import DevicePool


def _job(n_floats: int, priority: int = DEMAND, key=(0, 0)) -> CopyJob:
    src = {"w": torch.arange(n_floats, dtype=torch.float32)}
    dst = {"w": torch.zeros(n_floats)}
    return CopyJob(key=key, slot=0, src=src, dst=dst, nbytes=4 * n_floats, priority=priority)


def test_transfer_of_b_bytes_takes_at_least_b_over_bandwidth():
    bandwidth = 1e6  # 1 MB/s: 100 kB must take >= 0.1 s
    with ThrottledCopier(bandwidth) as copier:
        job = _job(25_000)
        t0 = time.perf_counter()
        copier.submit(job).wait()
        elapsed = time.perf_counter() - t0
    assert job.state == DONE
    assert torch.equal(job.dst["w"], job.src["w"])
    assert elapsed >= job.nbytes / bandwidth
    assert elapsed < 0.1 + 0.5  # and it is a throttle, not a hang


def test_link_is_serial_so_total_time_is_sum_of_transfers():
    bandwidth = 2e6
    with ThrottledCopier(bandwidth) as copier:
        jobs = [_job(10_000, PREFETCH, key=(0, i)) for i in range(5)]  # 5 x 40 kB = 0.1 s
        t0 = time.perf_counter()
        for j in jobs:
            copier.submit(j)
        for j in jobs:
            j.wait()
        elapsed = time.perf_counter() - t0
        assert copier.bytes_copied == 200_000
    assert elapsed >= 200_000 / bandwidth
    # ready times are spaced by at least one transfer each
    ready = [j.ready_at for j in jobs]
    assert all(b - a >= 40_000 / bandwidth * 0.999 for a, b in zip(ready, ready[1:], strict=False))


def test_demand_jumps_ahead_of_queued_prefetches_and_queued_jobs_cancel():
    with ThrottledCopier(1e6) as copier:
        first = copier.submit(_job(5_000, PREFETCH, key=(0, 0)))  # 20 ms on the link
        while first.state == QUEUED:  # wait until the worker has it on the link
            time.sleep(0.001)
        queued = [copier.submit(_job(5_000, PREFETCH, key=(0, i))) for i in (1, 2)]
        demand = copier.submit(_job(5_000, DEMAND, key=(1, 0)))
        assert copier.cancel(queued[1])
        demand.wait()
        queued[0].wait()
        first.wait()
    assert queued[1].state == CANCELLED
    assert demand.ready_at < queued[0].ready_at  # overtook the prefetch queued before it
    assert first.ready_at <= demand.ready_at  # but never interrupts the job on the link
    assert not copier.cancel(first)


def test_demand_on_an_idle_link_is_issued_inline_but_usable_only_on_arrival():
    with ThrottledCopier(1e6) as copier:
        job = copier.submit(_job(25_000))  # 0.1 s on the link
        assert copier.inline_jobs == 1 and job.state == DONE  # copied by the caller: no thread hop
        assert torch.equal(job.dst["w"], job.src["w"])
        assert not job.is_ready()  # but the emulated link has not delivered it yet
        queued = copier.submit(_job(25_000, PREFETCH, key=(0, 1)))
        queued.wait()
        job.wait()
    assert job.is_ready() and time.perf_counter() >= job.ready_at
    assert queued.ready_at - job.ready_at >= 0.1 * 0.999  # the link stays serial across both paths


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
