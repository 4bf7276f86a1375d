"""``python evaluate.py --policy least_stale``: run the offloaded engine and report it next to baselines.

With no other arguments it evaluates the demo model (``tiny-olmoe``) on the offline demo prompts with
the newest learned predictor in ``checkpoints/`` prefetching, and prints one table:

- the chosen policy with the predictor (engine, measured),
- LRU with the same predictor (engine, measured),
- the oracle bound: Belady eviction + oracle prefetch, simulated on the same prompts,

with prediction precision/recall, hit rate, collision rate, stall time, TTFT and TPOT, the TTFT the
simulator predicts for the same run on a named hardware profile, and token agreement with the plain
model. ``--system`` reproduces one of the paper's four systems instead, next to the same system with
Least-Stale as a drop-in eviction policy. ``--mode sim`` replays everything in the simulator only.

Every engine run records the routing its cache saw; the simulator rows replay those recordings, so
engine and simulator talk about exactly the same accesses.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from data_pipeline.errors import UserError, run_cli

TINY = "tiny-olmoe"

#: The paper's four reproduced systems (SpecMD section 5), as engine settings.
SYSTEMS: dict[str, dict[str, Any]] = {
    "eliseev_mazur": dict(policy="lru", prefetch="topk", miss="fetch", routing="standard"),
    "zhu": dict(policy="score", prefetch="score", miss="substitute", routing="standard"),
    "mixturecache": dict(policy="lru", prefetch="none", miss="fetch", routing="cache-aware"),
    "hobbit": dict(policy="lhu", prefetch="topk", miss="precision-cascade", routing="standard"),
}

_BANDWIDTH_UNITS = {"": 1.0, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
                    "kib": 2.0**10, "mib": 2.0**20, "gib": 2.0**30, "tib": 2.0**40}


def parse_bandwidth(text: str) -> float | None:
    """``5GB/s``, ``500MB/s``, ``12GiB/s``, ``5e9`` -> bytes/s; ``inf``/``none`` -> None (unthrottled)."""
    s = str(text).strip().lower().replace(" ", "")
    if s in ("inf", "none", "unlimited", "off"):
        return None
    m = re.fullmatch(r"([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)([kmgt]i?b|b)?(?:/s|ps)?", s)
    if m is None:
        raise UserError(f"bandwidth {text!r} is not a rate like 5GB/s, 500MB/s or 5e9")
    value = float(m.group(1)) * _BANDWIDTH_UNITS[m.group(2) or ""]
    if not value > 0:
        raise UserError(f"bandwidth {text!r} must be positive")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="evaluate.py",
        description="Run an MoE model with offloaded experts (or simulate it) and report hit rate, "
                    "collisions, stall time, TTFT and TPOT next to LRU and the oracle bound.",
    )
    p.add_argument("--mode", choices=("engine", "sim"), default="engine",
                   help="engine: run the model for real; sim: replay the same prompts in the simulator only")
    p.add_argument("--model", default=TINY, help="tiny-olmoe (offline demo), a local folder or a hub id")
    p.add_argument("--system", choices=sorted(SYSTEMS), default=None,
                   help="one of the paper's systems (its prefetch/eviction/miss/routing); compared with LS drop-in")
    p.add_argument("--policy", default="least_stale", help="eviction policy (offload.policies)")
    p.add_argument("--prefetch", default="learned", choices=("learned", "gate", "topk", "score", "none"),
                   help="learned: the checkpoint's predictor; gate: router of l+d on h_l; topk/score: the "
                        "paper's next-layer prefetchers; none")
    p.add_argument("--checkpoint", default=None, help="predictor file (default: newest in --checkpoints)")
    p.add_argument("--checkpoints", default="checkpoints", help="folder train.py writes to")
    p.add_argument("--lookahead", type=int, default=None, help="layers ahead to prefetch (default: the predictor's)")
    p.add_argument("--overfetch", type=float, default=1.0, help="top-k prefetch takes ceil(k * overfetch) experts")
    p.add_argument("--percentile", type=float, default=0.8, help="score prefetch threshold quantile")
    p.add_argument("--capacity", default="5%", help="expert cache size: 5%%, 0.6GB or a slot count")
    p.add_argument("--bandwidth", default="5GB/s", help="emulated host->device link (inf: unthrottled)")
    p.add_argument("--routing", default="standard", choices=("standard", "cache-aware"))
    p.add_argument("--routing-lambda", type=float, default=0.3)
    p.add_argument("--miss", default="fetch", choices=("fetch", "drop", "substitute"))
    p.add_argument("--dataset", default=None, help="prompt source (default: demo for tiny-olmoe, gsm8k otherwise)")
    p.add_argument("--store", default=None, help="--mode sim: replay this trace store instead of recording one")
    p.add_argument("--prompts", type=int, default=8, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA for real models), float32, bfloat16")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: the watchdog needs a core and tiny matmuls gain nothing)")
    p.add_argument("--hardware", default="a100-5gbs", help="hardware profile for the simulated TTFT column")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file")
    p.add_argument("--plots", default=None, help="write PNG plots into this folder")
    p.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=True,
                   help="log to Weights & Biases (offline unless WANDB_API_KEY is set; WANDB_MODE=disabled turns it off)")
    p.add_argument("--wandb-project", default="moe-lookahead")
    p.add_argument("--seed", type=int, default=0)
    return p


# ---------------------------------------------------------------------- one configuration
@dataclass
class RowSpec:
    """One row of the table: an engine run (and its simulation) or a simulation only."""

    label: str
    policy: str
    prefetch: str
    miss: str = "fetch"
    routing: str = "standard"
    engine: bool = True


def _rows(args: argparse.Namespace) -> list[RowSpec]:
    if args.system is not None:
        s = SYSTEMS[args.system]
        base = RowSpec(args.system, s["policy"], s["prefetch"], s["miss"], s["routing"])
        rows = [base]
        if s["policy"] != "least_stale":
            rows.append(replace(base, label=f"{args.system} + LS", policy="least_stale"))
    else:
        base = RowSpec(f"{args.policy} + {args.prefetch}", args.policy, args.prefetch, args.miss, args.routing)
        rows = [base]
        if args.policy != "lru":
            rows.append(replace(base, label=f"lru + {args.prefetch}", policy="lru"))
    rows.append(RowSpec("oracle bound: belady + oracle", "belady", "oracle", engine=False))
    return rows


# ---------------------------------------------------------------------- predictor
def _predictor(args: argparse.Namespace, loaded: Any, prefetch: str):
    """The Predictor the engine prefetches with, or None."""
    from predictors.gate_lookahead import GateLookahead

    if prefetch == "none":
        return None
    if prefetch == "learned":
        from predictors.checkpoint import latest_checkpoint, load_predictor

        path = args.checkpoint or latest_checkpoint(args.checkpoints)
        if path is None:
            raise UserError(f"no trained predictor in {args.checkpoints}/: run `python train.py` first "
                            f"(or pass --prefetch gate/topk/none)")
        if not Path(path).is_file():
            raise UserError(f"checkpoint {path} does not exist")
        predictor = load_predictor(path, loaded.info)
        predictor.source = str(path)
        return predictor
    a = loaded.adapter
    weights = torch.stack([a.router_weight(i).detach().float().cpu() for i in range(a.num_layers)])
    weights = weights.to(args.device)  # the engine calls it on device-resident hidden states
    lookahead = 1 if prefetch in ("topk", "score") else (args.lookahead or 1)
    return GateLookahead(weights, a.top_k, lookahead)


def _lookahead(args: argparse.Namespace, predictor: Any) -> int:
    if predictor is None:
        return 1
    if args.lookahead is not None:
        if args.lookahead < 1:
            raise UserError(f"--lookahead must be at least 1, got {args.lookahead}")
        return min(args.lookahead, predictor.lookahead)
    return predictor.lookahead


def _sim_prefetch(row: RowSpec, predictor: Any, lookahead: int) -> str:
    """The simulator's name for the prefetcher the engine row used."""
    if row.prefetch == "learned":
        return f"ckpt:{predictor.source}"
    if row.prefetch == "gate" and lookahead == 1:
        return "topk"
    return row.prefetch


# ---------------------------------------------------------------------- running
def _check_inputs(args: argparse.Namespace) -> float | None:
    if args.prompts < 1:
        raise UserError(f"--prompts must be at least 1, got {args.prompts}")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.system == "hobbit":
        raise UserError("HOBBIT needs quantized expert copies (int8/int4/int2) for its precision cascade and LHU "
                        "eviction; this engine keeps experts in the model's dtype only. Try --system "
                        "eliseev_mazur, zhu or mixturecache")
    bandwidth = parse_bandwidth(args.bandwidth)
    device = str(args.device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but no CUDA GPU is available (torch {torch.__version__})")
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    return bandwidth


def _load(args: argparse.Namespace):
    from data_pipeline.models import load_model

    dtype = args.dtype
    if dtype == "auto" and str(args.device).startswith("cuda") and args.model != TINY:
        dtype = "bfloat16"  # load on the host in the dtype the device will run
    return load_model(args.model, dtype=dtype, device="cpu", seed=args.seed)


def _hardware_spec(name: str, bandwidth: float | None) -> str:
    from offload.hardware import get_hardware

    get_hardware(name)  # unknown profile -> one-line error before any work
    if bandwidth is None:
        return name
    sep = "," if ":" in name else ":"
    return f"{name}{sep}link_gbps={bandwidth / 1e9:g}"


def _engine_row(args, row: RowSpec, loaded, prompts, predictor, lookahead: int, slots: int,
                bandwidth: float | None, reference: list[list[int]], workdir: Path) -> tuple[dict, Any]:
    from offload.engine.engine import EngineConfig, OffloadEngine, clone_loaded
    from offload.engine.metrics import summarize
    from offload.engine.run import run_prompts

    config = EngineConfig(
        capacity_slots=slots, policy=row.policy, bandwidth=bandwidth, routing=row.routing,
        routing_lambda=args.routing_lambda, miss=row.miss,
        prefetch="score" if row.prefetch == "score" else "topk",
        prefetch_params={"overfetch": args.overfetch, "percentile": args.percentile, "lookahead": lookahead},
        device=str(args.device),
    )
    with OffloadEngine(clone_loaded(loaded), config, predictor=predictor if row.prefetch != "none" else None) as eng:
        recorder = eng.record(hidden=True)
        metrics, _ = run_prompts(loaded, prompts, args.max_new_tokens, engine=eng, reference=reference,
                                 progress=f"engine: {row.label}")
    a = loaded.adapter
    store = recorder.write(
        workdir / re.sub(r"[^a-z0-9]+", "-", row.label.lower()), loaded.info,
        router_weights={i: a.router_weight(i).detach().float().cpu().numpy() for i in range(a.num_layers)},
    )
    return {"summary": summarize(metrics), "prompts": [m.as_dict() for m in metrics]}, store


def _simulate(args, row: RowSpec, store, predictor, lookahead: int, hardware: str) -> dict[str, Any]:
    from offload.simulator import SimConfig, simulate_configs

    prefetch = "oracle" if not row.engine else _sim_prefetch(row, predictor, lookahead)
    cfg = SimConfig(
        policy=row.policy, capacity=args.capacity, prefetch=prefetch, lookahead=lookahead,
        overfetch=args.overfetch, hardware=hardware, miss=row.miss, routing=row.routing,
        routing_lambda=args.routing_lambda,
    )
    if row.engine and row.routing == "cache-aware":
        # the recording holds the engine's re-routed choices: replay them as they are
        cfg = replace(cfg, routing="standard")
    return simulate_configs(store, [cfg])[0]


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run every row; returns the report dict (also what --json writes)."""
    bandwidth = _check_inputs(args)
    if str(args.device) == "cpu":
        torch.set_num_threads(args.threads)
    hardware = _hardware_spec(args.hardware, bandwidth)
    rows = _rows(args)
    if args.mode == "sim" and args.store:
        return _replay_store(args, rows, hardware, bandwidth)
    if args.store:
        raise UserError("--store is for --mode sim; the engine generates its own routing")

    from offload.capacity import parse_capacity
    from offload.engine.generate import check_fits
    from offload.engine.metrics import summarize
    from offload.engine.prompts import load_prompts
    from offload.engine.run import encode, run_prompts

    loaded = _load(args)
    slots = parse_capacity(args.capacity, loaded.info)
    dataset = args.dataset or ("demo" if args.model == TINY else "gsm8k")
    prompts = load_prompts(dataset, args.prompts)
    for prompt in prompts:
        check_fits(loaded.model, encode(loaded.tokenizer, prompt).shape[1], args.max_new_tokens)
    predictors = {r.prefetch: _predictor(args, loaded, r.prefetch) for r in rows if r.prefetch != "oracle"}
    main_predictor = predictors.get(rows[0].prefetch)
    lookahead = _lookahead(args, main_predictor)

    plain_metrics, _ = run_prompts(loaded, prompts, args.max_new_tokens, progress="plain model")
    reference = [m.generated for m in plain_metrics]
    report = _header(args, loaded.info, slots, bandwidth, hardware, lookahead, main_predictor)
    report.update(dataset=dataset, prompts=len(prompts), plain=summarize(plain_metrics))
    with tempfile.TemporaryDirectory(prefix="engine-traces-") as tmp:
        workdir = Path(tmp)
        shared_store = None  # the plain routing: what sim mode and the oracle row replay
        for row in rows:
            entry = _entry(row)
            if row.engine and args.mode == "engine":
                entry["engine"], store = _engine_row(args, row, loaded, prompts, predictors[row.prefetch],
                                                     lookahead, slots, bandwidth, reference, workdir)
                shared_store = shared_store or store
            else:
                if shared_store is None:
                    shared_store = _record(args, loaded, prompts, workdir)
                store = shared_store
            entry["sim"] = _simulate(args, row, store, predictors.get(row.prefetch), lookahead, hardware)
            report["rows"].append(entry)
    return report


def _header(args, info, slots: int, bandwidth, hardware: str, lookahead: int, predictor) -> dict[str, Any]:
    return {
        "model": info.model_id, "capacity": args.capacity, "capacity_slots": slots,
        "capacity_fraction": slots / (info.num_layers * info.num_experts),
        "bandwidth_bytes_per_s": bandwidth, "hardware": hardware, "device": str(args.device), "mode": args.mode,
        "system": args.system, "lookahead": lookahead, "max_new_tokens": args.max_new_tokens,
        "predictor": getattr(predictor, "source", None) or (predictor.describe() if predictor else None),
        "rows": [],
    }


def _entry(row: RowSpec) -> dict[str, Any]:
    return {"label": row.label, "policy": row.policy, "prefetch": row.prefetch, "miss": row.miss,
            "routing": row.routing}


def _record(args, loaded, prompts, workdir: Path):
    """The plain model's routing on the prompts, recorded by an engine that holds every expert."""
    from offload.engine.engine import EngineConfig, OffloadEngine, clone_loaded
    from offload.engine.run import run_prompts

    a = loaded.adapter
    config = EngineConfig(capacity_slots=a.num_layers * a.num_experts, policy="lru", bandwidth=None,
                          device=str(args.device))
    with OffloadEngine(clone_loaded(loaded), config) as eng:
        recorder = eng.record(hidden=True)
        run_prompts(loaded, prompts, args.max_new_tokens, engine=eng, progress="recording routing")
    return recorder.write(workdir / "plain", loaded.info, router_weights={
        i: a.router_weight(i).detach().float().cpu().numpy() for i in range(a.num_layers)})


def _replay_store(args, rows: list[RowSpec], hardware: str, bandwidth) -> dict[str, Any]:
    """--mode sim --store PATH: every row simulated on an existing trace store (no model is run)."""
    from data_pipeline.trace_store import open_store
    from offload.capacity import parse_capacity

    store = open_store(args.store)
    slots = parse_capacity(args.capacity, store.model)
    predictors: dict[str, Any] = {}
    for row in rows:
        if row.prefetch == "learned" and "learned" not in predictors:
            from predictors.checkpoint import latest_checkpoint, load_predictor

            path = args.checkpoint or latest_checkpoint(args.checkpoints)
            if path is None:
                raise UserError(f"no trained predictor in {args.checkpoints}/: run `python train.py` first")
            predictors["learned"] = load_predictor(path, store.model)
            predictors["learned"].source = str(path)
    main_predictor = predictors.get(rows[0].prefetch)
    lookahead = _lookahead(args, main_predictor) if main_predictor else (args.lookahead or 1)
    report = _header(args, store.model, slots, bandwidth, hardware, lookahead, main_predictor)
    report.update(dataset=str(store.path), prompts=store.num_sequences)
    for row in rows:
        entry = _entry(row)
        entry["sim"] = _simulate(args, row, store, predictors.get(row.prefetch), lookahead, hardware)
        report["rows"].append(entry)
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``evaluate.py`` (engine and sim modes); bad input raises UserError."""
    args = build_parser().parse_args(argv)
    from offload.engine.report import log_wandb, print_table, write_json, write_plots

    report = evaluate(args)
    print_table(report)
    if args.json:
        write_json(report, args.json)
    if args.plots:
        write_plots(report, args.plots)
    if args.wandb and os.environ.get("WANDB_MODE", "").lower() != "disabled":
        log_wandb(report, args.wandb_project, args.plots)
    return 0


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
