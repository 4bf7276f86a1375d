"""The trace-driven simulator: replay passes through the expert cache and report what it costs.

:func:`simulate_configs` is the entry point (``evaluate.py`` and the engine call it): it builds the
passes and forecasts once per store/phase/prefetcher and runs every configuration, through the numba
kernels of :mod:`offload.simulator_fast` where they cover the configuration and through the readable
reference loop :func:`simulate_reference` (the real :class:`~offload.cache.ExpertCache` and policy
classes) otherwise. A test asserts that both give identical counts.

Per layer (see :mod:`offload.timing`): begin the layer (its experts are protected), run the
non-expert part, do the demand accesses in rank order (misses are fetched, dropped or substituted),
mark the forecast experts of layers l+1..l+D as predicted for this pass and prefetch those not
resident, then run the experts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from data_pipeline.errors import UserError
from data_pipeline.trace_store import TraceStore
from offload.cache import ExpertCache
from offload.capacity import layer_expert_bytes, parse_capacity
from offload.hardware import Hardware, bytes_per_param, get_hardware
from offload.miss_handling import MissHandling
from offload.passes import NEVER, Passes, _prefill_layer, build_passes
from offload.policies import make_policy
from offload.prefetch import Forecast, forecast_quality, make_prefetcher
from offload.routing import ROUTINGS, CacheAwareRouter
from offload.timing import Link


@dataclass
class SimConfig:
    """One point of the policy space. ``capacity`` as given by the user (``5%``, ``0.6GB``, ``512``)."""

    policy: str = "least_stale"
    capacity: str = "5%"
    prefetch: str = "none"
    lookahead: int = 1
    overfetch: float = 1.0
    hardware: str = "a100-5gbs"
    phase: str = "both"
    cache: str = "global"
    miss: str = "fetch"
    routing: str = "standard"
    routing_lambda: float = 0.3
    drop_from_rank: int = 2
    substitute_tolerance: float = 0.05
    protect_layer: bool = True
    policy_params: dict[str, Any] = field(default_factory=dict)
    backend: str = "auto"  # auto | fast | reference

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("backend")
        return d


@dataclass
class Replay:
    """Everything a configuration's replay reads, prepared once and shared between configurations."""

    store: TraceStore | None
    passes: Passes
    forecast: Forecast | None
    hardware: Hardware
    capacity_slots: int
    layer_bytes: np.ndarray  # (L,) bytes of one expert of each layer
    bytes_per_param: float


def _next_after(sorted_keys: np.ndarray, sorted_pos: np.ndarray, key: int, pos: int) -> float:
    """Index of the first access of ``key`` at or after ``pos`` (inf when none)."""
    lo = np.searchsorted(sorted_keys, key, side="left")
    hi = np.searchsorted(sorted_keys, key, side="right")
    j = lo + np.searchsorted(sorted_pos[lo:hi], pos, side="left")
    return float(sorted_pos[j]) if j < hi else math.inf


def simulate_reference(replay: Replay, cfg: SimConfig) -> dict[str, Any]:
    """The readable replay loop over the real cache and policy classes."""
    ps, fc, hw = replay.passes, replay.forecast, replay.hardware
    L, E = ps.num_layers, ps.num_experts
    policy = make_policy(cfg.policy, **cfg.policy_params)
    cache = ExpertCache(L, E, replay.capacity_slots, policy, partition=cfg.cache)
    miss = MissHandling(cfg.miss, cfg.drop_from_rank, cfg.substitute_tolerance)
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
    keys = ps.keys()
    next_use = ps.next_use() if policy.needs_future else None
    order = np.argsort(keys, kind="stable")
    sorted_keys, sorted_pos = keys[order], order
    copy_s = replay.layer_bytes / hw.link_bytes_per_s
    link = Link()
    arrival: dict[tuple[int, int], float] = {}
    t = 0.0
    stall = 0.0
    dropped = substituted = late = 0
    prefetch_bytes = 0.0
    prefill_times: list[float] = []
    decode_times: list[float] = []
    ptok = ps.pass_tokens
    for p in range(ps.num_passes):
        cache.begin_pass(int(ps.phase[p]))
        t0 = t
        rows = slice(int(ps.row_start[p]), int(ps.row_stop[p]))
        for layer in range(L):
            a, b = int(ps.layer_ptr[p * L + layer]), int(ps.layer_ptr[p * L + layer + 1])
            if aware:
                cached = np.zeros(E, dtype=bool)
                for key in cache.resident():
                    if key[0] == layer:
                        cached[key[1]] = True
                ids, w = router.route(layer, np.asarray(logits[rows, layer], dtype=np.float32), cached)
                ex, sc, br, nt = _prefill_layer(ids, w, E)
                positions = [None] * len(ex)
            else:
                ex, sc, br, nt = ps.expert[a:b], ps.score[a:b], ps.best_rank[a:b], ps.tokens[a:b]
                positions = list(range(a, b))
            needed = [(layer, int(e)) for e in ex]
            cache.begin_layer(layer, needed if cfg.protect_layer else ())
            t += hw.layer_time(int(ptok[p]))
            probs = None
            run: list[tuple[tuple[int, int], float, int]] = []
            for j, e in enumerate(ex):
                key = (layer, int(e))
                hint = None
                if next_use is not None:
                    nu = next_use[positions[j]]
                    hint = math.inf if nu >= NEVER else float(nu)
                if key in cache:
                    cache.access(key, float(sc[j]), hint=hint)
                    ready = arrival.get(key, 0.0)
                    if ready > t:
                        late += 1
                    run.append((key, ready, int(nt[j])))
                    continue
                if miss.drops(int(br[j])):
                    cache.access(key, float(sc[j]), fetch=False)
                    dropped += 1
                    continue
                if cfg.miss == "substitute":
                    if probs is None:
                        z = np.asarray(logits[rows, layer], dtype=np.float64)
                        q = np.exp(z - z.max(axis=1, keepdims=True))
                        probs = (q / q.sum(axis=1, keepdims=True)).mean(axis=0)
                    taken = {k for k in needed}
                    cands = [k[1] for k in cache.resident() if k[0] == layer and k not in taken]
                    sub = miss.substitute(int(e), probs, cands)
                    if sub is not None:
                        cache.access(key, float(sc[j]), fetch=False)
                        cache.use((layer, sub), float(sc[j]))
                        substituted += 1
                        run.append(((layer, sub), arrival.get((layer, sub), 0.0), int(nt[j])))
                        continue
                cache.access(key, float(sc[j]), hint=hint)
                arrival[key] = link.copy(t, copy_s[layer])
                run.append((key, arrival[key], int(nt[j])))
            if fc is not None:
                nxt_pos = int(ps.layer_ptr[p * L + layer + 1])
                for d in range(1, fc.lookahead + 1):
                    target = layer + d
                    if target >= L:
                        break
                    pk = [(target, int(e)) for e in fc.entries(p, layer, d, L)]
                    cache.mark_predicted(pk)
                    for key in pk:
                        if key in cache:
                            continue
                        hint = None
                        if next_use is not None:
                            hint = _next_after(sorted_keys, sorted_pos, target * E + key[1], nxt_pos)
                        if cache.insert(key, prefetch=True, hint=hint) is not None:
                            arrival[key] = link.copy(t, copy_s[target])
                            prefetch_bytes += float(replay.layer_bytes[target])
            for key, ready, ntok in run:
                if ready > t:
                    stall += ready - t
                    t = ready
                t += hw.expert_time(float(replay.layer_bytes[key[0]]), ntok, replay.bytes_per_param)
        (prefill_times if ps.phase[p] == 0 else decode_times).append(t - t0)
    st = cache.stats
    return _result(
        replay, cfg,
        accesses=int(st.accesses.sum()), hits=int(st.hits.sum()), misses=int(st.misses.sum()),
        collision_per_layer=st.collision_misses.copy(), evictions=st.evictions,
        prefetch_issued=st.prefetch_inserted, prefetch_used=st.prefetch_used,
        prefetch_bytes=prefetch_bytes,
        dropped=dropped, substituted=substituted, late=late, stall=stall,
        prefill_times=prefill_times, decode_times=decode_times,
    )


def _result(replay: Replay, cfg: SimConfig, *, accesses: int, hits: int, misses: int,
            collision_per_layer: np.ndarray, evictions: int, prefetch_issued: int, prefetch_used: int,
            prefetch_bytes: float, dropped: int, substituted: int, late: int, stall: float,
            prefill_times: list[float], decode_times: list[float]) -> dict[str, Any]:
    collisions = int(collision_per_layer.sum())
    out: dict[str, Any] = cfg.settings()
    out.pop("policy_params")
    out.update(
        policy_params=dict(cfg.policy_params),
        capacity_slots=replay.capacity_slots,
        capacity_fraction=replay.capacity_slots / (replay.passes.num_layers * replay.passes.num_experts),
        passes=replay.passes.num_passes,
        accesses=accesses,
        hits=hits,
        misses=misses,
        hit_rate=hits / accesses if accesses else 0.0,
        collision_misses=collisions,
        collision_misses_per_layer=[int(x) for x in collision_per_layer],
        collision_rate=collisions / accesses if accesses else 0.0,
        evictions=evictions,
        dropped=dropped,
        substituted=substituted,
        prefetch_issued=prefetch_issued,
        prefetch_used=prefetch_used,
        prefetch_wasted=prefetch_issued - prefetch_used,
        prefetch_bytes=prefetch_bytes,
        late_prefetch_hits=late,
        stall_time_s=stall,
        ttft_s=float(np.mean(prefill_times)) if prefill_times else None,
        tpot_s=float(np.mean(decode_times)) if decode_times else None,
        total_time_s=float(np.sum(prefill_times) + np.sum(decode_times)),
        precision=None,
        recall=None,
        hardware_profile=replay.hardware.describe(),
    )
    if replay.forecast is not None:
        out["precision"], out["recall"] = forecast_quality(replay.passes, replay.forecast)
    return out


def _layer_bytes(store: TraceStore | None, passes: Passes) -> np.ndarray:
    if store is not None:
        lb = layer_expert_bytes(store.model)
        if lb is not None:
            return np.asarray(lb, dtype=np.float64)
        m = store.model
        if m.hidden_size and m.moe_intermediate_size:
            return np.full(passes.num_layers, 3.0 * m.hidden_size * m.moe_intermediate_size * bytes_per_param(m.dtype))
        raise UserError(f"{store.path} records no expert size (expert_bytes), which the timing model needs")
    return np.full(passes.num_layers, 1.0)


class ReplayCache:
    """Builds passes/forecasts once per (phase) and (phase, prefetcher, lookahead, overfetch)."""

    def __init__(self, store: TraceStore | None, passes: Passes | None = None):
        if store is None and passes is None:
            raise ValueError("give a store or passes")
        self.store = store
        self._passes: dict[str, Passes] = {} if passes is None else {"*": passes}
        self._forecasts: dict[tuple, Forecast | None] = {}

    def passes(self, phase: str) -> Passes:
        if "*" in self._passes:
            return self._passes["*"]
        if phase not in self._passes:
            self._passes[phase] = build_passes(self.store, phase)  # type: ignore[arg-type]
        return self._passes[phase]

    def forecast(self, cfg: SimConfig) -> Forecast | None:
        key = (cfg.phase, cfg.prefetch, cfg.lookahead, cfg.overfetch)
        if key not in self._forecasts:
            pf = make_prefetcher(cfg.prefetch, self.store, lookahead=cfg.lookahead, overfetch=cfg.overfetch)
            self._forecasts[key] = pf.forecast(self.passes(cfg.phase), self.store)
        return self._forecasts[key]

    def replay(self, cfg: SimConfig) -> Replay:
        if cfg.routing not in ROUTINGS:
            raise UserError(f"unknown routing {cfg.routing!r}; valid: {', '.join(ROUTINGS)}")
        if cfg.cache not in ("global", "per-layer"):
            raise UserError(f"unknown cache layout {cfg.cache!r}; valid: global, per-layer")
        MissHandling(cfg.miss, cfg.drop_from_rank, cfg.substitute_tolerance)
        make_policy(cfg.policy, **cfg.policy_params)
        hw = get_hardware(cfg.hardware)
        ps = self.passes(cfg.phase)
        if ps.num_passes == 0:
            raise UserError(f"the store has no {cfg.phase} passes")
        if self.store is not None:
            slots = parse_capacity(cfg.capacity, self.store.model, cfg.cache)
            bpp = bytes_per_param(self.store.model.dtype)
        else:
            from data_pipeline.trace_store import ModelInfo

            info = ModelInfo("passes", "none", ps.num_layers, ps.num_experts, ps.top_k)
            slots = parse_capacity(cfg.capacity, info, cfg.cache)
            bpp = 2.0
        if cfg.routing == "cache-aware" and (self.store is None or not self.store.has_router_logits):
            raise UserError("cache-aware routing needs router logits; this store was collected without them")
        if cfg.miss == "substitute" and (self.store is None or not self.store.has_router_logits):
            raise UserError("substitute miss handling needs router logits; this store was collected without them")
        return Replay(self.store, ps, self.forecast(cfg), hw, slots, _layer_bytes(self.store, ps), bpp)


def simulate(replay: Replay, cfg: SimConfig) -> dict[str, Any]:
    """One configuration, on the fast kernels when they cover it (``cfg.backend``: auto|fast|reference)."""
    from offload import simulator_fast

    if cfg.backend not in ("auto", "fast", "reference"):
        raise UserError(f"unknown simulator backend {cfg.backend!r}; valid: auto, fast, reference")
    fast_ok = simulator_fast.supports(cfg)
    if cfg.backend == "fast" and not fast_ok:
        raise UserError(f"the fast simulator does not cover policy={cfg.policy} miss={cfg.miss} routing={cfg.routing}")
    if cfg.backend != "reference" and fast_ok:
        out = simulator_fast.simulate_fast(replay, cfg)
        out["backend"] = "fast"
    else:
        out = simulate_reference(replay, cfg)
        out["backend"] = "reference"
    return out


def simulate_configs(store: TraceStore | None, configs: list[SimConfig], *, passes: Passes | None = None,
                     progress: bool = False) -> list[dict[str, Any]]:
    """Run every configuration over one store (or hand-built ``passes``); one result dict each."""
    rc = ReplayCache(store, passes)
    out = []
    it: Any = configs
    if progress:
        from tqdm import tqdm

        it = tqdm(configs, desc="simulating", unit="config")
    for cfg in it:
        out.append(simulate(rc.replay(cfg), cfg))
    return out


def with_overrides(cfg: SimConfig, **changes: Any) -> SimConfig:
    return replace(cfg, **changes)
