"""Forecast-driven eviction on held-out passes: hit rates, collision misses, gap closed, cost.

For each trace store: split the passes (by sequence, or for a single prompt by position in the
decode: train on the first part, evaluate on the rest), fit the reuse forecasters on the
training passes only, replay every pass through the cache and count only the held-out (test)
passes. Policies: LRU, Least-Stale, forecast (online counted / counted checkpoint / MLP),
Least-Stale + forecast (MLP), Belady, plus a diagnostic ceiling: a forecaster that knows exactly
whether each expert is used at its next opportunity (and falls back to the counted estimate
beyond it) -- how far better next-opportunity forecasts alone could go.

Cost: wall time of ``victim()`` per eviction, and of the forecast upkeep (history update +
re-forecast of one layer's E experts) per layer, both measured in the replay (Python, 1 core).

    python benchmarks/forecast.py --trace ../shared/... --phase decode --capacity 1%,5%,25% --json out.json

Run by hand; never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import track

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import UserError, run_cli  # noqa: E402
from core.passes import build_passes, take_passes  # noqa: E402
from data_pipeline.import_routes import import_routes  # noqa: E402
from data_pipeline.splits import split_rows  # noqa: E402
from data_pipeline.trace_store import TraceStore  # noqa: E402
from offload.capacity import parse_capacity  # noqa: E402
from offload.forecast_eval import gap_closed, replay_split  # noqa: E402
from offload.policies import Forecast, LeastStaleForecast, make_policy  # noqa: E402
from predictors.reuse import CountedReuse, ReuseForecaster  # noqa: E402
from predictors.reuse_features import ReuseHistory  # noqa: E402
from predictors.training import DataConfig, ReuseConfig, run_training  # noqa: E402

console = Console()


class NextOpportunityOracle(ReuseForecaster):
    """Diagnostic ceiling: knows whether each expert is chosen at its next opportunity (N = 1), and
    otherwise uses ``1 + N`` of a fitted forecaster for the opportunity after. Not a deployable policy."""

    family = "next_opportunity_oracle"

    def __init__(self, used: np.ndarray, fallback: ReuseForecaster):
        P, L, E = used.shape
        super().__init__(L, E, 0)
        self.used, self.fallback = used, fallback

    def expected_passes(self, history: ReuseHistory, layer: int, next_pass: int,
                        experts: np.ndarray | None = None) -> np.ndarray:
        later = 1.0 + self.fallback.expected_passes(history, layer, next_pass + 1, experts)
        if next_pass >= len(self.used):
            return later
        used = self.used[next_pass, layer] if experts is None else self.used[next_pass, layer, experts]
        return np.where(used, 1.0, later)

    def reuse_probability(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def state(self):
        return {}

    @classmethod
    def from_state(cls, hparams, state):
        raise NotImplementedError


def _used_table(passes) -> np.ndarray:
    L, E = passes.num_layers, passes.num_experts
    used = np.zeros((passes.num_passes, L, E), dtype=bool)
    layer_of = passes.layer_of_access()
    pass_of = np.repeat(np.arange(passes.num_passes), np.diff(passes.layer_ptr).reshape(-1, L).sum(1))
    used[pass_of, layer_of, passes.expert] = True
    return used


def _timed_upkeep(policy: Forecast) -> dict[str, float]:
    """Wrap the hooks that carry the forecast upkeep; returns the accumulating counters."""
    acc = {"seconds": 0.0, "layers": 0}
    for name in ("on_layer_start", "on_pass_start"):
        inner = getattr(policy, name)

        def timed(*a, _inner=inner, **k):
            t0 = time.perf_counter()
            _inner(*a, **k)
            acc["seconds"] += time.perf_counter() - t0
            acc["layers"] += 1

        setattr(policy, name, timed)
    return acc


def cost_microbenchmark(passes, forecaster: ReuseForecaster, slots: int, warm_passes: int = 20,
                        repeats: int = 2000) -> dict[str, float]:
    """Means of the policy's two costs on a warm cache, isolated from the replay:
    one ``victim()`` over ``slots`` resident experts, and one layer of forecast upkeep
    (fold the finished layer into the history + re-forecast the resident experts of two layers)."""
    policy = Forecast(forecaster)
    warm = min(warm_passes, passes.num_passes)
    replay_split(take_first(passes, warm), policy, slots)
    L = passes.num_layers
    t0 = time.perf_counter()
    for _ in range(repeats):
        policy.victim(lambda key: True)
    victim_us = 1e6 * (time.perf_counter() - t0) / repeats
    t0 = time.perf_counter()
    for i in range(repeats):
        layer = i % L
        if layer == 0:
            policy.on_pass_start(policy.pass_index + 1, 1)
        else:
            policy.on_layer_start(layer)
    upkeep_us = 1e6 * (time.perf_counter() - t0) / repeats
    return {"victim_us": victim_us, "upkeep_us_per_layer": upkeep_us, "resident": int(policy.resident_mask.sum())}


def take_first(passes, n: int):
    return take_passes(passes, np.arange(passes.num_passes) < n)


def evaluate_store(store: TraceStore, phase: str, capacities: list[str], *, epochs: int, seed: int,
                   val_fraction: float, test_fraction: float) -> dict[str, Any]:
    passes = build_passes(store, phase)
    split = split_rows(store, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction)
    part, how = split.parts_of(passes.row_start), split.describe()
    console.print(f"[bold]{store.path}[/]: {passes.num_passes} {phase} passes; {how}; "
                  f"passes train/val/test {np.bincount(part, minlength=3).tolist()}")
    # train.py's own path (same split, same Lightning set-up), into a scratch run folder
    data = DataConfig(store=str(store.path), val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    run = run_training(families=["reuse_counted", "reuse_mlp"], data=data, lookahead=1, overfetch=1.5,
                       run_dir=Path(tempfile.mkdtemp()) / "run", reuse=ReuseConfig(phase=phase),
                       trainer_kwargs={"max_epochs": epochs, "accelerator": "cpu", "devices": 1,
                                       "enable_model_summary": False})
    (counted, info_c), (mlp, info_m) = ((r.predictor, r.reuse) for r in run.results)
    frozen = CountedReuse(store.num_layers, store.num_experts, store.top_k, online=False)
    frozen.hits, frozen.trials = counted.hits.copy(), counted.trials.copy()
    oracle = NextOpportunityOracle(_used_table(passes), mlp)
    console.print(f"  reuse_counted {info_c['metrics']}\n  reuse_mlp     {info_m['metrics']}")
    policies = {
        "lru": lambda: make_policy("lru"),
        "least_stale": lambda: make_policy("least_stale"),
        "forecast (online logistic, the default)": lambda: Forecast(),
        "forecast (counted, frozen)": lambda: Forecast(frozen),
        "forecast (mlp)": lambda: Forecast(mlp),
        "least_stale_forecast (mlp)": lambda: LeastStaleForecast(mlp),
        "belady": lambda: make_policy("belady"),
        "ceiling: next-opportunity oracle": lambda: Forecast(oracle),
    }
    rows = []
    for cap in capacities:
        try:
            slots = parse_capacity(cap, store.model)
        except UserError as e:
            console.print(f"  capacity {cap}: skipped ({e})")
            rows.append({"capacity": cap, "skipped": str(e)})
            continue
        for name, make in track(list(policies.items()), description=f"capacity {cap} ({slots} slots)",
                                console=console):
            policy = make()
            upkeep = _timed_upkeep(policy) if isinstance(policy, Forecast) else None
            t0 = time.perf_counter()
            r = replay_split(passes, policy, slots, part, time_victims=True)
            test = r.parts["test"]
            rows.append({
                "capacity": cap, "slots": slots, "policy": name, "test_hit_rate": test.hit_rate,
                "test_collision_misses": test.collision_misses, "test_accesses": test.accesses,
                "all_hit_rate": r.total.hit_rate, "victim_us": 1e6 * r.victim_seconds / max(r.victims, 1),
                "upkeep_us_per_layer": None if upkeep is None else 1e6 * upkeep["seconds"] / max(upkeep["layers"], 1),
                "seconds": time.perf_counter() - t0,
            })
        by = {row["policy"]: row["test_hit_rate"] for row in rows if row.get("capacity") == cap and "policy" in row}
        for row in rows:
            if row.get("capacity") == cap and "policy" in row:
                row["gap_closed"] = gap_closed(row["test_hit_rate"], by["lru"], by["belady"])
    cost = {}
    for cap in capacities:
        try:
            cost[cap] = cost_microbenchmark(passes, mlp, parse_capacity(cap, store.model))
        except UserError:
            continue
    console.print(f"  isolated cost (mlp forecaster): {cost}")
    return {"store": str(store.path), "fingerprint": store.fingerprint(), "phase": phase, "split": how, "cost": cost,
            "passes": np.bincount(part, minlength=3).tolist(), "reuse_counted": info_c, "reuse_mlp": info_m,
            "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"{result['store']} ({result['phase']} passes; {result['split']}; held-out test passes only)", "",
             "| capacity | policy | hit rate | collision misses | gap closed | victim() µs | upkeep µs/layer |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['capacity']} | (skipped: {r['skipped']}) | | | | | |")
            continue
        up = "" if r["upkeep_us_per_layer"] is None else f"{r['upkeep_us_per_layer']:.0f}"
        gap = r["gap_closed"]
        lines.append(f"| {r['capacity']} ({r['slots']}) | {r['policy']} | {100 * r['test_hit_rate']:.1f} % | "
                     f"{r['test_collision_misses']} | {'' if gap != gap else f'{100 * gap:.0f} %'} | "
                     f"{r['victim_us']:.0f} | {up} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", action="append", required=True,
                    help="trace store folder, or a route_trace CSV (imported to a temporary store); repeatable")
    ap.add_argument("--phase", action="append", help="passes per --trace (decode, prefill, both); default both")
    ap.add_argument("--capacity", default="1%,5%,25%")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.15)
    ap.add_argument("--test-fraction", type=float, default=0.35)
    ap.add_argument("--json", help="write all results here")
    args = ap.parse_args(argv)
    phases = args.phase or []
    results = []
    for i, trace in enumerate(args.trace):
        path = Path(trace)
        if path.is_file():
            store = import_routes(path, Path(tempfile.mkdtemp()) / "store")
        else:
            store = TraceStore(path)
        phase = phases[i] if i < len(phases) else "both"
        result = evaluate_store(store, phase, [c.strip() for c in args.capacity.split(",")], epochs=args.epochs,
                                seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction)
        results.append(result)
        print(markdown(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results}, indent=2, default=float))


if __name__ == "__main__":
    run_cli(main)
