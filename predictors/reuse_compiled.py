"""Compiled twin (numba) of the reuse forecasters' serving path, for the compiled forecast policies.

:class:`History` mirrors :class:`~predictors.reuse_features.ReuseHistory` (its online statistics and
the features a forecaster reads), :class:`Model` mirrors :class:`~predictors.reuse.CountedReuse` and
:class:`~predictors.reuse.LogisticReuse` (its online AdaGrad steps and its counted fallback during
warm-up). Training stays in :mod:`predictors.training` (``train.py``); only what a policy calls while it runs is here:
``observe``, ``learn`` and ``expected_passes`` of one layer. Nothing here imports torch.

Agreement with the Python classes, operation by operation:

- the history, the features cast to float32, the counted table and its buckets are the same IEEE
  operations in the same order, so they agree bit for bit. Where numpy evaluates a
  transcendental function on a value that is always a whole number of passes (``log_age`` and its
  bucket), the table is numpy's own output (:func:`history_state` asks ``ReuseHistory.features``),
  because numpy's SIMD ``log``/``exp`` may differ from the C library's in the last bit;
- the logistic model takes ``log`` of rates and ``exp`` of its logit through the C library and sums
  its 10 products in order, where numpy uses its SIMD functions and BLAS. Its probabilities can
  differ from the Python model's in the last bits, so a victim can differ where two forecast next
  uses are within rounding of each other (``tests/test_policy_kernels.py`` states how often).

No reference counting (see :mod:`offload.simulator_fast`): every buffer is allocated by the
``*_state`` builders.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numba as nb
import numpy as np

from predictors.reuse_features import AGE_CAP, FEATURE_NAMES, FOLLOW_SMOOTHING, HALF_LIVES, ReuseHistory

N_LOGISTIC = 10  # LogisticReuse's design: 9 features and the bias
H = len(HALF_LIVES)
AGE_MAX = int(AGE_CAP)


class History(NamedTuple):
    """``ReuseHistory``'s arrays; ``latest[l, :latest_n[l]]`` is its ``latest[l]``."""

    last: np.ndarray
    prev: np.ndarray
    prev2: np.ndarray
    ema: np.ndarray
    ema_norm: np.ndarray
    decay: np.ndarray
    last_weight: np.ndarray
    weight_sum: np.ndarray
    uses: np.ndarray
    observed: np.ndarray
    follow: np.ndarray
    follow_n: np.ndarray
    latest: np.ndarray
    latest_n: np.ndarray
    log_age: np.ndarray  # (AGE_MAX + 1,) float32: the log_age feature of an age of a whole number of passes
    age_bucket: np.ndarray  # (AGE_MAX + 1,) int64: CountedReuse's age bucket of that age
    num_layers: int


class Model(NamedTuple):
    """A ``CountedReuse`` (``logistic`` False) or a ``LogisticReuse`` with its counted fallback."""

    logistic: bool
    online: bool  # the forecaster learns while it serves (``getattr(forecaster, "online", False)``)
    counted_online: bool  # the counted table counts what it is taught
    hits: np.ndarray
    trials: np.ndarray
    table: np.ndarray
    dirty: np.ndarray  # [bool]: the table must be recomputed from the counts
    smoothing: float
    rate_edges: np.ndarray
    rate_feature: int  # the half-life index of CountedReuse's rate feature
    w: np.ndarray
    g2: np.ndarray
    seen: np.ndarray  # [labels learned]
    lr: float
    l2: float
    warmup: int
    p_min: float
    x: np.ndarray  # (E, N_LOGISTIC) scratch: one layer's design rows
    p: np.ndarray  # (E,) scratch
    y: np.ndarray  # (E,) scratch
    q: np.ndarray  # (E,) scratch: the counted table's forecast of the same rows
    gap: np.ndarray  # [running (mine - counted) log loss]: LogisticReuse.loss_gap


# ---------------------------------------------------------------------------------- builders
def history_state(num_layers: int, num_experts: int, counted_bins: Any) -> History:
    """A fresh history; ``counted_bins`` is ``predictors.reuse._bins`` (the age buckets are its own)."""
    h = ReuseHistory(num_layers, num_experts)
    ages = np.arange(AGE_MAX + 1, dtype=np.float64)
    probe = ReuseHistory(1, len(ages))
    probe.last[0] = -np.maximum(ages, 1.0)  # age = next_pass - last = max(age, 1) at next_pass 0
    feats = probe.features(0, 0)
    log_age = feats[:, 0].copy()
    age_bucket = counted_bins(feats)[0].astype(np.int64)
    latest = np.zeros((num_layers, num_experts), dtype=np.int64)
    return History(h.last, h.prev, h.prev2, h.ema, h.ema_norm, h.decay, h.last_weight, h.weight_sum, h.uses,
                   h.observed, h.follow, h.follow_n, latest, np.zeros(num_layers, dtype=np.int64), log_age, age_bucket,
                   num_layers)


def model_state(forecaster: Any, num_experts: int) -> Model:
    """The compiled state of a fresh ``CountedReuse`` or ``LogisticReuse`` (see :func:`supported`)."""
    # predictors.reuse imports torch (~1 s): only when a forecast policy runs
    from predictors.reuse import P_MIN, RATE_EDGES, RATE_FEATURE, CountedReuse, LogisticReuse

    logistic = isinstance(forecaster, LogisticReuse)
    counted: CountedReuse = forecaster.fallback if logistic else forecaster
    if logistic:
        w, g2, seen = forecaster.w.copy(), forecaster.g2.copy(), forecaster.seen
        lr, l2, warmup, gap = forecaster.lr, forecaster.l2, forecaster.warmup, forecaster.loss_gap
    else:
        w, g2, seen, lr, l2, warmup, gap = np.zeros(N_LOGISTIC), np.ones(N_LOGISTIC), 0, 0.0, 0.0, 0, 0.0

    rate_h = FEATURE_NAMES[RATE_FEATURE]
    return Model(logistic, bool(getattr(forecaster, "online", False)), bool(counted.online), counted.hits.copy(),
                 counted.trials.copy(), np.zeros_like(counted.hits), np.ones(1, dtype=np.bool_),
                 float(counted.smoothing), np.asarray(RATE_EDGES, dtype=np.float64),
                 [f"rate_h{int(x)}" for x in HALF_LIVES].index(rate_h), w, g2, np.array([seen], dtype=np.int64),
                 float(lr), float(l2), int(warmup), float(P_MIN), np.zeros((num_experts, N_LOGISTIC)),
                 np.zeros(num_experts), np.zeros(num_experts), np.zeros(num_experts),
                 np.array([gap], dtype=np.float64))


def supported(forecaster: Any) -> bool:
    """Whether this module mirrors ``forecaster`` (the counted and the logistic families)."""
    # predictors.reuse imports torch (~1 s): only when a forecast policy runs
    from predictors.reuse import CountedReuse, LogisticReuse

    if type(forecaster) is LogisticReuse:
        return len(forecaster.w) == N_LOGISTIC
    return type(forecaster) is CountedReuse


# ---------------------------------------------------------------------------------- history
@nb.njit(cache=True, _nrt=False)
def observe(h: History, layer: int, pass_index: int, experts: np.ndarray, weights: np.ndarray, n: int) -> None:
    """``ReuseHistory.observe`` of ``experts[:n]`` with router weights ``weights[:n]``."""
    first = h.observed[layer] < 0
    gap = 1 if first else pass_index - h.observed[layer]
    h.observed[layer] = pass_index
    E = h.last.shape[1]
    for j in range(H):
        d = h.decay[j] if gap == 1 else math.pow(h.decay[j], gap)  # numpy's ``x ** 1`` is x itself
        for e in range(E):
            h.ema[j, layer, e] *= d
        h.ema_norm[j, layer] = h.ema_norm[j, layer] * d + (1.0 - h.decay[j])
    if not first and gap == 1:  # consecutive opportunities: who followed whom
        for a in range(h.latest_n[layer]):
            i = h.latest[layer, a]
            for b in range(n):
                h.follow[layer, i, experts[b]] += 1.0
            h.follow_n[layer, i] += 1.0
    for b in range(n):
        h.latest[layer, b] = experts[b]
    h.latest_n[layer] = n
    for b in range(n):
        e = experts[b]
        w = min(weights[b], 1.0)
        for j in range(H):
            h.ema[j, layer, e] += 1.0 - h.decay[j]
        h.prev2[layer, e] = h.prev[layer, e]
        h.prev[layer, e] = h.last[layer, e]
        h.last[layer, e] = pass_index
        h.last_weight[layer, e] = w
        h.weight_sum[layer, e] += w
        h.uses[layer, e] += 1.0


@nb.njit(cache=True, _nrt=False)
def _age(h: History, layer: int, e: int, next_pass: int) -> int:
    """Passes from the last use to ``next_pass``, capped as the features cap it (a whole number)."""
    last = h.last[layer, e]
    if last == -np.inf:
        return AGE_MAX
    age = next_pass - last
    return int(min(max(age, 1.0), AGE_CAP))


@nb.njit(cache=True, _nrt=False)
def _rate(h: History, j: int, layer: int, e: int) -> float:
    """The bias-corrected decayed use rate at half-life ``j``, as the float32 feature."""
    return np.float32(h.ema[j, layer, e] / max(h.ema_norm[j, layer], 1e-12))


@nb.njit(cache=True, _nrt=False)
def _p_follow(h: History, layer: int, e: int) -> float:
    """``ReuseHistory.p_follow`` of one expert, as the float32 feature (rows summed in order, as
    numpy's mean over the first axis does)."""
    total = max(h.observed[layer] + 1, 1)
    base = (h.uses[layer, e] + 1.0) / (total + 2.0)
    k = h.latest_n[layer]
    if k == 0:
        return np.float32(base)
    m = FOLLOW_SMOOTHING
    s = 0.0
    for a in range(k):
        i = h.latest[layer, a]
        s += (h.follow[layer, i, e] + m * base) / (h.follow_n[layer, i] + m)
    return np.float32(s / k)


# ---------------------------------------------------------------------------------- the models
@nb.njit(cache=True, _nrt=False)
def _bucket(m: Model, h: History, layer: int, e: int, age: int) -> tuple[int, int]:
    """CountedReuse's (age bucket, rate bucket) of one expert."""
    rate = float(_rate(h, m.rate_feature, layer, e))
    edges = m.rate_edges
    r = 0
    while r + 1 < len(edges) and edges[r + 1] <= rate:
        r += 1
    return h.age_bucket[age], r


@nb.njit(cache=True, _nrt=False)
def _refresh_table(m: Model) -> None:
    """``CountedReuse.table`` into ``m.table`` (recomputed after new counts)."""
    if m.dirty[0]:
        s = m.smoothing
        prior = (m.hits.sum() + 1.0) / (m.trials.sum() + 2.0)
        for a in range(m.hits.shape[0]):
            q_age = (m.hits[a].sum() + s * prior) / (m.trials[a].sum() + s)
            for r in range(m.hits.shape[1]):
                m.table[a, r] = (m.hits[a, r] + s * q_age) / (m.trials[a, r] + s)
        m.dirty[0] = False


@nb.njit(cache=True, _nrt=False)
def _design(m: Model, h: History, layer: int, e: int, age: int, row: int) -> None:
    """``LogisticReuse.design`` of one expert into ``m.x[row]``: log_age, the four log rates,
    log p_follow, last and mean weight, never used, bias."""
    x = m.x
    x[row, 0] = float(h.log_age[age])
    for j in range(H):
        x[row, 1 + j] = math.log(float(_rate(h, j, layer, e)) + 1e-3)
    x[row, 1 + H] = math.log(float(_p_follow(h, layer, e)) + 1e-3)
    uses = h.uses[layer, e]
    x[row, 2 + H] = float(np.float32(h.last_weight[layer, e]))
    x[row, 3 + H] = float(np.float32(h.weight_sum[layer, e] / max(uses, 1.0)))
    x[row, 4 + H] = 1.0 if uses == 0 else 0.0
    x[row, 5 + H] = 1.0


@nb.njit(cache=True, _nrt=False)
def _sigmoid_row(m: Model, row: int) -> float:
    z = 0.0
    for j in range(N_LOGISTIC):
        z += m.x[row, j] * m.w[j]
    return 1.0 / (1.0 + math.exp(-z))


@nb.njit(cache=True, _nrt=False)
def expected_passes(m: Model, h: History, layer: int, next_pass: int, experts: np.ndarray, n: int,
                    out: np.ndarray) -> None:
    """``ReuseForecaster.expected_passes`` of ``experts[:n]`` of ``layer`` into ``out[:n]``."""
    # LogisticReuse.reuse_probability: the counted table while warming up, and while it has predicted
    # the recent labels better (the prequential loss gap)
    counted = not m.logistic or m.seen[0] < m.warmup or m.gap[0] > 0.0
    if counted:
        _refresh_table(m)
    for i in range(n):
        e = experts[i]
        age = _age(h, layer, e, next_pass)
        if counted:
            a, r = _bucket(m, h, layer, e, age)
            p = m.table[a, r]
        else:
            _design(m, h, layer, e, age, 0)
            p = _sigmoid_row(m, 0)
        out[i] = 1.0 / min(max(p, m.p_min), 1.0)


@nb.njit(cache=True, _nrt=False)
def learn(m: Model, h: History, layer: int, next_pass: int, used: np.ndarray, token: int) -> None:
    """What ``Forecast._finish_layers`` teaches an online forecaster when ``layer`` of pass
    ``next_pass`` ran: every expert the layer ever used, labelled by whether it used it now
    (``used[e] == token``)."""
    if not m.online:
        return
    E = h.uses.shape[1]
    n = 0
    for e in range(E):
        if h.uses[layer, e] > 0:
            n += 1
    if n == 0:
        return
    row = 0
    if m.logistic:
        _refresh_table(m)  # the table as it was before these labels: the counts below only mark it dirty
    for e in range(E):  # counted: LogisticReuse's fallback, or the CountedReuse itself
        if h.uses[layer, e] <= 0:
            continue
        y = 1.0 if used[e] == token else 0.0
        age = _age(h, layer, e, next_pass)
        a, r = _bucket(m, h, layer, e, age)
        if m.logistic:
            m.q[row] = m.table[a, r]
        if m.counted_online:
            m.hits[a, r] += y
            m.trials[a, r] += 1.0
            m.dirty[0] = True
        if m.logistic:
            _design(m, h, layer, e, age, row)
            m.y[row] = y
            row += 1
    if not m.logistic:
        return
    mine = 0.0
    theirs = 0.0
    for i in range(n):  # one AdaGrad step on the layer's rows (LogisticReuse._step)
        m.p[i] = _sigmoid_row(m, i)
        # the prequential score of both models on labels neither has learned from (LogisticReuse.learn)
        pm = min(max(m.p[i], 1e-6), 1.0 - 1e-6)
        pt = min(max(m.q[i], 1e-6), 1.0 - 1e-6)
        mine -= m.y[i] * math.log(pm) + (1.0 - m.y[i]) * math.log(1.0 - pm)
        theirs -= m.y[i] * math.log(pt) + (1.0 - m.y[i]) * math.log(1.0 - pt)
    m.gap[0] += 0.01 * (mine / n - theirs / n - m.gap[0])
    for j in range(N_LOGISTIC):
        g = 0.0
        for i in range(n):
            g += m.x[i, j] * (m.p[i] - m.y[i])
        g = g / n + m.l2 * m.w[j]
        m.g2[j] += g * g
        m.w[j] -= m.lr * g / math.sqrt(m.g2[j])
    m.seen[0] += n
