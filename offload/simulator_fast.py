"""numba replay of the simulator: the same decisions as :func:`offload.simulator.simulate_reference`.

One kernel, :func:`_replay`, mirrors :class:`offload.step.LayerStep` with greedy admission, fetch or
drop miss handling and standard routing (``supports``): the demand-first link with its lazy prefetch
queue, cancellation of queued prefetches at their layer, promotion of a queued prefetch that a layer
needs, runs (arrived experts first), per-pass counters for held-out counting and the predictor's
cost on the clock. Where the step calls the eviction policy, the kernel calls the policy's compiled
hooks (:mod:`offload.policies.compiled`): each policy file declares them next to its Python class,
and :func:`specialise` compiles one kernel per declaration, with the hooks bound as the kernel's
globals (numba inlines them; a policy that ignores an event costs nothing there).

Caching: a specialised kernel is cached on disk by numba under a name that hashes the source files
it is built from (this module and every module its hooks come from, transitively), because numba
itself only watches the file of the cached function: an edited policy gets a fresh compile, never a
stale kernel. Hooks are bound as globals rather than passed as arguments or closed over, which
would key the cache on per-process dispatcher ids and miss it in every new process.

Helpers are compiled without numba's reference counting (``_nrt=False``: they never allocate);
with it every call increments and decrements each array argument atomically, which made a list
move cost ~80 ns instead of ~2 ns.
"""

from __future__ import annotations

import hashlib
import inspect
import types
from pathlib import Path
from typing import Any, NamedTuple

import numba as nb
import numpy as np
from numba.core.dispatcher import Dispatcher

from core.passes import NEVER
from offload.cache import split_capacity
from offload.counters import Counters
from offload.policies import POLICIES, make_policy
from offload.policies.base import EvictionPolicy
from offload.policies.compiled import Allowed, KernelContext, nonneg
from offload.prefetch import forecast_depth
from offload.sim_result import Tally, counted_passes, result

# indices into the int64 parameter vector
P_CAPACITY, P_PER_LAYER, P_PROTECT, P_DROP, P_DROP_FROM, P_LOOKAHEAD, P_DEPTH, P_HAS_PROB = range(8)
N_IPARAMS = 8
# indices into the float64 parameter vector (timing)
F_TFLOPS, F_HBM, F_LAYER_US, F_TOKEN_US, F_EXPERT_US, F_BPP = range(6)

# integer counters (indices into C) and float counters (indices into F)
(C_ACC, C_HIT, C_MISS, C_LATE, C_COLL, C_DROP, C_EVICT, C_PF_ISSUED, C_PF_USED, C_PF_CANCEL, C_FC_PRED,
 C_FC_CORR, C_FC_REL, C_PRED_CALLS) = range(14)
NC = 14
F_STALL, F_PRED_S, F_DEMAND_B, F_PF_B, F_PF_USED_B = range(5)
NF = 5


def supports(cfg: Any) -> bool:
    """Whether the kernel covers a configuration (else the simulator runs the reference loop). The lower-bit
    miss handlers (fetch-lowest-bit, fetch-priority, precision-cascade) stay on the reference step on
    purpose: their per-precision bytes, dequantization and upgrade queue are a second link tier that a
    port would have to keep equal to the step forever."""
    if cfg.miss not in ("fetch", "drop") or cfg.routing != "standard" or cfg.admission != "greedy":
        return False
    cls = POLICIES.get(cfg.policy)
    if cls is None or cls.kernel is None:
        return False
    return make_policy(cfg.policy, **cfg.policy_params).kernel_supported()


# ---------------------------------------------------------------------------------- the link
@nb.njit(cache=True, _nrt=False)
def _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival, copy_state):
    """The link's queue up to ``now`` (offload.link.SimLink._advance): start, in order, every queued
    prefetch the link has reached by ``now``. Returns (new head, link free time)."""
    while qh < qt:
        if not q_live[qh]:
            qh += 1
            continue
        at = q_sub[qh] if q_sub[qh] > free else free
        if at > now:
            break
        k = nonneg(q_key[qh])
        free = at + q_dur[qh]
        arrival[k] = free
        copy_state[k] = 2
        q_live[qh] = False
        qh += 1
    return qh, free


@nb.njit(cache=True, _nrt=False)
def _next_after(sorted_keys, sorted_pos, key, pos):
    lo = np.searchsorted(sorted_keys, key, side="left")
    hi = np.searchsorted(sorted_keys, key, side="right")
    j = lo + np.searchsorted(sorted_pos[lo:hi], pos, side="left")
    if j < hi:
        return sorted_pos[j]
    return NEVER


@nb.njit(cache=True, _nrt=False)
def _expert_time(nbytes, ntok, fp):
    flops = 2.0 * (nbytes / fp[F_BPP]) * ntok
    a = flops / (fp[F_TFLOPS] * 1e12)
    b = nbytes / (fp[F_HBM] * 1e9)
    return (a if a > b else b) + fp[F_EXPERT_US] * 1e-6


# ---------------------------------------------------------------------------------- ignored events
@nb.njit(cache=True, _nrt=False)
def _ignore_pass_start(st, pass_index, phase):
    return None


@nb.njit(cache=True, _nrt=False)
def _ignore_layer_start(st, layer):
    return None


@nb.njit(cache=True, _nrt=False)
def _ignore_key(st, k, prefetch_or_score, hint, clock):
    return None


@nb.njit(cache=True, _nrt=False)
def _ignore_evict(st, k):
    return None


@nb.njit(cache=True, _nrt=False)
def _ignore_predicted(st, k, clock):
    return None


@nb.njit(cache=True, _nrt=False)
def _ignore_forecast(st, layer, experts, p_use, rest):
    return None


_IGNORE = {"on_pass_start": _ignore_pass_start, "on_layer_start": _ignore_layer_start, "on_insert": _ignore_key,
           "on_access": _ignore_key, "on_evict": _ignore_evict, "on_predicted": _ignore_predicted,
           "on_forecast": _ignore_forecast}

# The policy's hooks and flags: placeholders, bound per policy by ``specialise`` (compile-time constants).
policy_victim: Any = None
policy_on_insert: Any = _ignore_key
policy_on_access: Any = _ignore_key
policy_on_evict: Any = _ignore_evict
policy_on_pass_start: Any = _ignore_pass_start
policy_on_layer_start: Any = _ignore_layer_start
policy_on_predicted: Any = _ignore_predicted
policy_on_forecast: Any = _ignore_forecast
NEEDS_FUTURE = False  # hint = next demand access (Belady)
PREDICTED = False  # the policy wants on_predicted
FORECASTS = False  # the policy wants on_forecast (then the kernel keeps the step's rank calibration)


# ---------------------------------------------------------------------------------- the replay
class Work(NamedTuple):
    """Every array the replay writes, allocated here (the kernel runs without reference counting,
    see the module doc), with its initial value."""

    key_layer: np.ndarray
    et1: np.ndarray
    resident: np.ndarray
    pin: np.ndarray
    served: np.ndarray
    in_run: np.ndarray
    evicted_pass: np.ndarray
    unused_pf: np.ndarray
    n_res_layer: np.ndarray
    used: np.ndarray
    arrival: np.ndarray
    copy_state: np.ndarray
    qidx: np.ndarray
    q_key: np.ndarray
    q_sub: np.ndarray
    q_dur: np.ndarray
    q_live: np.ndarray
    cal_used: np.ndarray
    cal_seen: np.ndarray
    p_use: np.ndarray
    C: np.ndarray
    F: np.ndarray
    PL: np.ndarray
    C_sink: np.ndarray
    F_sink: np.ndarray
    PL_sink: np.ndarray
    pass_time: np.ndarray
    pass_compute: np.ndarray
    pass_bytes: np.ndarray
    run_key: np.ndarray
    run_tok: np.ndarray
    run_copy: np.ndarray
    run_block: np.ndarray
    run_first: np.ndarray


def work(L: int, E: int, P: int, queue: int, lookahead: int, depth: int) -> Work:
    N = L * E
    i64, f64 = np.int64, np.float64
    cal = (2, max(lookahead, 1), depth + 1)
    return Work(
        key_layer=np.arange(N, dtype=i64) // E, et1=np.zeros(L), resident=np.zeros(N, dtype=np.bool_),
        pin=np.full(N, -1, dtype=i64), served=np.full(N, -1, dtype=i64), in_run=np.full(N, -1, dtype=i64),
        evicted_pass=np.full(N, -1, dtype=i64), unused_pf=np.zeros(N, dtype=np.bool_), n_res_layer=np.zeros(L, i64),
        used=np.full(E, -1, dtype=i64), arrival=np.zeros(N), copy_state=np.zeros(N, dtype=np.int8),
        qidx=np.full(N, -1, dtype=i64), q_key=np.zeros(queue, i64), q_sub=np.zeros(queue), q_dur=np.zeros(queue),
        q_live=np.zeros(queue, dtype=np.bool_), cal_used=np.full(cal, 1.0), cal_seen=np.full(cal, 2.0),
        p_use=np.zeros(E), C=np.zeros(NC, i64), F=np.zeros(NF, f64), PL=np.zeros((4, L), i64),
        C_sink=np.zeros(NC, i64), F_sink=np.zeros(NF, f64), PL_sink=np.zeros((4, L), i64), pass_time=np.zeros(P),
        pass_compute=np.zeros(P), pass_bytes=np.zeros(P), run_key=np.zeros(E + 1, i64), run_tok=np.zeros(E + 1, i64),
        run_copy=np.zeros(E + 1, dtype=np.bool_), run_block=np.full(E + 1, -1, dtype=i64),
        run_first=np.zeros(E + 1, dtype=np.bool_))


def _replay(L, E, phase, ptok, layer_ptr, expert, score, best_rank, ntok, next_use, sorted_keys, sorted_pos,
            fc_ptr, fc_expert, fc_selected, fc_covered, fc_prob, ip, layer_cap, copy_s, layer_bytes, link_bytes, fp,
            pcost, counted, w, st):
    """Replay all passes; the same decisions as :class:`offload.step.LayerStep` with greedy admission.

    The results land in ``w`` (:class:`Work`): int counters ``C`` (NC,), per-layer counts ``PL`` (4, L):
    accesses, hits, misses, collisions, float counters ``F`` (NF,), per-pass time, compute and bytes
    moved; counters cover the ``counted`` passes only. ``st``: the policy's compiled state.
    """
    P = len(phase)
    L = nonneg(L)  # sizes: known >= 0, so every index built from them is too (see nonneg)
    E = nonneg(E)
    capacity = ip[P_CAPACITY]
    per_layer = ip[P_PER_LAYER] != 0
    protect = ip[P_PROTECT] != 0
    drop = ip[P_DROP] != 0
    drop_from = ip[P_DROP_FROM]
    D = ip[P_LOOKAHEAD]
    depth = ip[P_DEPTH]
    has_prob = ip[P_HAS_PROB] != 0

    key_layer = w.key_layer
    et1 = w.et1  # expert time of one token, per layer (decode)
    for layer in range(L):
        et1[layer] = _expert_time(layer_bytes[layer], 1, fp)
    resident = w.resident
    pin = w.pin
    served = w.served
    in_run = w.in_run  # token of the layer whose runs include the key
    evicted_pass = w.evicted_pass
    unused_pf = w.unused_pf
    n_res_layer = w.n_res_layer
    n_res = 0
    used = w.used

    # the link: started copies end at ``free``; queued prefetches in admission order
    arrival = w.arrival
    copy_state = w.copy_state  # 0: no copy to wait for, 1: queued, 2: started
    qidx = w.qidx
    q_key = w.q_key
    q_sub = w.q_sub
    q_dur = w.q_dur
    q_live = w.q_live
    qh = 0
    qt = 0
    free = 0.0

    # offload.admission.Calibration: P(use) per phase, distance and rank (policies that weigh forecasts)
    cal_used = w.cal_used
    cal_seen = w.cal_seen
    p_use = w.p_use

    # counters of counted passes, and a sink for the others
    CT = w.C
    FT = w.F
    PLT = w.PL
    CJ = w.C_sink
    FJ = w.F_sink
    PLJ = w.PL_sink
    pass_time = w.pass_time
    pass_compute = w.pass_compute
    pass_bytes = w.pass_bytes
    clock = 0
    token = 0
    t = 0.0
    comp = 0.0
    run_key = w.run_key
    run_tok = w.run_tok
    run_copy = w.run_copy
    run_block = w.run_block
    run_first = w.run_first

    for p in range(P):
        if counted[p]:
            C, F, PL = CT, FT, PLT
        else:
            C, F, PL = CJ, FJ, PLJ
        ph = nonneg(phase[p])
        t0 = t
        c0 = comp
        moved = 0.0
        policy_on_pass_start(st, p, ph)
        for layer in range(L):
            token += 1
            a = nonneg(layer_ptr[p * L + layer])
            b = nonneg(layer_ptr[p * L + layer + 1])
            base = layer * E
            if protect:
                for i in range(a, b):
                    pin[base + expert[i]] = token
            policy_on_layer_start(st, layer)
            dt = (fp[F_LAYER_US] + fp[F_TOKEN_US] * ptok[p]) * 1e-6
            t += dt
            comp += dt
            now = t
            if D > 0:
                for i in range(a, b):
                    used[expert[i]] = token
            # ---------------- 1. queued prefetches this layer does not use are cancelled
            if qh < qt:
                qh, free = _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival, copy_state)
                for qi in range(qh, qt):  # the queue holds only prefetches not started yet
                    if not q_live[qi]:
                        continue
                    k = nonneg(q_key[qi])
                    e = k - base
                    if 0 <= e < E and used[e] != token and unused_pf[k]:
                        q_live[nonneg(qidx[k])] = False
                        qidx[k] = -1
                        copy_state[k] = 0
                        resident[k] = False
                        n_res_layer[layer] -= 1
                        n_res -= 1
                        unused_pf[k] = False
                        policy_on_evict(st, k)
                        F[F_PF_B] -= link_bytes[layer]
                        moved -= link_bytes[layer]
                        C[C_PF_CANCEL] += 1
            # ---------------- forecasts made for this layer: precision / recall (and the calibration)
            for d in range(1, D + 1):
                src = layer - d
                if src < 0:
                    break
                if fc_covered[src, d - 1]:
                    fi = nonneg((p * L + src) * D + d - 1)
                    lo = nonneg(fc_ptr[fi])
                    n = fc_selected[fi]
                    C[C_FC_PRED] += n
                    for j in range(lo, lo + n):
                        if used[fc_expert[j]] == token:
                            C[C_FC_CORR] += 1
                    C[C_FC_REL] += b - a
                    if FORECASTS:  # Calibration.observe
                        listed = min(fc_ptr[fi + 1] - lo, depth)
                        hits = 0
                        for r in range(listed):
                            if used[fc_expert[lo + r]] == token:
                                cal_used[ph, d - 1, r] += 1.0
                                hits += 1
                            cal_seen[ph, d - 1, r] += 1.0
                        if E - listed > 0:
                            cal_used[ph, d - 1, depth] += (b - a) - hits
                            cal_seen[ph, d - 1, depth] += E - listed
            # ---------------- 2. demand accesses, rank order
            PL[0, layer] += b - a
            C[C_ACC] += b - a
            nrun = 0
            nblocked = 0
            for i in range(a, b):
                k = nonneg(base + expert[i])
                served[k] = token
                hint = next_use[i] if NEEDS_FUTURE else 0
                if resident[k]:
                    if unused_pf[k]:
                        unused_pf[k] = False
                        C[C_PF_USED] += 1
                        F[F_PF_USED_B] += link_bytes[layer]
                    clock += 1
                    policy_on_access(st, k, score[i], hint, clock)
                    has = copy_state[k] != 0
                    if has and not (copy_state[k] == 2 and arrival[k] <= now):
                        C[C_LATE] += 1
                        if copy_state[k] == 1:  # promote: starts now, ahead of the queued prefetches
                            qh, free = _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival,
                                                copy_state)
                            q_live[nonneg(qidx[k])] = False
                            qidx[k] = -1
                            start = now if now > free else free
                            free = start + copy_s[layer]
                            arrival[k] = free
                            copy_state[k] = 2
                    run_key[nrun] = k
                    run_tok[nrun] = ntok[i]
                    run_copy[nrun] = has
                    run_block[nrun] = -1
                    in_run[k] = token
                    nrun += 1
                    continue
                PL[2, layer] += 1
                C[C_MISS] += 1
                if evicted_pass[k] == p:
                    PL[3, layer] += 1
                    C[C_COLL] += 1
                if drop and best_rank[i] >= drop_from:
                    C[C_DROP] += 1
                    continue
                # demand insert
                full = n_res_layer[layer] >= layer_cap[layer] if per_layer else n_res >= capacity
                blocked = -1
                if full:
                    v = -1
                    part = layer if per_layer else 0
                    for mode in range(3):
                        v = policy_victim(st, Allowed(mode, token, pin, served, part), False)
                        if v >= 0:
                            break
                    v = nonneg(v)  # mode 2 allows any resident key: a victim always exists here
                    vl = nonneg(key_layer[v])
                    resident[v] = False
                    n_res_layer[vl] -= 1
                    n_res -= 1
                    evicted_pass[v] = p
                    unused_pf[v] = False
                    policy_on_evict(st, v)
                    C[C_EVICT] += 1
                    if in_run[v] == token:
                        blocked = v  # its run still reads the slot: the copy starts after it
                        nblocked += 1
                    else:
                        if copy_state[v] == 1:  # a queued prefetch: it never reaches the link
                            qh, free = _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival, copy_state)
                            if copy_state[v] == 1:
                                q_live[nonneg(qidx[v])] = False
                                F[F_PF_B] -= link_bytes[vl]
                                moved -= link_bytes[vl]
                                C[C_PF_CANCEL] += 1
                        qidx[v] = -1
                        copy_state[v] = 0
                resident[k] = True
                n_res += 1
                n_res_layer[layer] += 1
                clock += 1
                policy_on_insert(st, k, False, hint, clock)
                clock += 1
                policy_on_access(st, k, score[i], hint, clock)
                F[F_DEMAND_B] += link_bytes[layer]
                moved += link_bytes[layer]
                if blocked < 0:
                    if qh < qt:
                        qh, free = _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival, copy_state)
                    start = now if now > free else free
                    free = start + copy_s[layer]
                    arrival[k] = free
                    copy_state[k] = 2
                run_key[nrun] = k
                run_tok[nrun] = ntok[i]
                run_copy[nrun] = blocked < 0
                run_block[nrun] = blocked
                in_run[k] = token
                nrun += 1
            # ---------------- 3 + 4. forecasts for layers l+1..l+D, greedy prefetch
            if D > 0 and layer + 1 < L:
                t += pcost[p]
                F[F_PRED_S] += pcost[p]
                C[C_PRED_CALLS] += 1
                now = t
                nxt_pos = layer_ptr[p * L + layer + 1]
                if PREDICTED or FORECASTS:  # all distances first: marks, then the ranked forecast
                    for d in range(1, D + 1):
                        target = layer + d
                        if target >= L:
                            break
                        if not fc_covered[layer, d - 1]:
                            continue
                        fi = nonneg((p * L + layer) * D + d - 1)
                        lo = nonneg(fc_ptr[fi])
                        if PREDICTED:
                            for j in range(lo, lo + fc_selected[fi]):
                                k2 = nonneg(target * E + fc_expert[j])
                                if resident[k2]:
                                    clock += 1
                                    policy_on_predicted(st, k2, clock)
                        if FORECASTS:
                            n = fc_ptr[fi + 1] - lo
                            if has_prob:
                                for r in range(n):
                                    p_use[r] = fc_prob[lo + r]
                                rest = 0.0
                            else:  # Calibration.probs / rest
                                for r in range(n):
                                    rr = min(r, depth)
                                    p_use[r] = cal_used[ph, d - 1, rr] / cal_seen[ph, d - 1, rr]
                                rest = cal_used[ph, d - 1, depth] / cal_seen[ph, d - 1, depth]
                            policy_on_forecast(st, target, fc_expert[lo:lo + n], p_use[:n], rest)
                for d in range(1, D + 1):
                    target = layer + d
                    if target >= L:
                        break
                    if not fc_covered[layer, d - 1]:
                        continue
                    fi = nonneg((p * L + layer) * D + d - 1)
                    for j in range(fc_ptr[fi], fc_ptr[fi] + fc_selected[fi]):
                        k2 = nonneg(target * E + fc_expert[j])
                        if resident[k2]:
                            continue
                        full = n_res_layer[target] >= layer_cap[target] if per_layer else n_res >= capacity
                        if full:
                            part = target if per_layer else 0
                            v = policy_victim(st, Allowed(3, token, pin, in_run, part), True)
                            if v < 0:
                                continue
                            v = nonneg(v)
                            vl = nonneg(key_layer[v])
                            resident[v] = False
                            n_res_layer[vl] -= 1
                            n_res -= 1
                            evicted_pass[v] = p
                            unused_pf[v] = False
                            policy_on_evict(st, v)
                            C[C_EVICT] += 1
                            if copy_state[v] == 1:
                                qh, free = _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival,
                                                    copy_state)
                                if copy_state[v] == 1:
                                    q_live[nonneg(qidx[v])] = False
                                    F[F_PF_B] -= link_bytes[vl]
                                    moved -= link_bytes[vl]
                                    C[C_PF_CANCEL] += 1
                            qidx[v] = -1
                            copy_state[v] = 0
                        resident[k2] = True
                        n_res += 1
                        n_res_layer[target] += 1
                        clock += 1
                        hint2 = _next_after(sorted_keys, sorted_pos, k2, nxt_pos) if NEEDS_FUTURE else 0
                        policy_on_insert(st, k2, True, hint2, clock)
                        C[C_PF_ISSUED] += 1
                        unused_pf[k2] = True
                        F[F_PF_B] += link_bytes[target]
                        moved += link_bytes[target]
                        if qh < qt:
                            qh, free = _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival, copy_state)
                        q_key[qt] = k2
                        q_sub[qt] = now
                        q_dur[qt] = copy_s[target]
                        q_live[qt] = True
                        qidx[k2] = qt
                        copy_state[k2] = 1
                        qt += 1
            # ---------------- 5. run: experts already there first, then the rest in access order
            for r in range(nrun):
                k = nonneg(run_key[r])
                run_first[r] = run_block[r] < 0 and (not run_copy[r] or (copy_state[k] == 2 and arrival[k] <= t))
            for group in range(2):
                for r in range(nrun):
                    if run_first[r] != (group == 0):
                        continue
                    k = nonneg(run_key[r])
                    if run_copy[r]:
                        if copy_state[k] == 1:  # still queued: someone waits on it now
                            qh, free = _advance(t, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival,
                                                copy_state)
                            if copy_state[k] == 1:
                                q_live[nonneg(qidx[k])] = False
                                start = t if t > free else free
                                free = start + copy_s[layer]
                                arrival[k] = free
                        qidx[k] = -1
                        copy_state[k] = 0
                        if arrival[k] > t:
                            F[F_STALL] += arrival[k] - t
                            t = arrival[k]
                    if run_tok[r] == 1:
                        dt = et1[layer]
                    else:
                        dt = _expert_time(layer_bytes[layer], run_tok[r], fp)
                    t += dt
                    comp += dt
                    if nblocked > 0:
                        for r2 in range(nrun):  # copies waiting for this expert's slot start now
                            if run_block[r2] == k:
                                k2 = nonneg(run_key[r2])
                                qh, free = _advance(t, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival,
                                                    copy_state)
                                start = t if t > free else free
                                free = start + copy_s[layer]
                                arrival[k2] = free
                                copy_state[k2] = 2
                                run_copy[r2] = True
                                run_block[r2] = -1
                                nblocked -= 1
        pass_time[p] = t - t0
        pass_compute[p] = comp - c0
        pass_bytes[p] = moved
    CT[C_HIT] = CT[C_ACC] - CT[C_MISS]
    for layer in range(L):
        PLT[1, layer] = PLT[0, layer] - PLT[2, layer]


# ---------------------------------------------------------------------------------- specialisation
_KERNELS: dict[str, Dispatcher] = {}


def _source_files(functions: list[Any]) -> list[Path]:
    """The files of ``functions`` and of every numba function they call by name, transitively."""
    files = {Path(__file__).resolve(), Path(inspect.getfile(Allowed)).resolve()}
    seen: set[int] = set()
    stack = list(functions)
    while stack:
        fn = stack.pop()
        py = getattr(fn, "py_func", None)
        if py is None or id(py) in seen:
            continue
        seen.add(id(py))
        files.add(Path(inspect.getfile(py)).resolve())
        stack.extend(v for name in py.__code__.co_names if isinstance(v := py.__globals__.get(name), Dispatcher))
    return sorted(files)


def specialise(cls: type[EvictionPolicy]) -> Dispatcher:
    """The replay kernel compiled for ``cls``'s compiled hooks (memoised; cached on disk by numba)."""
    kernel = cls.kernel
    if kernel is None:
        raise ValueError(f"{cls.name} declares no compiled twin")
    hooks = {name: fn if fn is not None else _IGNORE[name] for name, fn in kernel.hooks().items()}
    flags = {"NEEDS_FUTURE": cls.needs_future, "PREDICTED": kernel.on_predicted is not None,
             "FORECASTS": kernel.on_forecast is not None}
    h = hashlib.sha256()
    for path in _source_files(list(hooks.values())):
        h.update(path.read_bytes())
    for name, fn in sorted(hooks.items()):
        h.update(f"{name}={fn.py_func.__module__}.{fn.py_func.__qualname__};".encode())
    h.update(repr(sorted(flags.items())).encode())
    digest = h.hexdigest()[:16]
    if digest not in _KERNELS:
        glb = dict(_replay.__globals__)
        glb.update({f"policy_{name}": fn for name, fn in hooks.items()}, **flags)
        py = types.FunctionType(_replay.__code__, glb, f"replay_{kernel.name}_{digest}")
        py.__qualname__ = py.__name__  # numba names its cache files after it
        py.__doc__ = _replay.__doc__
        _KERNELS[digest] = nb.njit(cache=True, _nrt=False)(py)
    return _KERNELS[digest]


# ---------------------------------------------------------------------------------- arguments
def _params(replay: Any, cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ps = replay.passes
    fc = replay.forecast
    ip = np.zeros(N_IPARAMS, dtype=np.int64)
    ip[P_CAPACITY] = replay.capacity_slots
    ip[P_PER_LAYER] = cfg.cache == "per-layer"
    ip[P_PROTECT] = cfg.protect_layer
    ip[P_DROP] = cfg.miss == "drop"
    ip[P_DROP_FROM] = cfg.drop_from_rank
    ip[P_LOOKAHEAD] = fc.lookahead if fc is not None else 0
    ip[P_DEPTH] = forecast_depth(ps.num_experts, ps.top_k)
    ip[P_HAS_PROB] = fc is not None and fc.prob is not None
    if cfg.cache == "per-layer":
        layer_cap = np.asarray(split_capacity(replay.capacity_slots, ps.num_layers), dtype=np.int64)
    else:
        layer_cap = np.zeros(ps.num_layers, dtype=np.int64)
    hw = replay.hardware
    fp = np.array([hw.tflops, hw.hbm_gbps, hw.layer_us, hw.token_us, hw.expert_us, replay.bytes_per_param])
    return ip, layer_cap, fp


def kernel_args(replay: Any, cfg: Any, counted: np.ndarray | None = None) -> tuple[Dispatcher, tuple]:
    """The kernel for ``cfg.policy`` and its positional arguments (a fresh policy state and
    :class:`Work` each call; the results land in the ``Work``, the second argument from the end)."""
    ps = replay.passes
    policy = make_policy(cfg.policy, **cfg.policy_params)
    kernel = specialise(type(policy))
    ctx = KernelContext(ps.num_layers, ps.num_experts, ps.top_k, replay.capacity_slots, cfg.cache == "per-layer")
    state = policy.kernel_state(ctx)
    ip, layer_cap, fp = _params(replay, cfg)
    if policy.needs_future:
        keys = ps.keys()
        next_use = ps.next_use()
        order = np.argsort(keys, kind="stable").astype(np.int64)
        sorted_keys = keys[order]
    else:
        next_use = np.zeros(ps.num_accesses, dtype=np.int64)
        order = sorted_keys = np.zeros(0, dtype=np.int64)
    fc = replay.forecast
    if fc is not None:
        fc_ptr, fc_expert, fc_selected = fc.ptr, fc.expert.astype(np.int64), fc.selected.astype(np.int64)
        fc_covered = fc.covered
        fc_prob = fc.prob.astype(np.float32) if fc.prob is not None else np.zeros(0, dtype=np.float32)
    else:
        fc_ptr, fc_expert = np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        fc_selected, fc_covered = np.zeros(0, dtype=np.int64), np.zeros((ps.num_layers, 1), dtype=np.bool_)
        fc_prob = np.zeros(0, dtype=np.float32)
    link_bytes = np.asarray(replay.link_bytes, dtype=np.float64)
    copy_s = link_bytes / replay.hardware.link_bytes_per_s
    pcost = np.array([replay.predictor_cost(int(n)) if fc is not None else 0.0 for n in ps.pass_tokens])
    if counted is None:
        counted = np.ones(ps.num_passes, dtype=np.bool_)
    w = work(ps.num_layers, ps.num_experts, ps.num_passes, len(fc_expert) + 1, int(ip[P_LOOKAHEAD]), int(ip[P_DEPTH]))
    return kernel, (ps.num_layers, ps.num_experts, ps.phase, ps.pass_tokens, ps.layer_ptr, ps.expert, ps.score,
                    ps.best_rank, ps.tokens, next_use, sorted_keys, order, fc_ptr, fc_expert, fc_selected, fc_covered,
                    fc_prob, ip, layer_cap, copy_s, replay.layer_bytes.astype(np.float64), link_bytes, fp, pcost,
                    counted, w, state)


def simulate_fast(replay: Any, cfg: Any) -> dict[str, Any]:
    ps = replay.passes
    counted = counted_passes(replay, cfg)
    kernel, args = kernel_args(replay, cfg, counted)
    kernel(*args)
    w = args[-2]
    C, plc, F, pass_time, pass_compute, pass_bytes = w.C, w.PL, w.F, w.pass_time, w.pass_compute, w.pass_bytes
    c = Counters(
        passes=int(counted.sum()), accesses=int(C[C_ACC]), hits=int(C[C_HIT]), misses=int(C[C_MISS]),
        late_prefetch=int(C[C_LATE]), collision_misses=int(C[C_COLL]), dropped=int(C[C_DROP]),
        evictions=int(C[C_EVICT]), prefetch_issued=int(C[C_PF_ISSUED]), prefetch_used=int(C[C_PF_USED]),
        prefetch_cancelled=int(C[C_PF_CANCEL]), demand_bytes=float(F[F_DEMAND_B]), prefetch_bytes=float(F[F_PF_B]),
        prefetch_used_bytes=float(F[F_PF_USED_B]), stall_s=float(F[F_STALL]), predictor_calls=int(C[C_PRED_CALLS]),
        predictor_s=float(F[F_PRED_S]), forecast_predicted=int(C[C_FC_PRED]), forecast_correct=int(C[C_FC_CORR]),
        forecast_relevant=int(C[C_FC_REL]),
        # the kernel covers full-precision configurations only (supports): every hit and run is native
        hits_native=int(C[C_HIT]), served_native=int(C[C_HIT]) + int(C[C_MISS]) - int(C[C_DROP]),
    )
    pre = counted & (ps.phase == 0)
    dec = counted & (ps.phase == 1)
    tally = Tally(counters=c, collisions=plc[3].copy(), prefill_times=pass_time[pre].tolist(),
                   decode_times=pass_time[dec].tolist(), prefill_compute=pass_compute[pre].tolist(),
                   decode_compute=pass_compute[dec].tolist(), prefill_bytes=float(pass_bytes[pre].sum()),
                   decode_bytes=float(pass_bytes[dec].sum()))
    return result(replay, cfg, tally, counted)
