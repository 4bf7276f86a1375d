"""Simulator speed: accesses/s of the numba replay of every registered policy, next to libCacheSim's LRU.

A synthetic OLMoE-shaped stream (16 layers x 64 experts, top-8, decode passes; expert popularity
skewed per layer and correlated between consecutive tokens) of >= 10M accesses. Every kernel runs
on one core; libCacheSim replays the same flattened (layer, expert) stream from an oracleGeneral
file with LRU, and its miss count is checked against ours (demand fetch, global cache, no
running-layer protection: a plain object cache).

Both sides are timed the same way: the best of ``--repeats`` runs, in CPU seconds of the calling
thread (on a shared machine wall time measures the neighbours), so the ratios of one run compare
like with like; the load average is printed with them. Run by hand:

    python benchmarks/simulator.py [--accesses 10000000] [--capacity 5%] [--repeats 2]
    python benchmarks/simulator.py --layers 4 --policies lru,belady   # the same rate with 4x fewer keys?
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.passes import passes_from_lists  # noqa: E402
from offload.policies import policy_names  # noqa: E402
from offload.simulator import Replays, SimConfig  # noqa: E402
from offload.simulator_fast import kernel_args  # noqa: E402


def synthetic_passes(n_access: int, L: int = 16, E: int = 64, K: int = 8, seed: int = 0):
    """Decode passes whose top-k come from per-layer popularity + a slowly drifting per-token bias."""
    rng = np.random.default_rng(seed)
    P = -(-n_access // (L * K))
    base = rng.normal(0.0, 1.5, size=(L, E)).astype(np.float32)
    ids = np.empty((P, L, K), dtype=np.int32)
    drift = np.zeros((L, E), dtype=np.float32)
    chunk = 4096
    for s in range(0, P, chunk):
        n = min(chunk, P - s)
        steps = rng.normal(0.0, 0.3, size=(n, L, E)).astype(np.float32)
        walk = drift[None] + np.cumsum(steps, axis=0) * 0.2
        drift = walk[-1] * 0.9
        g = rng.gumbel(size=(n, L, E)).astype(np.float32)
        scores = base[None] + walk + g
        top = np.argpartition(-scores, K, axis=2)[:, :, :K]
        order = np.argsort(-np.take_along_axis(scores, top, axis=2), axis=2)
        ids[s: s + n] = np.take_along_axis(top, order, axis=2)
    ps = passes_from_lists([[[0] * K] * L], E, top_k=K)  # template, replaced below
    ps.phase = np.ones(P, dtype=np.int8)
    ps.seq = np.zeros(P, dtype=np.int64)
    ps.row_start = np.arange(P, dtype=np.int64)
    ps.row_stop = ps.row_start + 1
    ps.layer_ptr = np.arange(P * L + 1, dtype=np.int64) * K
    ps.expert = ids.reshape(-1)
    ps.score = np.ones(len(ps.expert), dtype=np.float32)
    ps.best_rank = np.tile(np.arange(K, dtype=np.int32), P * L)
    ps.tokens = np.ones(len(ps.expert), dtype=np.int32)
    return ps


def libcachesim_lru(keys: np.ndarray, slots: int, repeats: int) -> tuple[float, int]:
    import libcachesim as lcs  # libcachesim: an optional dev dependency, only for the LRU cross-check

    rec = np.zeros(len(keys), dtype=[("t", "<u4"), ("id", "<u8"), ("sz", "<u4"), ("nv", "<i8")])
    rec["t"] = np.arange(len(keys))
    rec["id"] = keys + 1
    rec["sz"] = 1
    rec["nv"] = -1
    best = float("inf")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "stream.oracleGeneral")
        rec.tofile(path)
        for _ in range(repeats):
            reader = lcs.TraceReader(path, lcs.TraceType.ORACLE_GENERAL_TRACE)
            cache = lcs.LRU(slots, hashpower=16)
            t = time.thread_time()
            miss_ratio, _ = cache.process_trace(reader)
            best = min(best, time.thread_time() - t)
    return best, int(round(miss_ratio * len(keys)))


def time_kernel(replays: Replays, cfg: SimConfig, repeats: int) -> tuple[float, int, int, float]:
    """(best CPU seconds, misses, collision misses, TPOT in seconds) of one configuration."""
    replay = replays.replay(cfg)
    kernel, args = kernel_args(replay, cfg)
    kernel(*args)  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        kernel, args = kernel_args(replay, cfg)  # a fresh policy state
        t = time.thread_time()
        kernel(*args)
        best = min(best, time.thread_time() - t)
    w = args[-2]  # the Work the kernel filled
    return best, int(w.PL[2].sum()), int(w.PL[3].sum()), float(w.pass_time.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--accesses", type=int, default=10_000_000)
    ap.add_argument("--capacity", default="5%")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layers", type=int, default=16, help="layers of the synthetic stream (OLMoE: 16)")
    ap.add_argument("--experts", type=int, default=64, help="experts per layer (OLMoE: 64)")
    ap.add_argument("--policies", default=None, help="comma list of registered policies (default: all)")
    args = ap.parse_args()
    t = time.perf_counter()
    ps = synthetic_passes(args.accesses, L=args.layers, E=args.experts)
    n = ps.num_accesses
    print(f"stream: {n:,} accesses, {ps.num_passes:,} passes, built in {time.perf_counter() - t:.1f}s")
    replays = Replays(None, ps)
    load = os.getloadavg()[0]
    lcs_s, lcs_miss = libcachesim_lru(ps.keys(), replays.replay(SimConfig(capacity=args.capacity)).capacity_slots,
                                      args.repeats)
    lcs_rate = n / lcs_s
    rows = [("lru (plain, as libCacheSim)", SimConfig(policy="lru", capacity=args.capacity, protect_layer=False))]
    chosen = policy_names() if args.policies is None else [p.strip() for p in args.policies.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(policy_names()))
    if unknown:
        ap.error(f"unknown policy {unknown[0]!r}; registered: {', '.join(policy_names())}")
    for pol in chosen:
        rows.append((pol, SimConfig(policy=pol, capacity=args.capacity)))
    if "least_stale" in chosen:
        rows.append(("least_stale + oracle prefetch d=2",
                     SimConfig(policy="least_stale", capacity=args.capacity, prefetch="oracle", lookahead=2)))
    measured = []
    for name, cfg in rows:
        sec, miss, coll, tpot = time_kernel(replays, cfg, args.repeats)
        if name.startswith("lru (plain"):
            assert miss == lcs_miss, f"LRU misses differ from libCacheSim: {miss} vs {lcs_miss}"
        measured.append((name, sec, miss, coll, tpot))
    load = max(load, os.getloadavg()[0])
    table = Table(title=f"simulator speed, {n:,} accesses, capacity {args.capacity}, one core, best of "
                        f"{args.repeats} in CPU seconds; load average up to {load:.1f} on {os.cpu_count()} cores")
    for col in ("replay", "CPU s", "M accesses/s", "vs libCacheSim LRU", "misses", "collisions", "TPOT us"):
        table.add_column(col, justify="right")
    table.add_row("libCacheSim LRU (C)", f"{lcs_s:.3f}", f"{lcs_rate / 1e6:.1f}", "1.00x", f"{lcs_miss:,}", "-", "-")
    for name, sec, miss, coll, tpot in measured:
        rate = n / sec
        table.add_row(name, f"{sec:.3f}", f"{rate / 1e6:.1f}", f"{rate / lcs_rate:.2f}x", f"{miss:,}", f"{coll:,}",
                      f"{tpot * 1e6:.4f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
