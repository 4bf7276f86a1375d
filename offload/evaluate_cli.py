"""``evaluate.py``'s one front end: one parser, one validation pass, two modes.

- **engine** (no ``--trace``): runs a model with offloaded experts and reports every configuration next
  to its references (run logic: :mod:`offload.engine.cli`);
- **simulation** (``--trace traces/NAME``): sweeps the trace-driven simulator over the cross product of
  the comma lists (run logic: :mod:`offload.sweep`).

A flag both modes take has one type and one meaning in both. ``--policy``, ``--prefetch``,
``--capacity``, ``--hardware``, ``--lookahead``, ``--admission``, ``--miss`` and ``--routing`` are comma
lists; the engine runs one configuration, so it takes one value of each and refuses a list of several in
one line, except ``--miss`` (one engine row per handler). Only defaults differ between the modes (the
engine's are the demo's: the learned predictor, value admission, this machine's calibrated profile). A
flag of one mode given in the other is refused in one line. Every refusal here comes before any model
loads or any configuration runs; what needs the model or the store (a capacity below top-k, a checkpoint
trained for another model) is refused as soon as that is open.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from core.errors import UserError
from core.passes import PHASES
from offload.admission import ADMISSIONS
from offload.capacity import Capacity, parse_capacities
from offload.hardware import get_hardware, hardware_names
from offload.miss_handling import MISS_MODES
from offload.policies import POLICIES
from offload.precision import PRECISIONS, precision_ladder
from offload.prefetch import PREFETCHERS, refuse_renamed_prefetcher
from offload.routing import ROUTINGS
from offload.simulator import PASS_SETS
from offload.systems import SYSTEMS

ENGINE, SIM = "engine", "sim"
TINY = "tiny-olmoe"
MINI = "olmoe-mini"  # the demo model: trained, committed under models/

#: the native dtype of the paper's models' experts (their low-bit copies shrink by this dtype's ratio)
TARGET_DTYPE = "bfloat16"
#: expert sizes of the paper's models (bf16, gate + up + down projections): what ``--expert-bytes`` emulates
EXPERT_TARGETS: dict[str, int] = {
    "olmoe-1b-7b": 3 * 2048 * 1024 * 2,  # 12.6 MB (12 MiB)
    "qwen1.5-moe-a2.7b": 3 * 2048 * 1408 * 2,  # 17.3 MB (16.5 MiB)
    "phi-3.5-moe": 3 * 4096 * 6400 * 2,  # 157 MB (150 MiB)
    "mixtral-8x7b": 3 * 4096 * 14336 * 2,  # 352 MB (336 MiB)
}

#: every flag's default in each mode; a flag absent from a mode's table is refused in that mode
DEFAULTS: dict[str, dict[str, Any]] = {
    ENGINE: dict(
        policy="least_stale", prefetch="learned", capacity="5%", hardware="calibrated", lookahead=None,
        overfetch=1.0, admission="value", miss="fetch", routing="standard", routing_lambda=0.3, precisions=None,
        expert_bytes="olmoe-1b-7b", checkpoint=None, checkpoints="checkpoints", json=None, plots=None, report=None,
        # engine only
        model=MINI, system=None, percentile=0.8, bandwidth="5GB/s", quality_tokens=32, dataset=None, prompts=8,
        max_new_tokens=16, device="cpu", dtype="auto", threads=1, wandb=True, wandb_project="moe-lookahead", seed=0,
    ),
    SIM: dict(
        policy="least_stale,lru,belady", prefetch="none", capacity="5%", hardware="a100-5gbs", lookahead="1",
        overfetch=1.0, admission="greedy", miss="fetch", routing="standard", routing_lambda=0.3, precisions=None,
        expert_bytes="model", checkpoint=None, checkpoints="checkpoints", json=None, plots=None, report=None,
        # simulation only
        trace=None, phase="both", cache="global", passes="all", predictor_us=None, backend="auto", workers=1,
        predictor=None, no_references=False,
    ),
}
MODE_NAMES = {ENGINE: "engine mode (no --trace)", SIM: "simulation mode (--trace traces/NAME)"}
#: what a flag of the other mode is called here, where it is not just missing
_INSTEAD = {
    "bandwidth": "the link is the --hardware profile's (e.g. a100-5gbs:link_gbps=5)",
    "model": "the model is the trace store's",
    "predictor_us": "the engine measures its own forecast time",
    "trace": "drop --mode engine to simulate the store",
}


@dataclass
class Common:
    """The flags both modes take, checked: every swept flag a list."""

    policy: list[str]
    prefetch: list[str]
    capacity: list[Capacity]
    hardware: list[str]
    lookahead: list[int] | None  # None: the predictor's (engine)
    admission: list[str]
    miss: list[str]
    routing: list[str]
    overfetch: float
    routing_lambda: float
    precisions: tuple[str, ...]
    expert_bytes: str  # as given: a size, a model name (EXPERT_TARGETS) or "model"
    copy_bytes: int | None  # bytes one copy holds the link for; None: the model's own expert size
    copy_dtype: str | None  # the emulated expert's native dtype (its low-bit copies' byte ratio); None: the model's
    checkpoint: str | None
    checkpoints: str
    json: str | None
    plots: str | None
    report: str | None


@dataclass
class SweepArgs:
    """Simulation mode, checked: the sweep is the cross product of the lists."""

    trace: str
    policy: list[str]
    prefetch: list[str]  # "learned" resolved to ckpt:PATH
    capacity: list[Capacity]
    hardware: list[str]
    lookahead: list[int]
    admission: list[str]
    miss: list[str]
    routing: list[str]
    phase: list[str]
    cache: list[str]
    overfetch: float
    routing_lambda: float
    precisions: tuple[str, ...]
    copy_bytes: int | None
    copy_dtype: str | None
    passes: str
    predictor_us: float | None
    backend: str
    workers: int
    predictor: str | None  # reuse-forecaster checkpoint of the forecast policies
    no_references: bool
    json: str | None
    plots: str | None
    report: str | None
    argv: list[str] = field(default_factory=list)  # the command line the HTML report records


@dataclass
class EngineArgs:
    """Engine mode, checked: one configuration (and one row per ``--miss`` handler)."""

    model: str
    system: str | None
    policy: str
    prefetch: str  # learned | gate | topk | percentile | none
    checkpoint_file: Path | None  # the learned predictor, resolved (prefetch learned, no --system)
    lookahead: int | None  # None: the predictor's
    overfetch: float
    percentile: float
    admission: str
    capacity: Capacity
    bandwidth: float | None  # bytes/s of the emulated link; None: unthrottled
    expert_bytes: str
    copy_bytes: int | None
    copy_dtype: str | None
    routing: str
    routing_lambda: float
    miss: list[str]
    precisions: tuple[str, ...]
    quality_tokens: int
    dataset: str | None
    prompts: int
    max_new_tokens: int
    device: str
    dtype: str
    threads: int
    hardware: str  # "calibrated" or a profile (overrides allowed)
    json: str | None
    plots: str | None
    report: str | None
    wandb: bool
    wandb_project: str
    seed: int
    argv: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------- value parsers
_BANDWIDTH_UNITS = {"": 1.0, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
                    "kib": 2.0**10, "mib": 2.0**20, "gib": 2.0**30, "tib": 2.0**40}


def parse_bandwidth(text: str) -> float | None:
    """``5GB/s``, ``500MB/s``, ``12GiB/s``, ``5e9`` -> bytes/s; ``inf``/``none`` -> None (unthrottled)."""
    s = str(text).strip().lower().replace(" ", "")
    if s in ("inf", "none", "unlimited", "off"):
        return None
    m = re.fullmatch(r"([-+]?[0-9.]+(?:e[-+]?[0-9]+)?)([kmgt]i?b|b)?(?:/s|ps)?", s)
    try:
        value = float(m.group(1)) * _BANDWIDTH_UNITS[m.group(2) or ""] if m else None
    except ValueError:
        value = None
    if value is None:
        raise UserError(f"bandwidth {text!r} is not a rate like 5GB/s, 500MB/s or 5e9")
    if not value > 0:
        raise UserError(f"bandwidth {text!r} must be positive")
    return value


def parse_expert_bytes(text: str) -> int | None:
    """``olmoe-1b-7b`` (or another name in EXPERT_TARGETS), a size (``12.6MB``, ``300MiB``, ``5e6``), or
    ``model``: the model's own expert size (None)."""
    s = str(text).strip().lower()
    if s in ("model", "real", "none"):
        return None
    if s in EXPERT_TARGETS:
        return EXPERT_TARGETS[s]
    m = re.fullmatch(r"([0-9.]+(?:e[-+]?[0-9]+)?)([kmgt]i?b|b)?", s.replace(" ", ""))
    try:
        value = float(m.group(1)) * _BANDWIDTH_UNITS[m.group(2) or ""] if m else None
    except ValueError:
        value = None
    if value is None:
        raise UserError(f"--expert-bytes/--copy-bytes {text!r} is neither a size (12.6MB), 'model' nor one of "
                        f"{', '.join(EXPERT_TARGETS)}")
    if not (value >= 1 and value < 1e13):
        raise UserError(f"--expert-bytes/--copy-bytes {text!r} must be at least one byte")
    return int(value)


def split_list(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def split_hardware(text: str) -> list[str]:
    """Comma list of profiles where a profile may carry overrides: ``a100-5gbs,rtx4090:link_gbps=12,tflops=60``
    (a piece with ``=`` but no ``:`` continues the previous profile's overrides)."""
    out: list[str] = []
    for piece in split_list(text):
        if "=" in piece and ":" not in piece and out:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out


def checkpoint_path(checkpoint: str | None, checkpoints: str) -> Path:
    """The learned predictor file: ``--checkpoint`` (a file, or a train.py run folder: its best family),
    else the newest finished run under ``--checkpoints``."""
    from predictors.checkpoint import latest_checkpoint, run_predictor

    if checkpoint is None:
        path = latest_checkpoint(checkpoints)
        if path is None:
            raise UserError(f"no trained predictor in {checkpoints}/: run `python train.py` first "
                            f"(or pass --prefetch gate/topk/none)")
        return path
    given = Path(checkpoint)
    if given.is_dir():
        path = run_predictor(given)
        if path is None:
            raise UserError(f"--checkpoint {given} is a folder without a finished train.py run (run.json naming a "
                            f"trained best predictor); give a predictor file or such a run folder")
        return path
    if not given.is_file():
        raise UserError(f"checkpoint {given} does not exist")
    return given


# ---------------------------------------------------------------------- the parser
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's usage dump becomes one line
        raise UserError(f"{message} (see --help)")


def _flag(dest: str) -> str:
    return {"wandb": "--wandb/--no-wandb", "expert_bytes": "--expert-bytes/--copy-bytes"}.get(
        dest, "--" + dest.replace("_", "-"))


def _default_help(dest: str) -> str:
    engine, sim = DEFAULTS[ENGINE].get(dest), DEFAULTS[SIM].get(dest)
    shown = ({"engine": engine} if dest not in DEFAULTS[SIM] else {"simulation": sim} if dest not in DEFAULTS[ENGINE]
             else {"both": engine} if engine == sim else {"engine": engine, "simulation": sim})
    parts = [f"{v}" if k == "both" or len(shown) == 1 else f"{v} ({k})" for k, v in shown.items()
             if v not in (None, False)]
    return f" (default: {', '.join(parts)})".replace("%", "%%") if parts else ""


def build_parser() -> argparse.ArgumentParser:
    """Every flag of both modes; defaults are filled per mode by :func:`parse_args` (a flag given is told
    from one left out, so one mode's flag in the other can be refused)."""

    p = _Parser(prog="evaluate.py", argument_default=argparse.SUPPRESS,
                description="Evaluate expert caching: run an MoE model with offloaded experts (engine mode, the "
                            "default) or sweep the trace-driven simulator over a trace store (simulation mode, "
                            "--trace). Both report hit rate, collisions, bytes moved, stall, TTFT and TPOT next to "
                            "LRU without prefetch, Belady + oracle prefetch and the physical limit.")

    def add(group: Any, *names: str, help: str, **kw: Any) -> None:
        dest = kw.get("dest") or names[0].lstrip("-").replace("-", "_")
        group.add_argument(*names, help=help + _default_help(dest), **kw)

    p.add_argument("--mode", choices=(ENGINE, SIM),
                   help="engine or sim; chosen by --trace when left out (sim with --trace, else engine)")
    both = p.add_argument_group("both modes (a comma list sweeps in simulation; the engine takes one value)")
    add(both, "--policy", help=f"eviction policies ({', '.join(POLICIES)}; 'all' in simulation)")
    add(both, "--prefetch", help=f"prefetchers: learned (the --checkpoint predictor), ckpt:PATH, "
                                 f"{', '.join(PREFETCHERS)} (oracle: simulation only); "
                                 f"{' and '.join(next_layer_prefetchers())} forecast the next layer only")
    add(both, "--capacity", help="cache sizes: 5%%, 0.6GB or a slot count")
    add(both, "--hardware", help=f"hardware profiles ({', '.join(hardware_names())}; name:field=value overrides); "
                                 "in the engine the profile of its simulator columns: calibrated (this machine, "
                                 "fitted to the plain engine run) or a named one to see the same run elsewhere")
    add(both, "--lookahead", help="prefetch lookahead distances D >= 1 (engine default: the predictor's)")
    add(both, "--admission", help="prefetch admission: value (only what arrives in time and is worth its copy) or "
                                  "greedy (every selected expert, the paper's; --system presets use it)")
    add(both, "--miss", help=f"miss handling ({', '.join(MISS_MODES)}); the engine runs one row each")
    add(both, "--routing", help="routing (standard, cache-aware)")
    add(both, "--overfetch", type=float, help="top-k prefetch takes ceil(k * overfetch) experts")
    add(both, "--routing-lambda", type=float, help="cache-aware routing lambda")
    add(both, "--precisions", help=f"precisions the quantized host tier holds for the lower-bit miss handlers "
                                   f"(native is always held; fetch-lowest-bit and the cascade's first copy use the "
                                   f"lowest; default: {','.join(PRECISIONS)})")
    add(both, "--expert-bytes", "--copy-bytes", dest="expert_bytes",
        help=f"bytes each expert copy holds the link for: {', '.join(EXPERT_TARGETS)}, a size (12.6MB, 1e6) or "
             "'model' (the model's, the store's); the weights the engine copies stay the model's")
    add(both, "--checkpoint", help="learned predictor file or train.py run folder (default: newest in --checkpoints)")
    add(both, "--checkpoints", help="folder train.py writes to")
    add(both, "--json", help="write the numbers to this JSON file")
    add(both, "--plots", help="write PNG plots into this folder")
    add(both, "--report", help="write the self-contained HTML report here (default: beside --json, else "
                               "reports/<evaluate|sweep>-<name>-<time>.html; 'none': no report)")

    eng = p.add_argument_group("engine mode")
    add(eng, "--model", help="olmoe-mini (the offline demo), tiny-olmoe (random, for tests), a local folder or a "
                             "hub id")
    add(eng, "--system", help="one of the paper's systems (eliseev_mazur, zhu, mixturecache, hobbit: its "
                              "prefetch/eviction/miss/routing), next to the same with Least-Stale")
    add(eng, "--percentile", type=float, help="percentile prefetch threshold quantile")
    add(eng, "--bandwidth", help="emulated host->device link (inf: unthrottled)")
    add(eng, "--quality-tokens", type=int, help="reference continuation tokens per prompt for perplexity and "
                                                "next-token agreement (teacher-forced); 0: no quality columns")
    add(eng, "--dataset", help="prompt source (default: demo:heldout-prompts for olmoe-mini, demo for tiny-olmoe, "
                               "gsm8k otherwise)")
    add(eng, "--prompts", type=int, help="number of prompts")
    add(eng, "--max-new-tokens", type=int, help="tokens generated per prompt")
    add(eng, "--device", help="cpu, cuda or cuda:N")
    add(eng, "--dtype", help="auto (bf16 on CUDA for real models), float32, bfloat16")
    add(eng, "--threads", type=int, help="torch CPU threads (the watchdog needs a core; tiny matmuls gain nothing)")
    add(eng, "--wandb", action=argparse.BooleanOptionalAction,
        help="log to Weights & Biases (offline unless WANDB_API_KEY is set; WANDB_MODE=disabled turns it off)")
    add(eng, "--wandb-project", help="W&B project")
    add(eng, "--seed", type=int, help="seed of a randomly initialised model")

    sim = p.add_argument_group("simulation mode")
    add(sim, "--trace", help="trace store folder (traces/NAME); selects simulation mode")
    add(sim, "--phase", help=f"passes to replay, comma list ({', '.join(PHASES)})")
    add(sim, "--cache", help="cache layouts, comma list (global, per-layer)")
    add(sim, "--passes", help="passes counted: all, or the held-out part of train.py's split (held-out = test; "
                              "train, val)")
    add(sim, "--predictor-us", type=float,
        help="device time of one forecast call (default: the predictor's roofline cost)")
    add(sim, "--backend", choices=["auto", "fast", "reference"], help="simulator implementation")
    add(sim, "--workers", type=int,
        help="processes to spread the configurations over (each opens the store by path, memory-mapped)")
    add(sim, "--predictor", help="reuse-forecaster checkpoint, or a train.py run folder holding one (python train.py "
                                 "--families '[reuse_logistic]'), for the forecast policies (forecast, "
                                 "least_stale_forecast); without it they count reuse online from the run")
    add(sim, "--no-references", action="store_true",
        help="do not add the reference rows (LRU without prefetch = 0%%, Belady + oracle = 100%%, the physical "
             "limit) to each setting")
    return p


# ---------------------------------------------------------------------- the validation pass
def parse_args(argv: list[str]) -> EngineArgs | SweepArgs:
    """Parse and check ``evaluate.py``'s command line: the mode, then every flag, each refusal one line."""
    given = vars(build_parser().parse_args(argv))
    mode = _mode(given)
    for dest in given:
        if dest != "mode" and dest not in DEFAULTS[mode]:
            other = MODE_NAMES[SIM if mode == ENGINE else ENGINE]
            hint = f"; {_INSTEAD[dest]}" if dest in _INSTEAD else ""
            raise UserError(f"{_flag(dest)} is a flag of {other}, and this is {MODE_NAMES[mode]}{hint}")
    values = {**DEFAULTS[mode], **{k: v for k, v in given.items() if k != "mode"}}
    common = _common(values, mode)
    if mode == SIM:
        return _sweep_args(values, common, argv)
    return _engine_args(values, common, argv)


def _mode(given: dict[str, Any]) -> str:
    trace = given.get("trace")
    if trace is not None and not str(trace).strip():
        raise UserError("--trace is empty; give a trace store folder (traces/NAME)")
    if given.get("mode") == SIM and trace is None:
        raise UserError("simulation mode needs --trace traces/NAME")
    if given.get("mode") == ENGINE and trace is not None:
        raise UserError("--trace selects simulation mode; engine mode (--mode engine) runs a model instead: drop "
                        "one of them")
    return SIM if trace is not None else ENGINE


def _list(flag: str, text: Any) -> list[str]:
    items = split_list(text)
    if not items:
        raise UserError(f"--{flag} is empty; give at least one value")
    return items


def _check(values: list[str], valid: tuple[str, ...] | list[str], what: str) -> None:
    for v in values:
        if v not in valid:
            raise UserError(f"unknown {what} {v!r}; valid: {', '.join(valid)}")


def _common(v: dict[str, Any], mode: str) -> Common:

    if str(v["policy"]).strip() == "all":
        policies = [p for p in POLICIES if p != "random"] + (["random"] if "random" in POLICIES else [])
    else:
        policies = _list("policy", v["policy"])
        for pol in policies:
            if pol not in POLICIES:
                raise UserError(f"unknown eviction policy {pol!r}; valid: {', '.join(POLICIES)}, all")
    prefetch = _list("prefetch", v["prefetch"])
    for pf in prefetch:
        refuse_renamed_prefetcher(pf)
        if pf not in (*PREFETCHERS, "learned") and not pf.startswith("ckpt:"):
            raise UserError(f"unknown prefetcher {pf!r}; valid: {', '.join(PREFETCHERS)}, learned, ckpt:PATH")
    capacity = parse_capacities(v["capacity"])
    hardware = split_hardware(v["hardware"])
    if not hardware:
        raise UserError("--hardware is empty; give at least one value")
    for hw in hardware:
        if hw == "calibrated" and mode == SIM:
            raise UserError("--hardware calibrated fits this machine to a plain engine run, so it is engine mode's; "
                            "simulation takes a named profile (a100-5gbs, name:link_gbps=12, ...)")
        if hw != "calibrated":
            get_hardware(hw)  # an unknown profile or override lists the valid ones
    lookahead = None
    if v["lookahead"] is not None:
        try:
            lookahead = [int(x) for x in _list("lookahead", v["lookahead"])]
        except ValueError:
            raise UserError(f"--lookahead {v['lookahead']!r} must be whole numbers") from None
        if any(d < 1 for d in lookahead):
            raise UserError(f"--lookahead must be at least 1, got {v['lookahead']}")
    admission = _list("admission", v["admission"])
    _check(admission, ADMISSIONS, "prefetch admission")
    miss = list(dict.fromkeys(_list("miss", v["miss"])))
    _check(miss, MISS_MODES, "miss handling")
    routing = _list("routing", v["routing"])
    _check(routing, ROUTINGS, "routing")
    for name in ("overfetch", "routing_lambda"):
        if not math.isfinite(v[name]):
            raise UserError(f"{_flag(name)} must be a finite number, got {v[name]}")
    precisions = precision_ladder(PRECISIONS if v["precisions"] is None else v["precisions"])
    copy_bytes = parse_expert_bytes(v["expert_bytes"])
    named = str(v["expert_bytes"]).strip().lower() in EXPERT_TARGETS
    return Common(policies, prefetch, capacity, hardware, lookahead, admission, miss, routing, v["overfetch"],
                  v["routing_lambda"], precisions, str(v["expert_bytes"]), copy_bytes,
                  TARGET_DTYPE if named else None, v["checkpoint"], v["checkpoints"], v["json"], v["plots"],
                  v["report"])


def next_layer_prefetchers() -> tuple[str, ...]:
    """The paper's prefetchers (every named one but none, oracle and gate): they forecast the next layer only."""

    return tuple(p for p in PREFETCHERS if p not in ("none", "oracle", "gate"))


def _check_lookahead(prefetch: list[str], lookahead: list[int] | None, mode: str) -> None:
    far = [d for d in lookahead or [] if d != 1]
    for pf in prefetch:
        if pf in next_layer_prefetchers() and far:
            others = "gate, learned, ckpt:PATH or oracle" if mode == SIM else "gate, learned or ckpt:PATH"
            raise UserError(f"--prefetch {pf} forecasts the next layer only (the paper's prefetcher); use {others} "
                            f"for --lookahead {','.join(map(str, lookahead or []))}")


def _sweep_args(v: dict[str, Any], c: Common, argv: list[str]) -> SweepArgs:

    phase = _list("phase", v["phase"])
    _check(phase, PHASES, "phase")
    cache = _list("cache", v["cache"])
    _check(cache, ("global", "per-layer"), "cache layout")
    if v["passes"] not in PASS_SETS:
        raise UserError(f"unknown pass set {v['passes']!r}; valid: {', '.join(PASS_SETS)}")
    if v["workers"] < 1:
        raise UserError(f"--workers must be at least 1, got {v['workers']}")
    lookahead = c.lookahead or [1]
    _check_lookahead(c.prefetch, lookahead, SIM)
    prefetch = [f"ckpt:{checkpoint_path(c.checkpoint, c.checkpoints)}" if pf == "learned" else pf
                for pf in c.prefetch]
    return SweepArgs(
        trace=v["trace"], policy=c.policy, prefetch=list(dict.fromkeys(prefetch)), capacity=c.capacity,
        hardware=c.hardware, lookahead=lookahead, admission=c.admission, miss=c.miss, routing=c.routing, phase=phase,
        cache=cache, overfetch=c.overfetch, routing_lambda=c.routing_lambda, precisions=c.precisions,
        copy_bytes=c.copy_bytes, copy_dtype=c.copy_dtype, passes=v["passes"], predictor_us=v["predictor_us"],
        backend=v["backend"], workers=v["workers"], predictor=v["predictor"], no_references=bool(v["no_references"]),
        json=c.json, plots=c.plots, report=c.report, argv=list(argv),
    )


def _one(flag: str, values: list[Any]) -> Any:
    """The one value the engine takes of a list flag; several are refused (they sweep in simulation mode)."""
    if len(values) != 1:
        shown = ", ".join(getattr(x, "text", str(x)) for x in values)
        raise UserError(f"engine mode runs one configuration, so --{flag} takes one value, not {len(values)} "
                        f"({shown}); a comma list sweeps in simulation mode (--trace traces/NAME)")
    return values[0]


def _engine_args(v: dict[str, Any], c: Common, argv: list[str]) -> EngineArgs:
    try:
        # torch (~1 s): only engine mode needs it
        import torch
    except ImportError:
        raise UserError("engine mode is not available in this build; give --trace for simulation mode") from None
    policy, capacity, hardware = _one("policy", c.policy), _one("capacity", c.capacity), _one("hardware", c.hardware)
    admission, routing = _one("admission", c.admission), _one("routing", c.routing)
    lookahead = None if c.lookahead is None else _one("lookahead", c.lookahead)
    prefetch, checkpoint = _one("prefetch", c.prefetch), c.checkpoint
    if prefetch == "oracle":
        raise UserError("--prefetch oracle knows the routing before it happens, so only the simulator runs it "
                        "(--trace traces/NAME); the engine reports Belady + oracle as its 100% reference row")
    if prefetch.startswith("ckpt:"):
        if checkpoint is not None and checkpoint != prefetch[5:]:
            raise UserError(f"--prefetch {prefetch} and --checkpoint {checkpoint} name two predictors; give one")
        prefetch, checkpoint = "learned", prefetch[5:]
    system = v["system"]
    if system is not None and system not in SYSTEMS:
        raise UserError(f"unknown system {system!r}; valid: {', '.join(sorted(SYSTEMS))}")
    _check_lookahead([SYSTEMS[system]["prefetch"] if system else prefetch], c.lookahead, ENGINE)
    for flag, least in (("prompts", 1), ("max_new_tokens", 1), ("quality_tokens", 0), ("threads", 1)):
        if v[flag] < least:
            what = "0 (off) or more" if least == 0 else f"at least {least}"
            raise UserError(f"{_flag(flag)} must be {what}, got {v[flag]}")
    bandwidth = parse_bandwidth(v["bandwidth"])
    device = str(v["device"])
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but no CUDA GPU is available (torch {torch.__version__})")
    checkpoint_file = None
    if prefetch == "learned" and system is None:  # last: the other refusals hold whether or not one was trained
        checkpoint_file = checkpoint_path(checkpoint, c.checkpoints)
    return EngineArgs(
        model=str(v["model"]), system=system, policy=policy, prefetch=prefetch, checkpoint_file=checkpoint_file,
        lookahead=lookahead, overfetch=c.overfetch, percentile=v["percentile"], admission=admission,
        capacity=capacity, bandwidth=bandwidth, expert_bytes=c.expert_bytes, copy_bytes=c.copy_bytes,
        copy_dtype=c.copy_dtype, routing=routing, routing_lambda=c.routing_lambda, miss=c.miss,
        precisions=c.precisions, quality_tokens=v["quality_tokens"], dataset=v["dataset"], prompts=v["prompts"],
        max_new_tokens=v["max_new_tokens"], device=device, dtype=v["dtype"], threads=v["threads"],
        hardware=hardware, json=c.json, plots=c.plots, report=c.report, wandb=bool(v["wandb"]),
        wandb_project=v["wandb_project"], seed=v["seed"], argv=list(argv),
    )
