"""lru, fifo, lfu and belady on the flattened (layer, expert) stream give libCacheSim's miss counts.

Demand fetch, a global cache and no protection of the running layer: exactly a plain object cache.
libCacheSim replays an oracleGeneral binary file (it needs next-access times for Belady). Our LFU
matches libCacheSim's in-cache LFU with ``scope="cache"`` (ties: least recently used).
"""

from __future__ import annotations

import numpy as np
import pytest

from core.passes import NEVER, build_passes
from offload.simulator import SimConfig, simulate_configs

lcs = pytest.importorskip("libcachesim")


def libcachesim_misses(keys: np.ndarray, next_use: np.ndarray, slots: int, cls_name: str, path) -> int:
    rec = np.zeros(len(keys), dtype=[("t", "<u4"), ("id", "<u8"), ("sz", "<u4"), ("nv", "<i8")])
    rec["t"] = np.arange(len(keys))
    rec["id"] = keys + 1  # libCacheSim treats id 0 specially in some readers
    rec["sz"] = 1
    rec["nv"] = np.where(next_use >= NEVER, -1, next_use)
    rec.tofile(path)
    reader = lcs.TraceReader(str(path), lcs.TraceType.ORACLE_GENERAL_TRACE)
    cache = getattr(lcs, cls_name)(slots, hashpower=16)
    miss_ratio, _ = cache.process_trace(reader)
    return int(round(miss_ratio * len(keys)))


@pytest.mark.parametrize("capacity", ["1%", "5%", "10%", "25%"])
def test_miss_counts_equal_libcachesim(gemma_store, tmp_path, capacity):
    ps = build_passes(gemma_store)
    keys, nxt = ps.keys(), ps.next_use()
    for ours, theirs, params in (("lru", "LRU", {}), ("fifo", "FIFO", {}), ("lfu", "LFU", {"scope": "cache"}),
                                 ("belady", "Belady", {})):
        cfg = SimConfig(policy=ours, policy_params=params, capacity=capacity, protect_layer=False)
        r = simulate_configs(gemma_store, [cfg])[0]
        expected = libcachesim_misses(keys, nxt, r["capacity_slots"], theirs, tmp_path / f"{ours}.bin")
        assert r["misses"] == expected, (ours, capacity)
        ref = simulate_configs(gemma_store, [SimConfig(**{**cfg.__dict__, "backend": "reference"})])[0]
        assert ref["misses"] == expected, (ours, capacity, "reference")
