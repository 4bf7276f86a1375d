"""Simulator fidelity: simulated vs measured TTFT and hit counts for the same run (goal: TTFT within 15 %).

1. Calibrate a hardware profile for *this* machine: run the engine holding every expert (no copies)
   on the prompts, and fit the simulator's compute model to the measured pass times by non-negative
   least squares: pass time = L * layer_us + L * tokens * token_us + expert runs * expert_us +
   (expert x token) * 2 * params / tflops. The link is the emulated ``--bandwidth``.
2. For every (policy, prefetch, capacity): run the engine with the throttled link, record the routing
   its cache saw, replay that recording in the simulator with the calibrated profile, and compare
   mean TTFT / TPOT (measured vs simulated) and hit counts (identical with demand fetch, by
   construction; with prefetch they can differ slightly because the recording stores fp16 hidden
   states for the simulator's forecasts).

    python benchmarks/fidelity.py
    python benchmarks/fidelity.py --bandwidth 40MB/s     # copies as slow, per expert, as OLMoE's at 5 GB/s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_pipeline.errors import UserError, run_cli  # noqa: E402
from offload.engine.cli import parse_bandwidth  # noqa: E402
from offload.engine.engine import EngineConfig, OffloadEngine, clone_loaded  # noqa: E402
from offload.engine.prompts import load_prompts  # noqa: E402
from offload.engine.run import encode  # noqa: E402


def _router_weights(loaded) -> dict[int, np.ndarray]:
    a = loaded.adapter
    return {i: a.router_weight(i).detach().float().cpu().numpy() for i in range(a.num_layers)}


def _run(loaded, config: EngineConfig, prompts, max_new: int, predictor, path: Path, warm: bool = False):
    """Engine run; returns (pass times in store order, counters, recorded store)."""
    with OffloadEngine(clone_loaded(loaded), config, predictor=predictor) as eng:
        if warm:
            for ids in prompts:
                eng.generate(ids, max_new)
        before = eng.counters.snapshot()
        recorder = eng.record(hidden=predictor is not None)
        times: list[float] = []
        for ids in prompts:
            times.extend(eng.generate(ids, max_new).pass_s)
        counters = eng.counters.minus(before)
    store = recorder.write(path, loaded.info, router_weights=_router_weights(loaded))
    return np.array(times), counters, store


def calibrate(loaded, prompts, max_new: int, bandwidth: float, workdir: Path,
              predictor=None) -> tuple[str, dict[str, float]]:
    """A hardware spec for offload.hardware.get_hardware, fitted to this machine's compute.

    With a predictor, its per-layer forecast (which the simulator does not model separately) is part
    of the measured compute, so it lands in ``layer_us``/``token_us``."""
    from scipy.optimize import nnls

    from offload.passes import build_passes

    a = loaded.adapter
    config = EngineConfig(capacity_slots=a.num_layers * a.num_experts, policy="lru", bandwidth=None)
    name = "calibration" if predictor is None else f"calibration-{predictor.family}"
    times, counters, store = _run(loaded, config, prompts, max_new, predictor, workdir / name, warm=True)
    assert counters.misses == 0, "the calibration run must not copy anything"
    ps = build_passes(store)
    L = ps.num_layers
    runs = np.diff(ps.layer_ptr).reshape(ps.num_passes, L).sum(axis=1)
    pass_of_access = np.repeat(np.arange(ps.num_passes), np.diff(ps.layer_ptr).reshape(ps.num_passes, L).sum(axis=1))
    token_runs = np.bincount(pass_of_access, weights=ps.tokens, minlength=ps.num_passes)
    X = np.stack([np.full(ps.num_passes, L), L * ps.pass_tokens, runs, token_runs], axis=1).astype(float)
    # prefill and decode passes weigh the same in the fit (there are max_new - 1 decode passes per
    # prefill); relative errors, so the short decode passes are not drowned by the long prefills
    prefill = ps.phase == 0
    w = np.where(prefill, (~prefill).sum() / max(prefill.sum(), 1), 1.0) / times
    coef, _ = nnls(X * w[:, None], times * w)
    fitted = X @ coef
    params = loaded.info.expert_bytes / loaded.model.dtype.itemsize  # weights per expert
    fit = {
        "layer_us": max(coef[0] * 1e6, 1e-3), "token_us": max(coef[1] * 1e6, 1e-6),
        "expert_us": max(coef[2] * 1e6, 1e-3),
        "tflops": 2 * params / max(coef[3], 1e-15) / 1e12,
        "r2": 1 - float(((times - fitted) ** 2).sum() / ((times - times.mean()) ** 2).sum()),
    }
    fit["prefill_error"] = float(fitted[prefill].mean() / times[prefill].mean() - 1)
    fit["decode_error"] = float(fitted[~prefill].mean() / times[~prefill].mean() - 1)
    fit["copy_us"] = effective_copy_s(loaded, bandwidth) * 1e6
    link_gbps = loaded.info.expert_bytes / (fit["copy_us"] * 1e-6) / 1e9
    spec = (f"a100-5gbs:link_gbps={link_gbps:.6g},tflops={fit['tflops']:.6g},hbm_gbps=1e9,"
            f"layer_us={fit['layer_us']:.6g},token_us={fit['token_us']:.6g},expert_us={fit['expert_us']:.6g}")
    return spec, fit


def effective_copy_s(loaded, bandwidth: float, copies: int = 300) -> float:
    """Wall time of one demand copy as the engine sees it: submit, the watchdog thread wakes, copies,
    holds the emulated link for bytes/bandwidth, signals, the main thread wakes. On a GPU this is
    close to bytes/bandwidth; on a busy CPU the two thread hand-offs add tens of microseconds, which
    the simulator can only see as a slower link."""
    import time

    from offload.engine.copier import DEMAND, CopyJob, ThrottledCopier
    from offload.engine.device_pool import DevicePool
    from offload.engine.expert_store import HostExpertStore

    store = HostExpertStore(clone_loaded(loaded).adapter)
    pool = DevicePool(1, store.template)
    spent = []
    with ThrottledCopier(bandwidth) as copier:
        for i in range(copies):
            job = CopyJob(key=(0, i % store.num_experts), slot=0, src=store.expert(0, i % store.num_experts),
                          dst=pool.slot(0), nbytes=store.expert_nbytes, priority=DEMAND)
            t0 = time.perf_counter()
            copier.submit(job).wait()
            spent.append(time.perf_counter() - t0)
    return float(statistics.median(spent))


def compare(args, loaded, prompts, bandwidth: float, workdir: Path, console: Console) -> list[dict[str, Any]]:
    """Rounds of (calibrate, run every configuration once): each measurement is simulated with the
    profile calibrated minutes before it, so the load of a shared machine drifts out; medians over
    rounds."""
    from offload.capacity import parse_capacity
    from offload.simulator import SimConfig, simulate_configs

    gate = gate_predictor(loaded)
    configs = [(capacity, policy, prefetch) for capacity in args.capacities
               for policy, prefetch in (("lru", "none"), ("least_stale", "none"), ("least_stale", "gate"))]
    results: dict[tuple, dict[str, list]] = {c: {"m": [], "s": [], "mt": [], "st": []} for c in configs}
    counts: dict[tuple, tuple[int, int, int]] = {}
    for r in range(args.repeats):
        hardware = {}
        for prefetch, predictor in (("none", None), ("gate", gate)):
            hardware[prefetch], fit = calibrate(loaded, prompts, args.max_new_tokens, bandwidth,
                                                workdir / f"round{r}", predictor)
            console.print(
                f"round {r + 1}: calibrated profile, prefetch {prefetch} (R^2 {fit['r2']:.3f}; mean prefill error "
                f"{100 * fit['prefill_error']:+.1f}%, decode {100 * fit['decode_error']:+.1f}%; one demand copy "
                f"{fit['copy_us']:.0f} us wall, {loaded.info.expert_bytes / bandwidth * 1e6:.0f} us on the emulated "
                f"link): {hardware[prefetch]}")
        for i, (capacity, policy, prefetch) in enumerate(configs):
            config = EngineConfig(capacity_slots=parse_capacity(capacity, loaded.info), policy=policy,
                                  bandwidth=bandwidth)
            times, c, store = _run(loaded, config, prompts, args.max_new_tokens,
                                   gate if prefetch == "gate" else None, workdir / f"round{r}" / f"run{i}")
            prefill = _prefill_mask(store)
            sim = simulate_configs(store, [SimConfig(policy=policy, capacity=capacity, prefetch=prefetch,
                                                     lookahead=2, hardware=hardware[prefetch])])[0]
            res = results[(capacity, policy, prefetch)]
            res["m"].append(float(times[prefill].mean()))
            res["mt"].append(float(times[~prefill].mean()))
            res["s"].append(sim["ttft_s"])
            res["st"].append(sim["tpot_s"])
            counts[(capacity, policy, prefetch)] = (c.hits, sim["hits"], c.accesses)
    rows = []
    for key in configs:
        res = results[key]
        m, s = statistics.median(res["m"]), statistics.median(res["s"])
        hits, sim_hits, accesses = counts[key]
        rows.append({"capacity": key[0], "policy": key[1], "prefetch": key[2],
                     "ttft_measured_ms": 1000 * m, "ttft_sim_ms": 1000 * s, "ttft_error": s / m - 1,
                     "tpot_measured_ms": 1000 * statistics.median(res["mt"]),
                     "tpot_sim_ms": 1000 * statistics.median(res["st"]),
                     "hits_engine": hits, "hits_sim": sim_hits, "accesses": accesses})
    return rows


def gate_predictor(loaded):
    from predictors.gate_lookahead import GateLookahead

    a = loaded.adapter
    return GateLookahead(torch.stack([a.router_weight(i).detach().float() for i in range(a.num_layers)]), a.top_k, 2)


def _prefill_mask(store) -> np.ndarray:
    """One entry per pass in store order: True for a prefill pass."""
    from offload.passes import build_passes

    return build_passes(store).phase == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3, help="rounds of calibration + every configuration")
    p.add_argument("--bandwidth", default="5GB/s")
    p.add_argument("--capacities", nargs="+", default=["5%", "25%"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    from data_pipeline.models import load_model

    torch.set_num_threads(args.threads)
    bandwidth = parse_bandwidth(args.bandwidth)
    if bandwidth is None:
        raise UserError("fidelity needs a finite --bandwidth")
    loaded = load_model("tiny-olmoe")
    prompts = [encode(loaded.tokenizer, pr) for pr in load_prompts("demo", args.prompts)]
    console = Console(width=150)
    with tempfile.TemporaryDirectory(prefix="fidelity-") as tmp:
        rows = compare(args, loaded, prompts, bandwidth, Path(tmp), console)
    t = Table(title=f"tiny-olmoe, {len(prompts)} demo prompts, link {args.bandwidth}: simulated vs measured")
    for col in ("capacity", "policy", "prefetch", "TTFT measured ms", "TTFT simulated ms", "error",
                "TPOT measured ms", "TPOT simulated ms", "hits engine", "hits sim", "accesses"):
        t.add_column(col, justify="left" if col in ("policy", "prefetch") else "right")
    for r in rows:
        t.add_row(r["capacity"], r["policy"], r["prefetch"], f"{r['ttft_measured_ms']:.2f}", f"{r['ttft_sim_ms']:.2f}",
                  f"{100 * r['ttft_error']:+.1f}%", f"{r['tpot_measured_ms']:.2f}", f"{r['tpot_sim_ms']:.2f}",
                  str(r["hits_engine"]), str(r["hits_sim"]), str(r["accesses"]))
    console.print(t)
    within = sum(abs(r["ttft_error"]) <= 0.15 for r in rows)
    console.print(f"TTFT within 15 %: {within} of {len(rows)} configurations")
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
