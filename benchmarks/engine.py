"""Engine benchmarks (run by hand, never as a timed test).

1. Overhead: the engine holding every expert (100 % capacity, warm) against the plain HF forward on
   the same prompts. The goal is <= 1.05x. Runs alternate plain/engine so machine-load drift hits
   both alike; medians over repeats.
2. TTFT of LRU, Least-Stale and Least-Stale + learned prefetch at 1 %, 5 % and 25 % capacity under
   an emulated 5 GB/s link (a capacity below one layer's top-k is refused and reported as such).

    python benchmarks/engine.py                       # tiny-olmoe on CPU
    python benchmarks/engine.py --model allenai/OLMoE-1B-7B-0924 --device cuda --prompts 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import UserError, run_cli  # noqa: E402
from data_pipeline.models import load_model  # noqa: E402
from offload.capacity import parse_capacity  # noqa: E402
from offload.engine.engine import EngineConfig, OffloadEngine, clone_loaded  # noqa: E402
from offload.engine.generate import greedy_generate  # noqa: E402
from offload.engine.prompts import load_prompts  # noqa: E402
from offload.engine.run import encode  # noqa: E402
from offload.evaluate_cli import parse_bandwidth  # noqa: E402
from predictors.checkpoint import latest_checkpoint, load_predictor  # noqa: E402
from predictors.gate_lookahead import GateLookahead  # noqa: E402


def _passes(gen) -> tuple[float, float, float]:
    return gen.ttft_s, gen.tpot_s, sum(gen.pass_s)


def overhead(loaded: Any, prompts: list[torch.Tensor], max_new: int, repeats: int, device: str) -> dict[str, float]:
    a = loaded.adapter
    config = EngineConfig(capacity_slots=a.num_layers * a.num_experts, policy="lru", bandwidth=None, device=device)
    plain_model = clone_loaded(loaded).model.to(device)
    with OffloadEngine(clone_loaded(loaded), config) as eng:
        for ids in prompts:  # warm-up: every expert the prompts need becomes resident
            eng.generate(ids, max_new)
        greedy_generate(plain_model, prompts[0], max_new)
        plain: list[tuple[float, float, float]] = []
        engine: list[tuple[float, float, float]] = []
        for _ in range(repeats):
            for ids in prompts:
                plain.append(_passes(greedy_generate(plain_model, ids, max_new)))
                engine.append(_passes(eng.generate(ids, max_new)))
        misses_after_warmup = eng.counters.misses - len(eng.cache)

    def med(rows, i):
        return statistics.median(r[i] for r in rows)

    return {
        "plain_ttft_ms": 1000 * med(plain, 0), "engine_ttft_ms": 1000 * med(engine, 0),
        "plain_tpot_ms": 1000 * med(plain, 1), "engine_tpot_ms": 1000 * med(engine, 1),
        "plain_total_ms": 1000 * med(plain, 2), "engine_total_ms": 1000 * med(engine, 2),
        "ratio_total": med(engine, 2) / med(plain, 2), "ratio_ttft": med(engine, 0) / med(plain, 0),
        "ratio_tpot": med(engine, 1) / med(plain, 1), "misses_after_warmup": misses_after_warmup,
    }


def _learned(args, loaded):
    """The newest learned predictor, or gate lookahead (D=2) when no checkpoint exists yet."""
    path = args.checkpoint or latest_checkpoint(args.checkpoints)
    if path is not None:
        return f"learned ({Path(path).name})", load_predictor(path, loaded.info)
    a = loaded.adapter
    weights = torch.stack([a.router_weight(i).detach().float() for i in range(a.num_layers)]).to(args.device)
    return "gate lookahead D=2 (no checkpoint)", GateLookahead(weights, a.top_k, 2)


def capacity_sweep(args, loaded, prompts, bandwidth: float) -> list[dict[str, Any]]:
    learned_name, learned = _learned(args, loaded)
    rows = []
    for capacity in args.capacities:
        try:
            slots = parse_capacity(capacity, loaded.info)
        except UserError as e:
            rows.append({"capacity": capacity, "config": "all", "refused": str(e)})
            continue
        for label, policy, predictor in (("LRU", "lru", None), ("LS", "least_stale", None),
                                         (f"LS + {learned_name}", "least_stale", learned)):
            ttft, tpot, hit, stall, coll = [], [], [], [], []
            for _ in range(args.repeats):
                config = EngineConfig(capacity_slots=slots, policy=policy, bandwidth=bandwidth, device=args.device)
                with OffloadEngine(clone_loaded(loaded), config, predictor=predictor) as eng:
                    for ids in prompts:
                        gen = eng.generate(ids, args.max_new_tokens)
                        ttft.append(gen.ttft_s)
                        tpot.append(gen.tpot_s)
                    c = eng.counters
                    hit.append(c.hits / c.accesses)
                    coll.append(c.collision_misses / c.accesses)
                    stall.append(c.stall_s / len(prompts))
            rows.append({"capacity": capacity, "slots": slots, "config": label,
                         "ttft_ms": 1000 * statistics.median(ttft), "tpot_ms": 1000 * statistics.median(tpot),
                         "hit_rate": statistics.mean(hit), "collision_rate": statistics.mean(coll),
                         "stall_ms_per_prompt": 1000 * statistics.mean(stall)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-olmoe")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dataset", default=None)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth", default="5GB/s")
    p.add_argument("--capacities", nargs="+", default=["1%", "5%", "25%"])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--checkpoints", default="checkpoints")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)

    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    bandwidth = parse_bandwidth(args.bandwidth)
    if bandwidth is None:
        raise UserError("the capacity sweep needs a finite --bandwidth")
    loaded = load_model(args.model, device="cpu", dtype="bfloat16" if args.device.startswith("cuda")
                        and args.model != "tiny-olmoe" else "auto")
    dataset = args.dataset or ("demo" if args.model == "tiny-olmoe" else "gsm8k")
    prompts = [encode(loaded.tokenizer, pr) for pr in load_prompts(dataset, args.prompts)]
    console = Console(width=150)
    console.print(f"[bold]{args.model}[/] on {args.device}, {len(prompts)} prompts of {dataset}, "
                  f"{args.max_new_tokens} new tokens, {args.repeats} repeats, torch threads {torch.get_num_threads()}")

    o = overhead(loaded, prompts, args.max_new_tokens, args.repeats, args.device)
    t = Table(title="engine at 100 % capacity (warm) vs plain HF forward: median per prompt")
    for col in ("", "plain", "engine", "engine / plain"):
        t.add_column(col, justify="right")
    for name, key in (("TTFT ms", "ttft"), ("TPOT ms", "tpot"), ("prompt total ms", "total")):
        t.add_row(name, f"{o[f'plain_{key}_ms']:.2f}", f"{o[f'engine_{key}_ms']:.2f}", f"{o[f'ratio_{key}']:.3f}x")
    console.print(t)
    console.print(f"misses after warm-up: {o['misses_after_warmup']}")

    rows = capacity_sweep(args, loaded, prompts, bandwidth)
    t = Table(title=f"TTFT under an emulated {args.bandwidth} link (medians over prompts x repeats)")
    for col in ("capacity", "slots", "configuration", "TTFT ms", "TPOT ms", "hit rate", "collisions",
                "stall ms/prompt"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for r in rows:
        if "refused" in r:
            t.add_row(r["capacity"], "-", f"refused: {r['refused']}", "", "", "", "", "")
            continue
        t.add_row(r["capacity"], str(r["slots"]), r["config"], f"{r['ttft_ms']:.2f}", f"{r['tpot_ms']:.2f}",
                  f"{100 * r['hit_rate']:.1f}%", f"{100 * r['collision_rate']:.1f}%", f"{r['stall_ms_per_prompt']:.2f}")
    console.print(t)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
