"""The trace-driven simulator: replay passes through the per-layer step and report what it costs.

:func:`simulate_configs` is the entry point (``evaluate.py`` and the engine call it): it builds the
passes and forecasts once per store/phase/prefetcher and runs every configuration, through the numba
kernel of :mod:`offload.simulator_fast` where it covers the configuration and through
:func:`simulate_reference` otherwise: the one per-layer step of :mod:`offload.step` (the same code
the engine runs) on a virtual clock (:class:`SimBackend`). A test asserts both give identical
numbers.

The timing model (:class:`SimBackend`): per layer the non-expert part runs first
(``Hardware.layer_time``); demand misses queue on the link ahead of every prefetch not started yet
(:mod:`offload.link`); the forecast runs on the device (``Hardware.kernel_time`` of the predictor's
``work``, or ``predictor_us``); the layer's experts run one after another, those already there first,
each starting when the device is free and its copy has arrived. Copies of later layers keep flowing
while experts compute; waiting for a copy is **stall time**. TTFT = duration of a prefill pass, TPOT
= mean duration of a decode pass.

Lower-bit copies (``miss`` = fetch-lowest-bit, fetch-priority, precision-cascade): a copy at a lower
precision moves that precision's packed bytes, sized from the store's model numbers (hidden size,
MoE intermediate size, dtype: :mod:`offload.precision`); an emulated expert (``copy_bytes``) scales by
the same ratio, in ``copy_dtype`` when its native dtype differs from the model's. A low-bit copy's
first run also pays its dequantization (``Hardware.dequant_time``), an applied upgrade its on-device
copy.

Held-out evaluation: ``passes="test"`` (alias ``held-out``) replays every pass in order -- the cache
and the calibration warm up on the earlier ones, as a deployed cache would -- but counts and times
only the passes of the test part of the store's train/val/test split (the split ``train.py`` made;
:mod:`data_pipeline.splits`).
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from tqdm import tqdm

from core.errors import UserError
from core.model_info import PREFILL, ModelInfo, check_lookahead
from core.passes import NEVER, Passes, build_passes, prefill_layer
from data_pipeline.splits import split_rows
from data_pipeline.trace_store import TraceStore
from offload import simulator_fast
from offload.admission import check_admission
from offload.cache import ExpertCache
from offload.capacity import layer_expert_bytes, parse_capacity
from offload.hardware import Hardware, bytes_per_param, get_hardware
from offload.link import SimCopy, SimLink
from offload.miss_handling import MissHandling
from offload.policies import make_policy
from offload.precision import (
    PRECISIONS,
    Shapes,
    byte_ratios,
    dequant_kernels,
    itemsize,
    moe_expert_shapes,
    with_itemsize,
)
from offload.prefetch import ExpertForecast, Prefetcher, forecast_depth, make_prefetcher
from offload.routing import ROUTINGS, CacheAwareRouter
from offload.sim_result import Tally, counted_passes, result
from offload.step import Access, Candidates, LayerStep, Run

PASS_SETS = ("all", "train", "val", "test", "held-out")


@dataclass
class SimConfig:
    """One point of the policy space. ``capacity`` as given by the user (``5%``, ``0.6GB``, ``512``)."""

    policy: str = "least_stale"
    capacity: str = "5%"
    prefetch: str = "none"
    lookahead: int = 1
    overfetch: float = 1.0
    percentile: float = 0.8  # the percentile prefetcher's threshold quantile
    admission: str = "greedy"  # greedy | value (offload.admission)
    hardware: str = "a100-5gbs"
    phase: str = "both"
    cache: str = "global"
    miss: str = "fetch"
    routing: str = "standard"
    routing_lambda: float = 0.3
    drop_from_rank: int = 2
    substitute_tolerance: float = 0.05
    protect_layer: bool = True
    predictor_us: float | None = None  # per forecast call; None: the predictor's roofline cost
    copy_bytes: float | None = None  # bytes one copy moves over the link (emulate a model); None: the store's
    copy_dtype: str | None = None  # native dtype of that emulated expert (its low-bit copies' ratio); None: the store's
    precisions: str = ",".join(PRECISIONS)  # what the host tier holds, for the lower-bit miss handlers
    passes: str = "all"  # all | train | val | test (held-out): which passes are counted
    split: str = "auto"  # the train/val/test split (data_pipeline.splits), as train.py makes it
    split_seed: int = 0
    policy_params: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"  # auto | fast | reference

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("backend")
        return d

    @property
    def counted_part(self) -> str:
        return "test" if self.passes == "held-out" else self.passes


@dataclass
class Replay:
    """Everything a configuration's replay reads, prepared once and shared between configurations."""

    store: TraceStore | None
    passes: Passes
    forecast: ExpertForecast | None
    hardware: Hardware
    capacity_slots: int
    layer_bytes: np.ndarray  # (L,) bytes of one expert of each layer
    bytes_per_param: float
    predictor_cost: Callable[[int], float] = field(default=lambda tokens: 0.0)  # seconds per call
    pass_part: np.ndarray | None = None  # (P,) 0/1/2 = train/val/test; None: every pass counts as train
    copy_bytes: np.ndarray | None = None  # (L,) bytes a copy moves over the link; None: layer_bytes
    shapes: Shapes | None = None  # one expert's weights (shape, bytes per weight): sizes its low-bit copies
    link_ratio: dict[str, float] = field(default_factory=lambda: {"native": 1.0})  # copy bytes per precision

    @property
    def link_bytes(self) -> np.ndarray:
        return self.layer_bytes if self.copy_bytes is None else self.copy_bytes


class SimBackend:
    """The step's virtual machine: a clock, a :class:`~offload.link.SimLink` and the timing model."""

    def __init__(self, replay: Replay):
        self.hw = replay.hardware
        self.link = SimLink(self.hw.link_bytes_per_s)
        self.layer_bytes = replay.layer_bytes
        self.link_bytes = replay.link_bytes
        self.link_ratio = replay.link_ratio
        self.shapes = replay.shapes
        self.compute_ratio = byte_ratios(replay.shapes) if replay.shapes is not None else {"native": 1.0}
        self.bpp = replay.bytes_per_param
        self.predictor_cost = replay.predictor_cost
        self.top_k = replay.passes.top_k
        self.t = 0.0
        self.tokens = 1
        self.compute_s = 0.0  # pure compute (no waiting, no forecasts): the physical limit's other half

    def now(self) -> float:
        return self.t

    def begin_layer(self, layer: int, tokens: int) -> None:
        self.tokens = tokens
        dt = self.hw.layer_time(tokens)
        self.t += dt
        self.compute_s += dt

    def charge_forecast(self, started: float) -> float:
        cost = self.predictor_cost(self.tokens)
        self.t += cost
        return cost

    def layer_estimate(self, layer: int, tokens: int, experts: int) -> tuple[float, float]:
        per_expert = max(1, round(tokens * self.top_k / max(experts, 1)))
        return (self.hw.layer_time(tokens),
                experts * self.hw.expert_time(float(self.layer_bytes[layer]), per_expert, self.bpp))

    def copy_bytes(self, layer: int, precision: str = "native") -> float:
        return float(self.link_bytes[layer]) * self.link_ratio[precision]

    def upgrade(self, copy: SimCopy, slot: int) -> None:
        """The arrived full-precision copy is copied into the slot on the device."""
        assert self.shapes is not None
        dt = self.hw.device_copy_time(float(self.layer_bytes[copy.key[0]]), len(self.shapes))
        self.t += dt
        self.compute_s += dt

    def arrived(self, copy: SimCopy) -> bool:
        return self.link.arrived(copy, self.t)

    def wait(self, copy: SimCopy) -> float:
        arrival = self.link.arrival(copy, self.t)
        if arrival <= self.t:
            return 0.0
        waited = arrival - self.t
        self.t = arrival
        return waited

    def run(self, run: Run) -> None:
        native = float(self.layer_bytes[run.layer])
        dt = self.hw.expert_time(native, run.tokens, self.bpp)
        if run.unpack is not None:  # a low-bit copy's first run: dequantize it into the slot
            assert self.shapes is not None
            p = run.unpack.precision
            dt += self.hw.dequant_time(native, native * self.compute_ratio[p], dequant_kernels(self.shapes, p))
        self.t += dt
        self.compute_s += dt


class Future:
    """The next demand access of every key, for policies that see the future (Belady)."""

    def __init__(self, passes: Passes):
        keys = passes.keys()
        self.next_use = passes.next_use()
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]
        self.num_experts = passes.num_experts
        self.position = 0  # first access index after the running layer

    def access_hint(self, i: int) -> float:
        nu = self.next_use[i]
        return math.inf if nu >= NEVER else float(nu)

    def prefetch_hint(self, key: tuple[int, int]) -> float:
        """Index of the first access of ``key`` after the running layer (inf when none)."""
        k = key[0] * self.num_experts + key[1]
        lo = np.searchsorted(self.sorted_keys, k, side="left")
        hi = np.searchsorted(self.sorted_keys, k, side="right")
        j = lo + np.searchsorted(self.order[lo:hi], self.position, side="left")
        return float(self.order[j]) if j < hi else math.inf


def layer_accesses(passes: Passes, p: int, layer: int, future: Future | None = None) -> list[Access]:
    """The demand accesses of pass ``p`` at ``layer`` as the step takes them (rank order)."""
    L = passes.num_layers
    a, b = int(passes.layer_ptr[p * L + layer]), int(passes.layer_ptr[p * L + layer + 1])
    if future is not None:
        future.position = b
    return [Access(int(passes.expert[i]), float(passes.score[i]), int(passes.best_rank[i]), int(passes.tokens[i]),
                   future.access_hint(i) if future is not None else None) for i in range(a, b)]


def table_forecaster(fc: ExpertForecast, p: int, num_layers: int) -> Callable[[int], list[Candidates]]:
    """The precomputed forecasts of pass ``p`` as the step's forecaster."""

    def forecast(layer: int) -> list[Candidates]:
        out = []
        for d in range(1, fc.lookahead + 1):
            if layer + d >= num_layers or not fc.covered[layer, d - 1]:
                continue
            i = fc.index(p, layer, d, num_layers)
            a, b = int(fc.ptr[i]), int(fc.ptr[i + 1])
            probs = None if fc.prob is None else fc.prob[a:b]
            out.append(Candidates(d, layer + d, fc.expert[a:b], int(fc.selected[i]), probs))
        return out

    return forecast


def simulate_reference(replay: Replay, cfg: SimConfig) -> dict[str, Any]:
    """The replay through :class:`offload.step.LayerStep` and the real cache and policy classes."""
    ps, fc = replay.passes, replay.forecast
    L, E = ps.num_layers, ps.num_experts
    policy = make_policy(cfg.policy, **cfg.policy_params)
    cache = ExpertCache(L, E, replay.capacity_slots, policy, partition=cfg.cache)
    aware = cfg.routing == "cache-aware"
    if policy.needs_future and aware:
        raise UserError("belady needs the future, which cache-aware routing changes; use standard routing")
    store = replay.store
    logits = None
    if aware or cfg.miss == "substitute":
        if store is None or not store.has_router_logits:
            raise UserError(f"{cfg.routing if aware else 'substitute'} needs router logits; this store has none")
        logits = store.router_logits()
    router = CacheAwareRouter(L, ps.top_k, cfg.routing_lambda) if aware else None
    future = Future(ps) if policy.needs_future else None
    backend = SimBackend(replay)
    miss = MissHandling(cfg.miss, cfg.drop_from_rank, cfg.substitute_tolerance, cfg.precisions)
    step = LayerStep(cache, backend, miss=miss,
                     admission=cfg.admission, lookahead=fc.lookahead if fc is not None else 1,
                     depth=forecast_depth(E, ps.top_k), protect_layer=cfg.protect_layer,
                     prefetch_hint=future.prefetch_hint if future is not None else None)
    counted = counted_passes(replay, cfg)
    tally = Tally(collisions=np.zeros(L, dtype=np.int64))
    ptok = ps.pass_tokens
    for p in range(ps.num_passes):
        before, coll_before = step.counters.snapshot(), cache.stats.collision_misses.copy()
        t0, c0 = backend.now(), backend.compute_s
        step.begin_pass(int(ps.phase[p]))
        rows = slice(int(ps.row_start[p]), int(ps.row_stop[p]))
        forecaster = table_forecaster(fc, p, L) if fc is not None else None
        for layer in range(L):
            if aware:
                ids, w = router.route(layer, np.asarray(logits[rows, layer], dtype=np.float32),  # type: ignore[union-attr,index]
                                      step.cached_mask(layer))
                ex, sc, br, nt = prefill_layer(ids, w, E)
                accesses = [Access(int(e), float(s), int(r), int(n)) for e, s, r, n in zip(ex, sc, br, nt, strict=True)]
            else:
                accesses = layer_accesses(ps, p, layer, future)
            probs = None
            if logits is not None:
                def probs(layer: int = layer, rows: slice = rows) -> np.ndarray:
                    z = np.asarray(logits[rows, layer], dtype=np.float64)  # type: ignore[index]
                    q = np.exp(z - z.max(axis=1, keepdims=True))
                    return (q / q.sum(axis=1, keepdims=True)).mean(axis=0)
            step.run_layer(layer, accesses, int(ptok[p]), forecaster=forecaster, probs=probs)
        if not counted[p]:
            continue
        delta = step.counters.minus(before)
        tally.counters = tally.counters.plus(delta)
        tally.collisions += cache.stats.collision_misses - coll_before
        if ps.phase[p] == PREFILL:
            tally.prefill_times.append(backend.now() - t0)
            tally.prefill_compute.append(backend.compute_s - c0)
            tally.prefill_bytes += delta.bytes_moved
        else:
            tally.decode_times.append(backend.now() - t0)
            tally.decode_compute.append(backend.compute_s - c0)
            tally.decode_bytes += delta.bytes_moved
    return result(replay, cfg, tally, counted)


def _layer_bytes(store: TraceStore | None, passes: Passes, given: float | None = None) -> np.ndarray:
    """Bytes of one expert per layer: the store's numbers, else ``given`` (``--copy-bytes``)."""
    if store is not None:
        lb = layer_expert_bytes(store.model)
        if lb is not None:
            return np.asarray(lb, dtype=np.float64)
        m = store.model
        if m.hidden_size and m.moe_intermediate_size:
            return np.full(passes.num_layers, 3.0 * m.hidden_size * m.moe_intermediate_size * bytes_per_param(m.dtype))
        if given is not None:
            return np.full(passes.num_layers, float(given))
        raise UserError(f"{store.path} records no expert size, which the timing model needs: give --copy-bytes "
                        f"(bytes of one expert) or re-import it with --expert-bytes")
    return np.full(passes.num_layers, 1.0 if given is None else float(given))


def predictor_cost(prefetcher: Prefetcher, hardware: Hardware, override_us: float | None) -> Callable[[int], float]:
    """Seconds one forecast call takes on the device for a pass of ``tokens`` tokens."""
    if override_us is not None:
        if not (override_us >= 0 and math.isfinite(override_us)):
            raise UserError(f"predictor cost must be a non-negative number of microseconds, got {override_us}")
        return lambda tokens: override_us * 1e-6
    predictor = getattr(prefetcher, "predictor", None)
    if predictor is None:  # no prefetch, or the oracle: nothing runs
        return lambda tokens: 0.0

    def cost(tokens: int) -> float:
        flops, nbytes, kernels = predictor.work(tokens)
        return hardware.kernel_time(flops, nbytes, kernels)

    return cost


class Replays:
    """The :class:`Replay` of each configuration over one store (or hand-built passes).

    What configurations share is built once: the passes per phase, the forecasts per (phase,
    prefetcher, lookahead, overfetch) and the split parts per (phase, split, seed)."""

    def __init__(self, store: TraceStore | None, passes: Passes | None = None):
        if store is None and passes is None:
            raise ValueError("give a store or passes")
        self.store = store
        self._passes: dict[str, Passes] = {} if passes is None else {"*": passes}
        self._forecasts: dict[tuple, tuple[Prefetcher, ExpertForecast | None]] = {}
        self._parts: dict[tuple, np.ndarray] = {}

    def passes(self, phase: str) -> Passes:
        if "*" in self._passes:
            return self._passes["*"]
        if phase not in self._passes:
            self._passes[phase] = build_passes(self.store, phase)  # type: ignore[arg-type]
        return self._passes[phase]

    def forecast(self, cfg: SimConfig) -> tuple[Prefetcher, ExpertForecast | None]:
        key = (cfg.phase, cfg.prefetch, cfg.lookahead, cfg.overfetch, cfg.percentile)
        if key not in self._forecasts:
            if cfg.prefetch != "none":
                check_lookahead(cfg.lookahead, self.passes(cfg.phase).num_layers)
            pf = make_prefetcher(cfg.prefetch, self.store, lookahead=cfg.lookahead, overfetch=cfg.overfetch,
                                 percentile=cfg.percentile)
            self._forecasts[key] = (pf, pf.forecast(self.passes(cfg.phase), self.store))
        return self._forecasts[key]

    def pass_part(self, cfg: SimConfig) -> np.ndarray | None:
        """(P,) split part of every replayed pass (that of its first row), for held-out counting."""
        if self.store is None:
            return None
        key = (cfg.phase, cfg.split, cfg.split_seed)
        if key not in self._parts:
            split = split_rows(self.store, seed=cfg.split_seed, split=cfg.split)
            row_part = np.full(self.store.num_tokens, -1, dtype=np.int8)
            for i, rows in enumerate((split.train, split.val, split.test)):
                row_part[rows] = i
            self._parts[key] = row_part[self.passes(cfg.phase).row_start]
        return self._parts[key]

    def replay(self, cfg: SimConfig) -> Replay:
        if cfg.routing not in ROUTINGS:
            raise UserError(f"unknown routing {cfg.routing!r}; valid: {', '.join(ROUTINGS)}")
        if cfg.cache not in ("global", "per-layer"):
            raise UserError(f"unknown cache layout {cfg.cache!r}; valid: global, per-layer")
        if cfg.passes not in PASS_SETS:
            raise UserError(f"unknown pass set {cfg.passes!r}; valid: {', '.join(PASS_SETS)}")

        check_admission(cfg.admission)
        miss = MissHandling(cfg.miss, cfg.drop_from_rank, cfg.substitute_tolerance, cfg.precisions)
        make_policy(cfg.policy, **cfg.policy_params)
        hw = get_hardware(cfg.hardware)
        ps = self.passes(cfg.phase)
        if ps.num_passes == 0:
            raise UserError(f"the store has no {cfg.phase} passes")
        if self.store is not None:
            slots = parse_capacity(cfg.capacity, self.store.model, cfg.cache)
            bpp = bytes_per_param(self.store.model.dtype)
        else:
            info = ModelInfo("passes", "none", ps.num_layers, ps.num_experts, ps.top_k)
            slots = parse_capacity(cfg.capacity, info, cfg.cache)
            bpp = 2.0
        if cfg.routing == "cache-aware" and (self.store is None or not self.store.has_router_logits):
            raise UserError("cache-aware routing needs router logits; this store was collected without them")
        if cfg.miss == "substitute" and (self.store is None or not self.store.has_router_logits):
            raise UserError("substitute miss handling needs router logits; this store was collected without them")
        prefetcher, fc = self.forecast(cfg)
        copy_bytes = None
        if cfg.copy_bytes is not None:
            if not (cfg.copy_bytes > 0 and math.isfinite(cfg.copy_bytes)):
                raise UserError(f"bytes per copy must be a positive number, got {cfg.copy_bytes}")
            copy_bytes = np.full(ps.num_layers, float(cfg.copy_bytes))
        shapes, link_ratio = _precision_sizes(self.store, cfg, miss)
        return Replay(self.store, ps, fc, hw, slots, _layer_bytes(self.store, ps, cfg.copy_bytes), bpp,
                      predictor_cost(prefetcher, hw, cfg.predictor_us),
                      self.pass_part(cfg) if cfg.passes != "all" else None, copy_bytes, shapes, link_ratio)


def _precision_sizes(store: TraceStore | None, cfg: SimConfig,
                     miss: MissHandling) -> tuple[Shapes | None, dict[str, float]]:
    """(the model's expert shapes, bytes a copy moves per precision as a share of native) for a lower-bit
    miss handler; full precision only otherwise. The shapes come from the store's model numbers."""
    if not miss.lower_bit:
        return None, {"native": 1.0}
    m = store.model if store is not None else None
    if m is None or not (m.hidden_size and m.moe_intermediate_size):
        raise UserError(f"{cfg.miss} sizes its low-bit copies from the model's hidden size and MoE intermediate "
                        "size, which this trace store does not record")
    shapes = moe_expert_shapes(m.hidden_size, m.moe_intermediate_size, m.dtype)
    link_shapes = with_itemsize(shapes, itemsize(cfg.copy_dtype)) if cfg.copy_dtype else shapes
    return shapes, byte_ratios(link_shapes, miss.precisions)


def simulate(replay: Replay, cfg: SimConfig) -> dict[str, Any]:
    """One configuration, on the fast kernel when it covers it (``cfg.backend``: auto|fast|reference)."""
    if cfg.backend not in ("auto", "fast", "reference"):
        raise UserError(f"unknown simulator backend {cfg.backend!r}; valid: auto, fast, reference")
    fast_ok = simulator_fast.supports(cfg)
    if cfg.backend == "fast" and not fast_ok:
        raise UserError(f"the fast simulator does not cover policy={cfg.policy} miss={cfg.miss} "
                        f"routing={cfg.routing} admission={cfg.admission}")
    if cfg.backend != "reference" and fast_ok:
        out = simulator_fast.simulate_fast(replay, cfg)
        out["backend"] = "fast"
    else:
        out = simulate_reference(replay, cfg)
        out["backend"] = "reference"
    return out


def simulate_configs(store: TraceStore | None, configs: list[SimConfig], *, passes: Passes | None = None,
                     progress: bool = False, workers: int = 1) -> list[dict[str, Any]]:
    """Run every configuration over one store (or hand-built ``passes``); one result dict each.

    ``workers`` > 1 spreads the configurations over that many processes (results in the same order,
    equal to a serial run); every configuration is still checked here first, before any runs.
    """
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    of_store = Replays(store, passes)
    replays = [of_store.replay(cfg) for cfg in configs]  # every configuration is checked before any runs
    if workers > 1 and len(configs) > 1:
        del replays, of_store  # each worker builds its own from the store's path: nothing big is pickled
        return _simulate_in_workers(store, passes, configs, min(workers, len(configs)), progress)
    it: Any = zip(replays, configs, strict=True)
    if progress:
        it = tqdm(it, total=len(configs), desc="simulating", unit="config")
    return [simulate(replay, cfg) for replay, cfg in it]


_WORKER: dict[str, Replays] = {}  # a sweep worker's own Replays (passes and forecasts, built once)


def _worker_start(store_path: str | None, passes: Passes | None) -> None:
    """Open the store by its path: its shards are memory-mapped, so all workers share the page cache."""
    _WORKER["replays"] = Replays(TraceStore(store_path) if store_path is not None else None, passes)


def _worker_simulate(cfg: SimConfig) -> dict[str, Any]:
    return simulate(_WORKER["replays"].replay(cfg), cfg)


def _simulate_in_workers(store: TraceStore | None, passes: Passes | None, configs: list[SimConfig], workers: int,
                         progress: bool) -> list[dict[str, Any]]:
    """The sweep on a process pool (spawned: no inherited numba/OpenMP threads); results in configuration order.

    Configurations the numba kernel does not cover run on the reference simulator, orders of
    magnitude slower: they are handed out first, so the workers finish together.
    """
    path = str(store.path) if store is not None else None
    slow_first = sorted(range(len(configs)),
                        key=lambda i: configs[i].backend != "reference" and simulator_fast.supports(configs[i]))
    results: list[dict[str, Any]] = [{} for _ in configs]
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_start,
                             initargs=(path, passes if store is None else None)) as pool:
        futures = {pool.submit(_worker_simulate, configs[i]): i for i in slow_first}
        try:
            for done in tqdm(as_completed(futures), total=len(configs), desc=f"simulating ({workers} workers)",
                             unit="config", disable=not progress):
                results[futures[done]] = done.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def with_overrides(cfg: SimConfig, **changes: Any) -> SimConfig:
    return replace(cfg, **changes)


