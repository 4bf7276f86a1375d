"""Forecast eviction: evict the expert with the latest *forecast* next use (Belady with estimates).

Expert ``e`` of layer ``l`` can only be needed at layer ``l`` of a pass. With the execution point
at layer ``h`` of the running pass, its next use is

    d0 + L * (N - 1) layer-steps away,   d0 = l - h if l > h else l - h + L,

where ``N >= 1`` counts the passes that reach layer ``l`` until ``e`` is chosen there again. LRU
ignores ``d0``: in a decode stream that cycles through the layers it evicts exactly the experts of
the layers coming next. The policy knows ``d0``; a reuse forecaster (:mod:`predictors.reuse`)
estimates ``N`` from the per-(layer, expert) history (recency, gaps, decayed use rates, router
weights). With the true ``N`` the policy *is* Belady (see the tests).

It only uses what the cache tells every policy -- pass and layer starts, inserts, demand accesses
(with their router weight), evictions -- so it runs unchanged in the simulator and in the engine:

- at the end of each layer (the next ``on_layer_start``/``on_pass_start``) it records which experts
  the layer used into its :class:`~predictors.reuse_features.ReuseHistory` and refreshes the
  forecast of that layer's resident experts for their next opportunity (one small batch); an
  online forecaster first learns from the labels the layer just revealed; when a layer starts, its
  own row is re-forecast for the next pass (an evictable expert of the running layer is one the
  layer does not need);
- ``victim`` ranks the resident keys by forecast next use (vectorised over the resident set) and
  returns the latest one that ``eligible`` allows; ties go to the least recently touched.

Parameters:

- ``forecaster``: a :class:`~predictors.reuse.ReuseForecaster`, a path to a reuse checkpoint or to a
  ``train.py`` run folder holding one (``python train.py --families '[reuse_logistic]'``; loaded by
  :mod:`predictors.reuse`, which imports no training code), or None for the counted forecaster
  learning online from the run itself (no training data needed).
- ``predicted_reuse``: when a prefetcher/predictor marks a resident key for this pass
  (``on_predicted``) and its layer is still ahead, its probability of being used at that
  opportunity is raised to at least this value (None: ignore the marks).
- ``prefetch_may_evict``: whether a prefetch may evict at all (default True, like LRU).
- ``use_forecasts`` (default True): the lookahead forecasts of the running pass
  (``on_forecast``: P(use) of every expert of a layer still ahead) set that layer's coming
  opportunity: ``N = 1 + (1 - q) * N_history``. A key just prefetched for a layer ahead (q high) is
  then among the last to go, and an expert of a layer ahead that the forecast rules out is among
  the first.

Compiled twin (below the classes): the same bookkeeping on arrays, with the forecaster's serving
math from :mod:`predictors.reuse_compiled` (the counted and the online logistic families; a
checkpoint of another family replays in Python). Per layer it costs what the Python policy's costs
in arithmetic -- features and one AdaGrad step over every expert the layer ever used -- without the
interpreter; a victim is a scan of the resident keys.
"""

from __future__ import annotations

import copy
import os
from typing import Any, NamedTuple

import numba as nb
import numpy as np

from core.errors import UserError
from offload.policies.base import Eligible, EvictionPolicy, Key
from offload.policies.compiled import Allowed, KernelContext, PolicyKernel, allowed, hook
from predictors.reuse_compiled import (
    History,
    Model,
    expected_passes,
    history_state,
    learn,
    model_state,
    observe,
    supported,
)
from predictors.reuse_features import ReuseHistory


class Forecast(EvictionPolicy):
    name = "forecast"

    def __init__(self, forecaster: Any = None, *, predicted_reuse: float | None = None,
                 prefetch_may_evict: bool = True, use_forecasts: bool = True):
        if predicted_reuse is not None and not 0.0 < predicted_reuse <= 1.0:
            raise ValueError(f"predicted_reuse must be in (0, 1], got {predicted_reuse}")
        self.forecaster_spec = forecaster
        self.predicted_reuse = predicted_reuse
        self.use_forecasts = use_forecasts
        self.prefetch_may_evict = prefetch_may_evict
        self.forecaster = None
        self._placeholder = True  # the base constructor binds a 1 x 1 placeholder before the cache does
        super().__init__()

    # ------------------------------------------------------------------ lifecycle
    def _make_forecaster(self, num_layers: int, num_experts: int):
        # predictors.reuse imports torch (~1 s): only when a forecast policy binds
        from predictors.reuse import ReuseForecaster, default_forecaster, load_reuse_forecaster

        spec = self.forecaster_spec
        if spec is None:
            return default_forecaster(num_layers, num_experts, 1)
        if isinstance(spec, (str, os.PathLike)):
            spec = load_reuse_forecaster(spec)
            self.forecaster_spec = spec
        if not isinstance(spec, ReuseForecaster):
            raise TypeError(f"forecaster must be a ReuseForecaster, a checkpoint path or None, got {type(spec)}")
        if (spec.num_layers, spec.num_experts) != (num_layers, num_experts):
            raise UserError(f"the reuse forecaster was trained for {spec.num_layers} layers x {spec.num_experts} "
                            f"experts, the cache holds {num_layers} x {num_experts}")
        return copy.deepcopy(spec)  # an online forecaster learns during a run: every bind starts afresh

    def bind(self, num_layers: int, num_experts: int) -> None:
        super().bind(num_layers, num_experts)
        placeholder, self._placeholder = self._placeholder, False
        if not placeholder:
            self.forecaster = self._make_forecaster(num_layers, num_experts)
        shape = (num_layers, num_experts)
        self.history = ReuseHistory(num_layers, num_experts)
        self.resident_mask = np.zeros(shape, dtype=bool)
        self.touch_clock = np.zeros(shape, dtype=np.int64)
        self.touch_pass = np.full(shape, -1, dtype=np.int64)
        self.predicted = np.zeros(shape, dtype=bool)
        # P(used in the running pass) of layers a lookahead forecast covered in this pass (nan: none)
        self.this_pass = np.full(shape, np.nan)
        self.pending: list[dict[int, float]] = [{} for _ in range(num_layers)]
        self.done_layers = 0  # layers of the running pass already folded into the history
        self.expected = np.ones(shape)  # forecast N per (layer, expert) for its next opportunity
        if not placeholder:
            for layer in range(num_layers):
                self.expected[layer] = self.forecaster.expected_passes(self.history, layer, 0)

    # ------------------------------------------------------------------ hooks
    def on_pass_start(self, pass_index: int, phase: int) -> None:
        if self.pass_index >= 0:
            self._finish_layers(self.num_layers)
        super().on_pass_start(pass_index, phase)
        self.done_layers = 0
        self.predicted[:] = False
        self.this_pass[:] = np.nan

    def on_layer_start(self, layer: int) -> None:
        self._finish_layers(layer)
        super().on_layer_start(layer)
        # A resident expert of the running layer that may be evicted is not needed by it (the cache
        # pins the needed ones), so its next opportunity is the next pass: re-forecast the resident
        # ones for pass p+1 from the history as it stands (their age already counts this pass as a
        # miss). Only residents: the others get a fresh forecast when the layer ends.
        self._reforecast(layer, np.flatnonzero(self.resident_mask[layer]), max(self.pass_index, 0) + 1)

    def _reforecast(self, layer: int, experts: np.ndarray, next_pass: int) -> None:
        """Refresh the forecast of ``experts`` of ``layer`` for the opportunity ``next_pass``.

        Only resident experts are ever ranked, so only they are forecast (a few per layer instead
        of E); a key that becomes resident by prefetch is forecast on insert, one that becomes
        resident by a demand miss is pinned until its layer ends and forecast then.
        """
        if len(experts):
            self.expected[layer, experts] = self.forecaster.expected_passes(self.history, layer, next_pass, experts)

    def on_insert(self, key: Key, *, prefetch: bool, hint: Any = None) -> None:
        super().on_insert(key, prefetch=prefetch, hint=hint)
        self.resident_mask[key] = True
        if prefetch:
            p = max(self.pass_index, 0)
            self._reforecast(key[0], np.array([key[1]]), p if key[0] > self.layer else p + 1)

    def on_access(self, key: Key, *, score: float = 0.0, hint: Any = None) -> None:
        super().on_access(key, score=score, hint=hint)
        used = self.pending[key[0]]
        used[key[1]] = used.get(key[1], 0.0) + float(score)

    def on_predicted(self, key: Key) -> None:
        self.predicted[key] = True
        self.touch_pass[key] = self.pass_index

    def on_forecast(self, layer: int, experts: Any, p_use: Any, rest: float) -> None:
        if not self.use_forecasts or layer <= self.layer:
            return
        row = np.full(self.num_experts, float(rest))
        row[np.asarray(experts, dtype=np.int64)] = np.asarray(p_use, dtype=np.float64)
        # several distances forecast one layer: the latest (nearest) forecast is the best informed
        self.this_pass[layer] = row

    def reuse_probability(self, key: Key) -> float | None:
        return float(min(1.0, 1.0 / max(self.expected[key], 1.0)))

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        self.resident_mask[key] = False

    def _touch(self, key: Key) -> None:
        super()._touch(key)
        self.touch_clock[key] = self.clock
        self.touch_pass[key] = self.pass_index

    def _finish_layers(self, upto: int) -> None:
        """Fold layers ``done_layers .. upto-1`` of the running pass into the history and re-forecast them."""
        p = max(self.pass_index, 0)
        for layer in range(self.done_layers, upto):
            used = self.pending[layer]
            experts = np.fromiter(used.keys(), dtype=np.int64, count=len(used))
            weights = np.fromiter(used.values(), dtype=np.float64, count=len(used))
            if getattr(self.forecaster, "online", False):
                seen = np.flatnonzero(self.history.uses[layer] > 0)
                if len(seen):
                    label = np.zeros(self.num_experts, dtype=bool)
                    label[experts] = True
                    self.forecaster.learn(self.history.features(layer, p)[seen], label[seen])
            self.history.observe(layer, p, experts, weights)
            self._reforecast(layer, np.flatnonzero(self.resident_mask[layer]), p + 1)
            used.clear()
        self.done_layers = max(self.done_layers, upto)

    # ------------------------------------------------------------------ forecasts
    def next_use(self, layers: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """Forecast layer-steps from the execution point to the next use of each (layer, expert)."""
        L, here = self.num_layers, self.layer
        ahead = layers > here
        d0 = np.where(ahead, layers - here, layers - here + L)
        n = self.expected[layers, experts]
        if self.use_forecasts:
            # a lookahead forecast of this pass: used at the coming opportunity with P = q, else the
            # history's expectation counted from the opportunity after it
            q = self.this_pass[layers, experts]
            n = np.where(ahead & ~np.isnan(q), 1.0 + (1.0 - np.nan_to_num(q)) * n, n)
        if self.predicted_reuse is not None:
            marked = ahead & self.predicted[layers, experts]
            n = np.where(marked, np.minimum(n, 1.0 / self.predicted_reuse), n)
        return d0 + L * (n - 1.0)

    def forecast(self, key: Key) -> float:
        """Forecast layer-steps until resident ``key`` is needed again (for reports and tests)."""
        return float(self.next_use(np.array([key[0]]), np.array([key[1]]))[0])

    def _first_eligible(self, mask: np.ndarray, eligible: Eligible) -> Key | None:
        """The key of ``mask`` with the latest forecast next use that ``eligible`` allows.

        Ties go to the least recently touched. Scores are computed once over the candidates
        (vectorised); ``eligible`` is asked in score order, usually once (only the running layer's
        needed experts are refused).
        """
        flat = np.flatnonzero(mask.ravel())
        if len(flat) == 0:
            return None
        layers, experts = np.divmod(flat, self.num_experts)
        score = self.next_use(layers, experts)
        stamps = self.touch_clock[layers, experts]
        for _ in range(len(flat)):
            best = np.flatnonzero(score == score.max())
            i = int(best[np.argmin(stamps[best])]) if len(best) > 1 else int(best[0])
            if score[i] == -np.inf:
                return None
            key = (int(layers[i]), int(experts[i]))
            if eligible(key):
                return key
            score[i] = -np.inf
        return None

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        if for_prefetch and not self.prefetch_may_evict:
            return None
        return self._first_eligible(self.resident_mask, eligible)

    def describe(self) -> dict[str, Any]:
        f = self.forecaster
        return {"policy": self.name, "forecaster": getattr(f, "family", None),
                **({} if f is None else f.hparams()), "predicted_reuse": self.predicted_reuse,
                "prefetch_may_evict": self.prefetch_may_evict, "use_forecasts": self.use_forecasts}


    def kernel_supported(self) -> bool:
        spec = self.forecaster_spec
        if spec is None:
            return True  # the default, LogisticReuse learning online
        if isinstance(spec, (str, os.PathLike)):
            # predictors.reuse imports torch (~1 s): only for a checkpoint path
            from predictors.reuse import load_reuse_forecaster

            spec = self.forecaster_spec = load_reuse_forecaster(spec)
        return supported(spec)

    def kernel_state(self, ctx: KernelContext) -> ForecastState:
        # predictors.reuse imports torch (~1 s): only when the policy runs compiled
        from predictors.reuse import _bins

        self.bind(ctx.num_layers, ctx.num_experts)  # a fresh forecaster and its first forecasts, as a cache binds
        L, E, N = ctx.num_layers, ctx.num_experts, ctx.num_keys
        i64 = np.int64
        return ForecastState(
            hist=history_state(L, E, _bins), model=model_state(self.forecaster, E),
            expected=self.expected.reshape(-1).copy(), this_pass=np.zeros(N), fc_pass=np.full(L, -2, dtype=i64),
            pred_pass=np.full(N, -2, dtype=i64), touch_clock=np.zeros(N, dtype=i64), touch_pass=np.full(N, -1, dtype=i64),
            members=np.zeros(N, dtype=i64), slot=np.full(N, -1, dtype=i64),
            key_layer=np.arange(N, dtype=i64) // E, pending_e=np.zeros((L, E), dtype=i64),
            pending_w=np.zeros((L, E)), pending_n=np.zeros(L, dtype=i64), label=np.zeros(E, dtype=i64),
            scratch_e=np.zeros(E, dtype=i64), scratch_n=np.zeros(E), pos=np.array([-1, 0, 1, 0, 0, 0], dtype=i64),
            num_layers=L, num_experts=E,
            predicted_reuse=-1.0 if self.predicted_reuse is None else float(self.predicted_reuse),
            use_forecasts=self.use_forecasts, prefetch_may_evict=self.prefetch_may_evict, least_stale=False,
            left_first=False, prefetch_evicts_current=True, per_layer=ctx.per_layer)


class LeastStaleForecast(Forecast):
    """Least-Stale whose queues are ordered by forecast next use instead of layer position.

    Stale experts (last touched or forecast in an earlier pass) go first, the one with the latest
    forecast next use first; current experts only when no stale one may go, again by forecast, and
    never for a prefetch unless ``prefetch_evicts_current`` (as in :mod:`least_stale`).
    """

    name = "least_stale_forecast"

    def __init__(self, forecaster: Any = None, *, predicted_reuse: float | None = None,
                 prefetch_evicts_current: bool = False, left_first: bool = False, use_forecasts: bool = True):
        self.prefetch_evicts_current = prefetch_evicts_current
        self.left_first = left_first
        super().__init__(forecaster, predicted_reuse=predicted_reuse, use_forecasts=use_forecasts)

    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        stale = self.resident_mask & (self.touch_pass < self.pass_index)
        current = self.resident_mask & ~stale
        if self.left_first:
            left = np.zeros_like(stale)
            left[: self.layer] = True
            queues = [stale & left, stale & ~left, current & left, current & ~left]
        else:
            queues = [stale, current]
        for i, queue in enumerate(queues):
            if i == len(queues) // 2 and for_prefetch and not self.prefetch_evicts_current:
                return None
            key = self._first_eligible(queue, eligible)
            if key is not None:
                return key
        return None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "prefetch_evicts_current": self.prefetch_evicts_current,
                "left_first": self.left_first}

    def kernel_state(self, ctx: KernelContext) -> ForecastState:
        return super().kernel_state(ctx)._replace(least_stale=True, left_first=self.left_first,
                                                  prefetch_evicts_current=self.prefetch_evicts_current)


# ---------------------------------------------------------------------------------- compiled twin
class ForecastState(NamedTuple):
    """The policies' arrays over dense keys ``k = layer * E + expert``."""

    hist: History
    model: Model
    expected: np.ndarray  # forecast N of each key for its next opportunity
    this_pass: np.ndarray  # P(used at the coming opportunity) from this pass's forecast of the key's layer
    fc_pass: np.ndarray  # (L,) the pass whose forecast ``this_pass`` holds for the layer (``this_pass`` is nan otherwise)
    pred_pass: np.ndarray  # the pass in which the key was marked (``predicted``)
    touch_clock: np.ndarray
    touch_pass: np.ndarray
    members: np.ndarray  # the resident keys are ``members[:pos[N_MEMBERS]]``, ``slot[k]`` is k's place (-1: absent)
    slot: np.ndarray
    key_layer: np.ndarray  # k // E
    pending_e: np.ndarray  # (L, E) experts used by the layer in this pass, in access order (``pending``)
    pending_w: np.ndarray  # (L, E) their summed router weights
    pending_n: np.ndarray  # (L,)
    label: np.ndarray  # (E,) scratch: experts the layer just used carry the label token
    scratch_e: np.ndarray
    scratch_n: np.ndarray
    pos: np.ndarray  # [pass index, execution point, phase, layers folded, resident keys, label token]
    num_layers: int
    num_experts: int
    predicted_reuse: float  # <= 0: None
    use_forecasts: bool
    prefetch_may_evict: bool
    least_stale: bool  # LeastStaleForecast's queues
    left_first: bool
    prefetch_evicts_current: bool
    per_layer: bool


PASS, HERE, PHASE, FOLDED, N_MEMBERS, LABEL = range(6)


@nb.njit(cache=True, _nrt=False)
def _reforecast(st: ForecastState, layer: int, next_pass: int) -> None:
    """``Forecast._reforecast`` of the resident experts of ``layer``."""
    E = st.num_experts
    n = 0
    for e in range(E):
        if st.slot[layer * E + e] >= 0:
            st.scratch_e[n] = e
            n += 1
    if n:
        expected_passes(st.model, st.hist, layer, next_pass, st.scratch_e, n, st.scratch_n)
        for i in range(n):
            st.expected[layer * E + st.scratch_e[i]] = st.scratch_n[i]


@nb.njit(cache=True, _nrt=False)
def _finish_layers(st: ForecastState, upto: int) -> None:
    """``Forecast._finish_layers``: fold layers ``FOLDED .. upto-1`` of the running pass into the history."""
    p = max(st.pos[PASS], 0)
    for layer in range(st.pos[FOLDED], upto):
        n = st.pending_n[layer]
        st.pos[LABEL] += 1
        for i in range(n):
            st.label[st.pending_e[layer, i]] = st.pos[LABEL]
        learn(st.model, st.hist, layer, p, st.label, st.pos[LABEL])
        observe(st.hist, layer, p, st.pending_e[layer], st.pending_w[layer], n)
        _reforecast(st, layer, p + 1)
        st.pending_n[layer] = 0
    st.pos[FOLDED] = max(st.pos[FOLDED], upto)


@hook
def _pass_start(st: ForecastState, pass_index: int, phase: int) -> None:
    if st.pos[PASS] >= 0:
        _finish_layers(st, st.num_layers)
    st.pos[PASS] = pass_index
    st.pos[HERE] = 0
    st.pos[PHASE] = phase
    st.pos[FOLDED] = 0


@hook
def _layer_start(st: ForecastState, layer: int) -> None:
    _finish_layers(st, layer)
    st.pos[HERE] = layer
    _reforecast(st, layer, max(st.pos[PASS], 0) + 1)


@hook
def _touch(st: ForecastState, k: int, clock: int) -> None:
    st.touch_clock[k] = clock
    st.touch_pass[k] = st.pos[PASS]


@hook
def _insert(st: ForecastState, k: int, prefetch: bool, hint: int, clock: int) -> None:
    _touch(st, k, clock)
    n = st.pos[N_MEMBERS]
    st.members[n] = k
    st.slot[k] = n
    st.pos[N_MEMBERS] = n + 1
    if prefetch:
        E = st.num_experts
        layer = st.key_layer[k]
        p = max(st.pos[PASS], 0)
        st.scratch_e[0] = k - layer * E
        expected_passes(st.model, st.hist, layer, p if layer > st.pos[HERE] else p + 1, st.scratch_e, 1,
                        st.scratch_n)
        st.expected[k] = st.scratch_n[0]


@hook
def _access(st: ForecastState, k: int, score: float, hint: int, clock: int) -> None:
    _touch(st, k, clock)
    layer = st.key_layer[k]
    e = k - layer * st.num_experts
    n = st.pending_n[layer]
    for i in range(n):
        if st.pending_e[layer, i] == e:
            st.pending_w[layer, i] += score
            return
    st.pending_e[layer, n] = e
    st.pending_w[layer, n] = score
    st.pending_n[layer] = n + 1


@hook
def _predicted(st: ForecastState, k: int, clock: int) -> None:
    st.pred_pass[k] = st.pos[PASS]
    st.touch_pass[k] = st.pos[PASS]


@hook
def _forecast(st: ForecastState, layer: int, experts: np.ndarray, p_use: np.ndarray, rest: float) -> None:
    if not st.use_forecasts or layer <= st.pos[HERE]:
        return
    base = layer * st.num_experts
    for e in range(st.num_experts):
        st.this_pass[base + e] = rest
    for i in range(len(experts)):
        st.this_pass[base + experts[i]] = p_use[i]
    st.fc_pass[layer] = st.pos[PASS]


@hook
def _evict(st: ForecastState, k: int) -> None:
    i = st.slot[k]
    last = st.members[st.pos[N_MEMBERS] - 1]
    st.members[i] = last
    st.slot[last] = i
    st.slot[k] = -1
    st.pos[N_MEMBERS] -= 1


@hook
def _next_use(st: ForecastState, k: int, layer: int, here: int, p: int) -> float:
    """``Forecast.next_use`` of one key (``here``: the execution point, ``p``: the pass)."""
    L = st.num_layers
    ahead = layer > here
    d0 = layer - here if ahead else layer - here + L
    n = st.expected[k]
    if ahead:
        if st.use_forecasts and st.fc_pass[layer] == p:
            n = 1.0 + (1.0 - st.this_pass[k]) * n
        if st.predicted_reuse > 0 and st.pred_pass[k] == p:
            n = min(n, 1.0 / st.predicted_reuse)
    return d0 + L * (n - 1.0)


@hook
def _first(st: ForecastState, el: Allowed, stale: int, left: int) -> int:
    """``Forecast._first_eligible``: the allowed key with the latest forecast next use (ties: least
    recently touched) among the resident keys, or those that are stale (``stale`` 1) or current (0),
    and left of the execution point (``left`` 1) or not (0); -1 means any."""
    here = st.pos[HERE]
    p = st.pos[PASS]
    best = -1
    best_score = 0.0
    for i in range(st.pos[N_MEMBERS]):
        k = st.members[i]
        layer = st.key_layer[k]
        if st.per_layer and layer != el.part:
            continue
        if stale >= 0 and (st.touch_pass[k] < p) != (stale == 1):
            continue
        if left >= 0 and (layer < here) != (left == 1):
            continue
        if not allowed(el, k):
            continue
        score = _next_use(st, k, layer, here, p)
        if best < 0 or score > best_score or (score == best_score and st.touch_clock[k] < st.touch_clock[best]):
            best = k
            best_score = score
    return best


@hook
def _victim(st: ForecastState, el: Allowed, for_prefetch: bool) -> int:
    if not st.least_stale:
        if for_prefetch and not st.prefetch_may_evict:
            return -1
        return _first(st, el, -1, -1)
    for current in range(2):  # LeastStaleForecast: stale experts first, then current ones
        if current and for_prefetch and not st.prefetch_evicts_current:
            return -1
        if st.left_first:
            for left in (1, 0):
                k = _first(st, el, 1 - current, left)
                if k >= 0:
                    return k
        else:
            k = _first(st, el, 1 - current, -1)
            if k >= 0:
                return k
    return -1


Forecast.kernel = PolicyKernel(victim=_victim, on_insert=_insert, on_access=_access, on_evict=_evict,
                               on_pass_start=_pass_start, on_layer_start=_layer_start, on_predicted=_predicted,
                               on_forecast=_forecast)
