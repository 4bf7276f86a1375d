"""The per-layer step of an offloaded MoE forward pass, written once for the simulator and the engine.

Every decision that moves bytes is taken here, in this order, at each MoE layer ``l``:

1. **begin**: the layer's experts are pinned in the cache; the non-expert part of the layer runs;
   prefetches for ``l`` that have not reached the link yet and that ``l`` does not need are
   cancelled (they move no bytes and give their slot back); full-precision upgrades that have
   arrived replace their low-bit copies; the forecasts made for ``l`` are scored
   (precision/recall) and teach the :class:`~offload.admission.Calibration` what their ranks
   were worth.
2. **demand accesses in rank order** with miss handling (:mod:`offload.miss_handling`: fetch, drop,
   substitute, or a lower-bit copy: fetch-lowest-bit, fetch-priority, precision-cascade). A hit on a
   prefetch still queued promotes it to a demand copy. A demand copy goes ahead of every queued
   prefetch (:mod:`offload.link`); a cascade queues the full-precision upgrade behind everything.
3. **forecast**: the predictor (on the device timeline) forecasts layers ``l+1 .. l+D``. Its
   selected experts become *predicted for this pass* in the cache (Least-Stale's current queue),
   and every policy that wants the whole ranked forecast with P(use) gets it
   (``EvictionPolicy.on_forecast``).
4. **prefetch decisions** (:mod:`offload.admission`): greedy (the paper's), or by expected value.
5. **run** the layer's experts: those whose weights are there first, then the rest in access
   order, each waiting for its copy (stall). A demand copy whose slot belongs to an expert this
   layer still has to run starts only after that expert ran. A low-bit copy is dequantized into its
   slot at its first run (the run carries it as ``unpack``; both backends charge or do that work).

Precision: every copy carries its precision and moves that precision's bytes
(``Backend.copy_bytes(layer, precision)``); the cache remembers each resident copy's precision, a
hit runs at it, and the counters count hits and computations per precision.

The step talks to the world through a :class:`Backend`: the simulator's virtual clock and link
(:class:`offload.simulator.SimBackend`) or the engine's real device, copier and wall clock
(:class:`offload.engine.engine.EngineBackend`). So the simulator and the engine take the same
decisions by construction; only the clock differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from offload.admission import Calibration, RunningRate, check_admission, prefetch_value
from offload.cache import ExpertCache
from offload.counters import Counters
from offload.link import DEMAND, PREFETCH, UPGRADE, Link
from offload.miss_handling import MissHandling, importance
from offload.policies.base import Key

#: candidates below this P(use) are not worth the arithmetic of an admission decision
MIN_P_USE = 0.02


@dataclass(frozen=True)
class Access:
    """One demand access of a layer (decode: one of the token's top-k; prefill: one distinct expert)."""

    expert: int
    score: float = 1.0  # router weight (summed over the pass's tokens)
    best_rank: int = 0  # best rank any token gave it (drop miss handling)
    tokens: int = 1  # tokens routed to it (compute time)
    hint: Any = None  # next-use index, for policies that see the future (Belady; simulator only)


@dataclass(frozen=True)
class Candidates:
    """A forecast made at one layer for layer ``target`` = layer + ``distance``, best first."""

    distance: int
    target: int
    experts: np.ndarray  # ranked candidates (the first ``selected`` are the selection rule's picks)
    selected: int
    probs: np.ndarray | None = None  # P(use) when known (the oracle); None: calibrated by rank


@dataclass
class Run:
    """One expert computation: the tokens that chose ``expert`` run ``run_as`` from ``slot``."""

    layer: int
    expert: int
    run_as: int
    slot: int
    tokens: int
    copy: Any = None  # the copy to wait for, if any
    blocked_by: Key | None = None  # the copy starts after this expert of the layer has run
    precision: str = "native"  # what it runs at (a missed expert: the precision it is fetched at)
    unpack: Any = None  # a low-bit copy to dequantize into the slot before it runs (its first run)


class Backend(Protocol):
    """What the step needs from the machine it runs on."""

    link: Link

    def now(self) -> float: ...

    def begin_layer(self, layer: int, tokens: int) -> None:
        """The non-expert part of ``layer`` (attention, norms, router) ran or runs now."""

    def charge_forecast(self, started: float) -> float:
        """The forecast that began at ``started`` is over: put its cost on the timeline; returns it."""

    def layer_estimate(self, layer: int, tokens: int, experts: int) -> tuple[float, float]:
        """Expected (non-expert, expert) compute seconds of ``layer`` (prefetch admission)."""

    def copy_bytes(self, layer: int, precision: str = "native") -> float:
        """Bytes one copy of an expert of ``layer`` at ``precision`` moves over the link."""

    def upgrade(self, copy: Any, slot: int) -> None:
        """An upgrade (full-precision copy) has arrived: make it the weights of ``slot``."""

    def arrived(self, copy: Any) -> bool: ...

    def wait(self, copy: Any) -> float:
        """Block until ``copy`` is usable; returns the seconds waited."""

    def run(self, run: Run) -> None:
        """Compute one expert (the simulator advances its clock)."""


Forecaster = Callable[[int], Sequence[Candidates]]


@dataclass
class _Made:
    """A forecast made in this pass: what it listed, with the P(use) the step gave each (and the rest)."""

    distance: int
    experts: np.ndarray
    selected: int
    phase: int
    p_use: np.ndarray
    rest: float


class LayerStep:
    """Drives one :class:`~offload.cache.ExpertCache` through passes and layers (see the module doc)."""

    def __init__(self, cache: ExpertCache, backend: Backend, *, miss: MissHandling | None = None,
                 admission: str = "greedy", lookahead: int = 1, depth: int | None = None,
                 protect_layer: bool = True, prefetch_hint: Callable[[Key], Any] | None = None,
                 record_events: bool = False):
        self.cache = cache
        self.backend = backend
        self.miss = miss or MissHandling()
        self.admission = check_admission(admission)
        self.protect_layer = protect_layer
        self.prefetch_hint = prefetch_hint
        self.num_layers, self.num_experts = cache.num_layers, cache.num_experts
        self.lookahead = max(1, lookahead)
        self.calibration = Calibration(self.lookahead, depth or self.num_experts)
        self.counters = Counters()
        #: per demand access (pass index, key, hit, evicted key or None, collision miss), when recorded
        self.events: list[tuple[int, Key, bool, Key | None, bool]] | None = [] if record_events else None
        self.p_demand = RunningRate(0.5)  # P(a layer has at least one demand miss)
        self.victim_reuse = RunningRate(0.5)  # P(an evicted expert is needed at its next opportunity)
        self.phase = 1
        self._layer_missed = False
        self._layer_clock = 0  # layers run so far (all passes): measures "next opportunity"
        self._copies: dict[Key, Any] = {}  # copies not yet waited for, by key
        self._prefetched: set[Key] = set()  # resident by prefetch, not used yet
        self._evicted_at: dict[Key, int] = {}
        self._made: dict[int, list[_Made]] = {}
        self._pending: dict[Key, int] = {}
        self._blocked: dict[Key, list[Run]] = {}
        self._substitutes: set[Key] = set()
        self._upgrades: dict[Key, Any] = {}  # cascade: full-precision copies not applied yet, in submission order
        self._unpack: dict[Key, Any] = {}  # low-bit copies of this layer, dequantized at their first run

    # ------------------------------------------------------------------ passes
    def begin_pass(self, phase: int) -> None:
        self.phase = int(phase)
        self.counters.passes += 1
        self._made = {}
        self.cache.begin_pass(self.phase)

    def cached_mask(self, layer: int) -> np.ndarray:
        """(E,) bool: experts of ``layer`` resident now (cache-aware routing reads it)."""
        mask = np.zeros(self.num_experts, dtype=bool)
        for key in self.cache.resident():
            if key[0] == layer:
                mask[key[1]] = True
        return mask

    # ------------------------------------------------------------------ one layer
    def run_layer(self, layer: int, accesses: Sequence[Access], tokens: int, *,
                  forecaster: Forecaster | None = None,
                  probs: Callable[[], np.ndarray] | None = None) -> list[Run]:
        """Everything of one MoE layer (module doc); returns the runs in the order they were computed.

        ``probs``: the layer's router probabilities (E,), averaged over the pass's tokens, asked for
        only when substitution needs them.
        """
        be, cache = self.backend, self.cache
        needed = [(layer, a.expert) for a in accesses]
        cache.begin_layer(layer, needed if self.protect_layer else ())
        be.begin_layer(layer, tokens)
        self._layer_clock += 1
        now = be.now()
        used = np.zeros(self.num_experts, dtype=bool)
        used[[a.expert for a in accesses]] = True
        self._settle_prefetches(layer, used, now)
        self._apply_upgrades()
        self._learn(layer, used)
        self._pending, self._blocked, self._substitutes = {}, {}, set()
        runs: list[Run] = []
        router_probs: np.ndarray | None = None
        self._layer_missed = False
        for i, a in enumerate(accesses):
            key = (layer, a.expert)
            if key not in cache and self.miss.mode == "substitute" and router_probs is None and probs is not None:
                router_probs = probs()
            run = self._access(key, a, now, router_probs, needed, importance(i, len(accesses)))
            if run is not None:
                runs.append(run)
                self._pending[(layer, run.run_as)] = self._pending.get((layer, run.run_as), 0) + 1
        self.p_demand.update(self._layer_missed)
        if forecaster is not None and layer + 1 < self.num_layers:
            self._forecast(layer, forecaster, tokens, len(accesses), runs)
        return self._execute(runs)

    # ------------------------------------------------------------------ 1. begin
    def _settle_prefetches(self, layer: int, used: np.ndarray, now: float) -> None:
        """Queued prefetches for ``layer`` that it does not use are dropped before moving a byte."""
        link = self.backend.link
        for key in [k for k in self._copies if k[0] == layer]:
            if used[key[1]] or key not in self._prefetched:
                continue
            copy = self._copies[key]
            if link.cancel(copy, now):
                del self._copies[key]
                self._prefetched.discard(key)
                self.cache.evict(key, cancelled=True)
                self._unbook(key, copy)

    def _apply_upgrades(self) -> None:
        """Cascade: every full-precision copy that has arrived replaces its low-bit copy (once: it is
        then forgotten); those still queued or on the link wait for a later layer."""
        for key, copy in list(self._upgrades.items()):
            if not self.backend.arrived(copy):
                continue
            del self._upgrades[key]
            slot = self.cache.slot_of(key)
            assert slot is not None, "an upgrade outlived its expert"
            self.backend.upgrade(copy, slot)
            self.cache.upgrade(key, "native")
            self.counters.upgrades += 1

    def _learn(self, layer: int, used: np.ndarray) -> None:
        """Score the forecasts made for ``layer`` in this pass and calibrate their ranks."""
        c = self.counters
        for m in self._made.pop(layer, []):
            picked = m.experts[: m.selected]
            c.forecast_predicted += len(picked)
            c.forecast_correct += int(used[picked].sum())
            c.forecast_relevant += int(used.sum())
            self.calibration.observe(m.phase, m.distance, m.experts, used)

    # ------------------------------------------------------------------ 2. demand accesses
    def _access(self, key: Key, a: Access, now: float, router_probs: np.ndarray | None,
                needed: list[Key], rank_share: float) -> Run | None:
        run = self._access_inner(key, a, now, router_probs, needed, rank_share)
        if self.events is not None:
            r = self._last
            self.events.append((self.cache.pass_index, key, r.hit, r.evicted, r.collision))
        return run

    def _access_inner(self, key: Key, a: Access, now: float, router_probs: np.ndarray | None,
                      needed: list[Key], rank_share: float) -> Run | None:
        c, cache, link = self.counters, self.cache, self.backend.link
        layer = key[0]
        c.accesses += 1
        if key in cache:
            r = self._last = cache.access(key, a.score, hint=a.hint)
            c.hits += 1
            c.hit_at(r.precision)
            c.served_at(r.precision)
            if key in self._prefetched:
                self._prefetched.discard(key)
                c.prefetch_used += 1
                c.prefetch_used_bytes += self.backend.copy_bytes(layer)
            copy = self._copies.get(key)
            if copy is not None and not self.backend.arrived(copy):
                c.late_prefetch += 1
                link.promote(copy, now)
            return Run(layer, a.expert, a.expert, r.slot, a.tokens, copy, precision=r.precision)
        self._layer_missed = True
        c.misses += 1
        self._note_reuse(key)
        if self.miss.drops(a.best_rank):
            r = self._last = cache.access(key, a.score, fetch=False, hint=a.hint)
            c.collision_misses += int(r.collision)
            c.dropped += 1
            return None
        if router_probs is not None:
            taken = set(needed)
            candidates = [k[1] for k in cache.resident() if k[0] == layer and k not in taken]
            sub = self.miss.substitute(a.expert, router_probs, candidates)
            if sub is not None:
                r = self._last = cache.access(key, a.score, fetch=False, hint=a.hint)
                c.collision_misses += int(r.collision)
                cache.use((layer, sub), a.score)
                self._substitutes.add((layer, sub))
                c.substituted += 1
                slot = cache.slot_of((layer, sub))
                assert slot is not None
                served = cache.precision_of((layer, sub))
                c.served_at(served)
                return Run(layer, a.expert, sub, slot, a.tokens, self._copies.get((layer, sub)), precision=served)
        precision = self.miss.precision(rank_share)
        r = self._last = cache.access(key, a.score, hint=a.hint, protected=self._substitutes, precision=precision)
        c.collision_misses += int(r.collision)
        c.served_at(precision)
        run = Run(layer, a.expert, a.expert, r.slot, a.tokens, precision=precision)
        blocked = r.evicted is not None and self._on_evicted(r.evicted, now)
        c.demand_bytes += self.backend.copy_bytes(layer, precision)
        if blocked:
            run.blocked_by = r.evicted
            self._blocked.setdefault(r.evicted, []).append(run)  # type: ignore[arg-type]
        else:
            self._submit_demand(run, now)
        return run

    def _submit(self, key: Key, slot: int, nbytes: float, priority: int, now: float,
                precision: str = "native") -> Any:
        copy = self.backend.link.submit(key, nbytes, priority, now, slot=slot, precision=precision)
        self._copies[key] = copy
        return copy

    def _submit_demand(self, run: Run, now: float) -> None:
        """The demand copy of a missed expert at its precision; a low-bit one is dequantized at its run,
        and under the cascade its full-precision upgrade queues behind every other copy."""
        key, be = (run.layer, run.expert), self.backend
        run.copy = self._submit(key, run.slot, be.copy_bytes(run.layer, run.precision), DEMAND, now, run.precision)
        if run.precision == "native":
            return
        self._unpack[key] = run.copy
        # an expert evicted while its copy waited for its slot runs once from it and is gone: no upgrade
        if self.miss.upgrades and self.cache.slot_of(key) == run.slot:
            nbytes = be.copy_bytes(run.layer, "native")
            self._upgrades[key] = be.link.submit(key, nbytes, UPGRADE, now, slot=run.slot, precision="native")
            self.counters.upgrades_issued += 1
            self.counters.upgrade_bytes += nbytes

    def _on_evicted(self, key: Key, now: float) -> bool:
        """Book-keeping for an evicted key; True when this layer still has to run it (its slot is
        then refilled only after that run)."""
        self.counters.evictions += 1
        self._evicted_at[key] = self._layer_clock
        self.victim_reuse.update(False)  # corrected by _note_reuse if it is needed again in time
        copy = self._copies.pop(key, None)
        if key in self._prefetched:
            self._prefetched.discard(key)
        upgrade = self._upgrades.pop(key, None)
        if upgrade is not None and self.backend.link.cancel(upgrade, now):
            self._unbook(key, upgrade)  # it never reached the link; one already on it is wasted
        if key in self._pending:
            if copy is not None:
                self._copies[key] = copy  # its run still waits on it
            return True
        if copy is not None and self.backend.link.cancel(copy, now):
            # it never reached the link: no bytes moved
            self._unbook(key, copy)
        return False

    def _unbook(self, key: Key, copy: Any) -> None:
        nbytes = getattr(copy, "nbytes", self.backend.copy_bytes(key[0]))
        priority = getattr(copy, "priority", PREFETCH)
        if priority == DEMAND:
            self.counters.demand_bytes -= nbytes
        elif priority == UPGRADE:
            self.counters.upgrade_bytes -= nbytes
            self.counters.upgrades_cancelled += 1
        else:
            self.counters.prefetch_bytes -= nbytes
            self.counters.prefetch_cancelled += 1

    def _note_reuse(self, key: Key) -> None:
        at = self._evicted_at.pop(key, None)
        if at is not None and self._layer_clock - at <= self.num_layers:
            # the eviction was recorded as "not needed again"; it was, at its next opportunity
            self.victim_reuse.value += self.victim_reuse.weight

    # ------------------------------------------------------------------ 3 + 4. forecast and prefetch
    def _forecast(self, layer: int, forecaster: Forecaster, tokens: int, n_access: int, runs: list[Run]) -> None:
        be, cache, c = self.backend, self.cache, self.counters
        started = be.now()
        made = forecaster(layer)
        c.predictor_s += be.charge_forecast(started)
        c.predictor_calls += 1
        plans: list[tuple[Candidates, np.ndarray]] = []
        for cand in sorted(made, key=lambda x: x.distance):
            if cand.target >= self.num_layers:
                continue
            if cand.probs is not None:
                p_use, rest = np.asarray(cand.probs, dtype=np.float64), 0.0
            else:
                p_use = self.calibration.probs(self.phase, cand.distance, len(cand.experts))
                rest = self.calibration.rest(self.phase, cand.distance)
            self._made.setdefault(cand.target, []).append(_Made(cand.distance, cand.experts, cand.selected,
                                                                 self.phase, p_use, rest))
            cache.mark_predicted([(cand.target, int(e)) for e in cand.experts[: cand.selected]])
            cache.forecast(cand.target, cand.experts, p_use, rest)
            plans.append((cand, p_use))
        now = be.now()
        if self.admission == "greedy":
            for cand, _ in plans:
                for e in cand.experts[: cand.selected]:
                    self._prefetch((cand.target, int(e)), now, victim=None)
            return
        self._admit_by_value(layer, plans, now, tokens, n_access, runs)

    def _prefetch(self, key: Key, now: float, victim: Key | None, *, chosen: bool = False) -> bool:
        """Insert ``key`` as a prefetch (evicting ``victim`` when ``chosen``, else the policy's pick)."""
        cache = self.cache
        if key in cache:
            return False
        hint = self.prefetch_hint(key) if self.prefetch_hint is not None else None
        ins = cache.insert(key, prefetch=True, hint=hint, protected=self._running(),
                           victim=victim if chosen else None)
        if ins is None:
            return False  # the policy will not evict for a guess
        if ins.evicted is not None:
            blocked = self._on_evicted(ins.evicted, now)
            assert not blocked, "a prefetch evicted an expert the running layer still needs"
        nbytes = self.backend.copy_bytes(key[0])
        self.counters.prefetch_issued += 1
        self.counters.prefetch_bytes += nbytes
        self._prefetched.add(key)
        self._submit(key, ins.slot, nbytes, PREFETCH, now)
        return True

    def _running(self) -> set[Key]:
        """Keys a prefetch may not evict: what the running layer still has to compute (and its
        substitutes), whether or not the cache pins them."""
        return self._substitutes | set(self._pending)

    def _layer_starts(self, layer: int, now: float, tokens: int, n_access: int, runs: list[Run]) -> np.ndarray:
        """Expected start times of layers ``layer+1 ..`` (demand stalls of later layers delay them as
        much as they delay a queued prefetch, so both sides of the in-time test leave them out)."""
        be, link = self.backend, self.backend.link
        ready = now
        for run in runs:
            if run.copy is not None:
                ready = max(ready, link.eta(run.copy, now))
        _, expert_s = be.layer_estimate(layer, tokens, n_access)
        t = ready + expert_s
        starts = np.full(self.num_layers, np.inf)
        experts = n_access  # the running layer's count stands in for the layers ahead
        for j in range(layer + 1, min(self.num_layers, layer + self.lookahead + 1)):
            non_expert, expert_s = be.layer_estimate(j, tokens, experts)
            t += non_expert
            starts[j] = t
            t += expert_s
        return starts

    def _admit_by_value(self, layer: int, plans: list[tuple[Candidates, np.ndarray]], now: float, tokens: int,
                        n_access: int, runs: list[Run]) -> None:
        cache, link, c = self.cache, self.backend.link, self.counters
        starts = self._layer_starts(layer, now, tokens, n_access, runs)
        # only this loop adds to the link until the layer runs: ask for its backlog once, then keep count
        free = link.free_at(now)
        for cand, p_use in plans:
            t_layer = starts[cand.target]
            copy_s = link.copy_seconds(self.backend.copy_bytes(cand.target))
            between = [float(s) for s in starts[layer + 1: cand.target]]
            for r, e in enumerate(cand.experts):
                key = (cand.target, int(e))
                if key in cache:
                    continue
                q = float(p_use[r])
                if q < MIN_P_USE:
                    break
                start = max(free, now)
                if start + copy_s > t_layer:
                    c.prefetch_late_refused += 1
                    break  # later candidates would queue behind this one: none is in time either
                c.prefetch_considered += 1
                victim = cache.choose_victim(cand.target, prefetch=True, protected=self._running()) \
                    if cache.full_for(cand.target) else None
                if victim is False:
                    break  # the policy will not evict for a guess
                if victim is None:
                    p_before = p_later = 0.0
                    victim_copy_s = 0.0
                else:
                    p_before, p_later = self._victim_odds(victim, layer, cand.target)
                    # what a miss on the victim would copy again (a lower-bit mode: its low-bit copy)
                    victim_copy_s = link.copy_seconds(self.backend.copy_bytes(victim[0], self.miss.precision()))
                value = prefetch_value(p_use=q, copy_s=copy_s, victim_copy_s=victim_copy_s,
                                       p_victim_before=p_before, p_victim_later=p_later, start=start,
                                       demand_starts=between, p_demand=self.p_demand.value)
                if value.admit and self._prefetch(key, now, victim, chosen=True):
                    free = start + copy_s

    def _victim_odds(self, victim: Key, layer: int, target: int) -> tuple[float, float]:
        """(P(victim needed before ``target`` runs), P(needed at its next opportunity after that))."""
        p_later = self.cache.reuse_probability(victim)
        if p_later is None:
            p_later = self.victim_reuse.value
        v_layer = victim[0]
        if not layer < v_layer <= target:
            return 0.0, p_later
        made = self._made.get(v_layer, [])
        if made:  # a forecast of this pass for the victim's layer: the nearest (latest) one knows best
            m = made[-1]
            hit = np.flatnonzero(m.experts == victim[1])
            return (float(m.p_use[hit[0]]) if len(hit) else m.rest), 0.0
        return p_later, 0.0

    # ------------------------------------------------------------------ 5. run
    def _execute(self, runs: list[Run]) -> list[Run]:
        be = self.backend
        order = [r for r in runs if r.blocked_by is None and (r.copy is None or be.arrived(r.copy))]
        first = {id(r) for r in order}
        order += [r for r in runs if id(r) not in first]
        for run in order:
            if run.copy is not None:
                self.counters.stall_s += be.wait(run.copy)
                if self._copies.get((run.layer, run.run_as)) is run.copy:
                    del self._copies[(run.layer, run.run_as)]
            run.unpack = self._unpack.pop((run.layer, run.run_as), None)
            if run.unpack is not None:
                self.counters.dequantized += 1
            be.run(run)
            key = (run.layer, run.run_as)
            self._pending[key] -= 1
            if self._pending[key] == 0:
                del self._pending[key]
                for waiting in self._blocked.pop(key, []):
                    self._submit_demand(waiting, be.now())
                    waiting.blocked_by = None
        assert not self._blocked, "a copy was left waiting for an expert that never ran"
        assert not self._unpack, "a low-bit copy was left packed: its expert never ran"
        return order
