"""numba kernels of the simulator: the same replay as :func:`offload.simulator.simulate_reference`.

Covers the policies lru, fifo, lfu (and lhu, which is LFU without a precision cascade), fld,
score, belady and least_stale, with fetch or drop miss handling, standard routing, any forecast
(prefetch), global or per-layer caches and the timing model. Substitution, the lower-bit miss
handlers, cache-aware routing and random eviction run on the reference loop.

Data structures (keys are dense: k = layer*E + expert): one doubly linked list per layer holding the
resident keys in touch order (oldest first). LRU/FIFO take the oldest eligible head over the layers
(O(L)); Least-Stale walks the layers in its class order and, because a touch makes a key current,
finds a layer's stale keys as a prefix of its list (O(L)); LFU/FLD/score/Belady scan the resident
keys for the lowest (priority, touch stamp). Victim choices, tie rules and counters are exactly the
reference's, which ``tests/test_simulator_fast.py`` checks.

The helpers are compiled without numba's reference counting (``_nrt=False``: they never allocate);
with it every call increments and decrements each array argument atomically, which made an LRU
list move cost ~80 ns instead of ~2 ns.
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np

from offload.passes import NEVER

POLICY_CODES = {"lru": 0, "fifo": 1, "lfu": 2, "lhu": 2, "belady": 3, "least_stale": 4, "fld": 5, "score": 6}
LRU, FIFO, LFU, BELADY, LS, FLD, SCORE = 0, 1, 2, 3, 4, 5, 6

# indices into the int64 parameter vector
(P_POLICY, P_CAPACITY, P_PER_LAYER, P_PROTECT, P_DROP, P_DROP_FROM, P_LFU_CACHE_SCOPE, P_LS_REVERSE,
 P_LS_LEFT_FIRST, P_LS_PREFILL_LEFT_STALE, P_LS_PREFETCH_CURRENT, P_FLD_CYCLIC, P_LOOKAHEAD,
 P_LS_AGE) = range(14)
N_IPARAMS = 14
# indices into the float64 parameter vector (timing)
F_TFLOPS, F_HBM, F_LAYER_US, F_TOKEN_US, F_EXPERT_US, F_BPP = range(6)


def supports(cfg: Any) -> bool:
    """Configurations this kernel replays; the lower-bit miss handlers (fetch-lowest-bit, fetch-priority,
    precision-cascade) are left to the reference step on purpose: their per-precision bytes, dequantization
    and upgrade queue are a second link tier that a port would have to keep equal to the step forever."""
    return (cfg.policy in POLICY_CODES and cfg.miss in ("fetch", "drop") and cfg.routing == "standard"
            and cfg.admission == "greedy")


@nb.njit(cache=True, _nrt=False)
def _unlink(k, layer, prv, nxt, head, tail):
    a, b = prv[k], nxt[k]
    if a >= 0:
        nxt[a] = b
    else:
        head[layer] = b
    if b >= 0:
        prv[b] = a
    else:
        tail[layer] = a
    prv[k] = -1
    nxt[k] = -1


@nb.njit(cache=True, _nrt=False)
def _drop(v, glob, L, E, p, prv, nxt, head, tail, resident, n_res_layer, evicted_pass, unused_pf):
    """Take victim ``v`` out of its queue and the resident set; the caller counts the eviction."""
    vl = v // E
    _unlink(v, L if glob else vl, prv, nxt, head, tail)
    resident[v] = False
    n_res_layer[vl] -= 1
    evicted_pass[v] = p
    unused_pf[v] = False


@nb.njit(cache=True, _nrt=False)
def _append(k, layer, prv, nxt, head, tail):
    t = tail[layer]
    prv[k] = t
    nxt[k] = -1
    if t >= 0:
        nxt[t] = k
    else:
        head[layer] = k
    tail[layer] = k


@nb.njit(cache=True, _nrt=False)
def _eligible(k, mode, token, pin, served):
    """mode 0: not pinned; 1: served at this layer; 2: anything; 3 (prefetch): neither pinned nor
    still to run at this layer (``served`` then holds the layer's runs)."""
    if mode == 0:
        return pin[k] != token
    if mode == 1:
        return served[k] == token
    if mode == 3:
        return pin[k] != token and served[k] != token
    return True


@nb.njit(cache=True, _nrt=False)
def _victim(mode, for_prefetch, ins_layer, cur_layer, cur_pass, is_prefill, token, ip, L, E,
            head, nxt, stamp, last_pass, count, total, nextuse, pin, served):
    """The key to evict, or -1. mode 0: not pinned; 1: served at this layer; 2: anything."""
    policy = ip[P_POLICY]
    per_layer = ip[P_PER_LAYER] != 0
    glob = policy != LS and not per_layer
    if glob and (policy == LRU or policy == FIFO):  # one global touch-ordered list: its first eligible key
        k = head[L]
        while k >= 0:
            if _eligible(k, mode, token, pin, served):
                return k
            k = nxt[k]
        return -1
    if policy == LRU or policy == FIFO:
        best = -1
        best_stamp = 0
        for layer in range(L):
            if per_layer and layer != ins_layer:
                continue
            k = head[layer]
            while k >= 0:
                if _eligible(k, mode, token, pin, served):
                    if best < 0 or stamp[k] < best_stamp:
                        best = k
                        best_stamp = stamp[k]
                    break
                k = nxt[k]
        return best
    if policy == LS:
        reverse = ip[P_LS_REVERSE] != 0
        left_first = ip[P_LS_LEFT_FIRST] != 0
        prefill_left = ip[P_LS_PREFILL_LEFT_STALE] != 0 and is_prefill
        nspans = 2 if left_first else 1
        for want in range(2):
            want_stale = want == 0
            if not want_stale and for_prefetch and ip[P_LS_PREFETCH_CURRENT] == 0:
                return -1
            for s in range(nspans):
                if left_first:
                    lo = 0 if s == 0 else cur_layer
                    hi = cur_layer if s == 0 else L
                else:
                    lo = 0
                    hi = L
                age = want_stale and ip[P_LS_AGE] != 0
                best = -1
                best_pass = 0
                for idx in range(hi - lo):
                    layer = hi - 1 - idx if reverse else lo + idx
                    if per_layer and layer != ins_layer:
                        continue
                    found = -1
                    k = head[layer]
                    while k >= 0:
                        stale = (prefill_left and layer < cur_layer) or last_pass[k] < cur_pass
                        if want_stale and not stale:
                            break
                        if stale == want_stale and _eligible(k, mode, token, pin, served):
                            found = k
                            break
                        k = nxt[k]
                    if found < 0:
                        continue
                    if not age:
                        return found
                    if best < 0 or last_pass[found] < best_pass:
                        best = found
                        best_pass = last_pass[found]
                if best >= 0:
                    return best
        return -1
    # scan policies: lowest (priority, stamp)
    best = -1
    best_p = 0.0
    best_stamp = 0
    for li in range(L + 1):
        if glob != (li == L) or (per_layer and li != ins_layer):
            continue
        k = head[li]
        while k >= 0:
            layer = k // E
            if _eligible(k, mode, token, pin, served):
                if policy == LFU:
                    pr = float(count[k])
                elif policy == BELADY:
                    pr = -float(nextuse[k])
                elif policy == SCORE:
                    pr = total[k]
                else:  # FLD
                    if ip[P_FLD_CYCLIC] != 0:
                        pr = -float((layer - cur_layer) % L)
                    else:
                        pr = -float(abs(layer - cur_layer))
                if best < 0 or pr < best_p or (pr == best_p and stamp[k] < best_stamp):
                    best = k
                    best_p = pr
                    best_stamp = stamp[k]
            k = nxt[k]
    return best


@nb.njit(cache=True)
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
        k = q_key[qh]
        free = at + q_dur[qh]
        arrival[k] = free
        copy_state[k] = 2
        q_live[qh] = False
        qh += 1
    return qh, free


# integer counters (indices into C) and float counters (indices into F)
(C_ACC, C_HIT, C_MISS, C_LATE, C_COLL, C_DROP, C_EVICT, C_PF_ISSUED, C_PF_USED, C_PF_CANCEL, C_FC_PRED,
 C_FC_CORR, C_FC_REL, C_PRED_CALLS) = range(14)
NC = 14
F_STALL, F_PRED_S, F_DEMAND_B, F_PF_B, F_PF_USED_B = range(5)
NF = 5


@nb.njit(cache=True)
def replay_kernel(L, E, phase, ptok, layer_ptr, expert, score, best_rank, ntok, next_use, sorted_keys, sorted_pos,
                  fc_ptr, fc_expert, fc_selected, fc_covered, ip, layer_cap, copy_s, layer_bytes, link_bytes, fp,
                  pcost, counted):
    """Replay all passes; the same decisions as :class:`offload.step.LayerStep` with greedy admission.

    Returns (int counters (NC,), per-layer counts (4, L): accesses, hits, misses, collisions, float
    counters (NF,), per-pass time (P,), per-pass compute (P,), per-pass bytes moved (P,)); counters
    cover the ``counted`` passes only.
    """
    N = L * E
    P = len(phase)
    policy = ip[P_POLICY]
    capacity = ip[P_CAPACITY]
    per_layer = ip[P_PER_LAYER] != 0
    protect = ip[P_PROTECT] != 0
    drop = ip[P_DROP] != 0
    drop_from = ip[P_DROP_FROM]
    D = ip[P_LOOKAHEAD]
    lfu_cache_scope = ip[P_LFU_CACHE_SCOPE] != 0

    resident = np.zeros(N, dtype=np.bool_)
    prv = np.full(N, -1, dtype=np.int64)
    nxt = np.full(N, -1, dtype=np.int64)
    # lists 0..L-1: per layer; list L: one global list (LRU/FIFO/scan policies with a global cache)
    head = np.full(L + 1, -1, dtype=np.int64)
    tail = np.full(L + 1, -1, dtype=np.int64)
    glob = policy != LS and not per_layer
    et1 = np.empty(L, dtype=np.float64)  # expert time of one token, per layer (decode)
    for layer in range(L):
        et1[layer] = _expert_time(layer_bytes[layer], 1, fp)
    stamp = np.zeros(N, dtype=np.int64)
    last_pass = np.zeros(N, dtype=np.int64)
    count = np.zeros(N, dtype=np.int64)
    total = np.zeros(N, dtype=np.float64)
    nextuse = np.zeros(N, dtype=np.int64)
    pin = np.full(N, -1, dtype=np.int64)
    served = np.full(N, -1, dtype=np.int64)
    in_run = np.full(N, -1, dtype=np.int64)  # token of the layer whose runs include the key
    evicted_pass = np.full(N, -1, dtype=np.int64)
    unused_pf = np.zeros(N, dtype=np.bool_)
    n_res_layer = np.zeros(L, dtype=np.int64)
    n_res = 0
    used = np.full(E, -1, dtype=np.int64)

    # the link: started copies end at ``free``; queued prefetches in admission order
    arrival = np.zeros(N, dtype=np.float64)
    copy_state = np.zeros(N, dtype=np.int8)  # 0: no copy to wait for, 1: queued, 2: started
    qidx = np.full(N, -1, dtype=np.int64)
    QN = len(fc_expert) + 1
    q_key = np.zeros(QN, dtype=np.int64)
    q_sub = np.zeros(QN, dtype=np.float64)
    q_dur = np.zeros(QN, dtype=np.float64)
    q_live = np.zeros(QN, dtype=np.bool_)
    qh = 0
    qt = 0
    free = 0.0

    C = np.zeros(NC, dtype=np.int64)
    F = np.zeros(NF, dtype=np.float64)
    PL = np.zeros((4, L), dtype=np.int64)
    CT = np.zeros(NC, dtype=np.int64)
    FT = np.zeros(NF, dtype=np.float64)
    PLT = np.zeros((4, L), dtype=np.int64)
    pass_time = np.zeros(P, dtype=np.float64)
    pass_compute = np.zeros(P, dtype=np.float64)
    pass_bytes = np.zeros(P, dtype=np.float64)
    clock = 0
    token = 0
    t = 0.0
    comp = 0.0
    run_key = np.zeros(N + 1, dtype=np.int64)
    run_tok = np.zeros(N + 1, dtype=np.int64)
    run_copy = np.zeros(N + 1, dtype=np.bool_)
    run_block = np.full(N + 1, -1, dtype=np.int64)
    run_first = np.zeros(N + 1, dtype=np.bool_)

    for p in range(P):
        is_prefill = phase[p] == 0
        t0 = t
        c0 = comp
        C0 = C.copy()
        F0 = F.copy()
        PL0 = PL.copy()
        for layer in range(L):
            token += 1
            a = layer_ptr[p * L + layer]
            b = layer_ptr[p * L + layer + 1]
            if protect:
                for i in range(a, b):
                    pin[layer * E + expert[i]] = token
            dt = (fp[F_LAYER_US] + fp[F_TOKEN_US] * ptok[p]) * 1e-6
            t += dt
            comp += dt
            now = t
            if D > 0:
                for i in range(a, b):
                    used[expert[i]] = token
            # ---------------- 1. queued prefetches this layer does not use are cancelled
            qh, free = _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival, copy_state)
            for qi in range(qh, qt):  # the queue holds only prefetches not started yet
                if not q_live[qi]:
                    continue
                k = q_key[qi]
                e = k - layer * E
                if 0 <= e < E and used[e] != token and unused_pf[k]:
                    q_live[qidx[k]] = False
                    qidx[k] = -1
                    copy_state[k] = 0
                    _unlink(k, L if glob else layer, prv, nxt, head, tail)
                    resident[k] = False
                    n_res_layer[layer] -= 1
                    n_res -= 1
                    unused_pf[k] = False
                    F[F_PF_B] -= link_bytes[layer]
                    C[C_PF_CANCEL] += 1
            # ---------------- forecasts made for this layer: precision / recall
            for d in range(1, D + 1):
                src = layer - d
                if src < 0:
                    break
                if fc_covered[src, d - 1]:
                    fi = (p * L + src) * D + d - 1
                    n = fc_selected[fi]
                    C[C_FC_PRED] += n
                    for j in range(fc_ptr[fi], fc_ptr[fi] + n):
                        if used[fc_expert[j]] == token:
                            C[C_FC_CORR] += 1
                    C[C_FC_REL] += b - a
            nrun = 0
            # ---------------- 2. demand accesses, rank order
            for i in range(a, b):
                k = layer * E + expert[i]
                PL[0, layer] += 1
                C[C_ACC] += 1
                served[k] = token
                if resident[k]:
                    PL[1, layer] += 1
                    C[C_HIT] += 1
                    if unused_pf[k]:
                        unused_pf[k] = False
                        C[C_PF_USED] += 1
                        F[F_PF_USED_B] += link_bytes[layer]
                    if policy != FIFO:
                        clock += 1
                        stamp[k] = clock
                        last_pass[k] = p
                        lk = L if glob else layer
                        if tail[lk] != k:
                            _unlink(k, lk, prv, nxt, head, tail)
                            _append(k, lk, prv, nxt, head, tail)
                    if policy == LFU:
                        count[k] += 1
                    elif policy == SCORE:
                        total[k] += score[i]
                    elif policy == BELADY:
                        nextuse[k] = next_use[i]
                    has = copy_state[k] != 0
                    if has and not (copy_state[k] == 2 and arrival[k] <= now):
                        C[C_LATE] += 1
                        if copy_state[k] == 1:  # promote: starts now, ahead of the queued prefetches
                            qh, free = _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival,
                                                copy_state)
                            q_live[qidx[k]] = False
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
                    for mode in range(3):
                        v = _victim(mode, False, layer, layer, p, is_prefill, token, ip, L, E,
                                    head, nxt, stamp, last_pass, count, total, nextuse, pin, served)
                        if v >= 0:
                            break
                    _drop(v, glob, L, E, p, prv, nxt, head, tail, resident, n_res_layer, evicted_pass, unused_pf)
                    n_res -= 1
                    C[C_EVICT] += 1
                    if in_run[v] == token:
                        blocked = v  # its run still reads the slot: the copy starts after it
                    else:
                        qh, free = _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival, copy_state)
                        if copy_state[v] == 1:  # a queued prefetch: it never reaches the link
                            q_live[qidx[v]] = False
                            F[F_PF_B] -= link_bytes[v // E]
                            C[C_PF_CANCEL] += 1
                        qidx[v] = -1
                        copy_state[v] = 0
                resident[k] = True
                n_res += 1
                n_res_layer[layer] += 1
                clock += 1
                stamp[k] = clock
                last_pass[k] = p
                _append(k, L if glob else layer, prv, nxt, head, tail)
                if policy == LFU:
                    if lfu_cache_scope:
                        count[k] = 0
                    count[k] += 1
                elif policy == SCORE:
                    total[k] += score[i]
                elif policy == BELADY:
                    nextuse[k] = next_use[i]
                F[F_DEMAND_B] += link_bytes[layer]
                if blocked < 0:
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
                if policy == LS:  # the selected experts become current (all distances first)
                    for d in range(1, D + 1):
                        target = layer + d
                        if target >= L:
                            break
                        if not fc_covered[layer, d - 1]:
                            continue
                        fi = (p * L + layer) * D + d - 1
                        for j in range(fc_ptr[fi], fc_ptr[fi] + fc_selected[fi]):
                            k2 = target * E + fc_expert[j]
                            if resident[k2]:
                                clock += 1
                                stamp[k2] = clock
                                last_pass[k2] = p
                                _unlink(k2, target, prv, nxt, head, tail)
                                _append(k2, target, prv, nxt, head, tail)
                for d in range(1, D + 1):
                    target = layer + d
                    if target >= L:
                        break
                    if not fc_covered[layer, d - 1]:
                        continue
                    fi = (p * L + layer) * D + d - 1
                    for j in range(fc_ptr[fi], fc_ptr[fi] + fc_selected[fi]):
                        k2 = target * E + fc_expert[j]
                        if resident[k2]:
                            continue
                        full = n_res_layer[target] >= layer_cap[target] if per_layer else n_res >= capacity
                        if full:
                            v = _victim(3, True, target, layer, p, is_prefill, token, ip, L, E,
                                        head, nxt, stamp, last_pass, count, total, nextuse, pin, in_run)
                            if v < 0:
                                continue
                            _drop(v, glob, L, E, p, prv, nxt, head, tail, resident, n_res_layer, evicted_pass,
                                  unused_pf)
                            n_res -= 1
                            C[C_EVICT] += 1
                            qh, free = _advance(now, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival,
                                                copy_state)
                            if copy_state[v] == 1:
                                q_live[qidx[v]] = False
                                F[F_PF_B] -= link_bytes[v // E]
                                C[C_PF_CANCEL] += 1
                            qidx[v] = -1
                            copy_state[v] = 0
                        resident[k2] = True
                        n_res += 1
                        n_res_layer[target] += 1
                        clock += 1
                        stamp[k2] = clock
                        last_pass[k2] = p
                        _append(k2, L if glob else target, prv, nxt, head, tail)
                        if lfu_cache_scope:
                            count[k2] = 0
                        if policy == BELADY:
                            nextuse[k2] = _next_after(sorted_keys, sorted_pos, k2, nxt_pos)
                        C[C_PF_ISSUED] += 1
                        unused_pf[k2] = True
                        F[F_PF_B] += link_bytes[target]
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
                k = run_key[r]
                run_first[r] = run_block[r] < 0 and (not run_copy[r] or (copy_state[k] == 2 and arrival[k] <= t))
            for group in range(2):
                for r in range(nrun):
                    if run_first[r] != (group == 0):
                        continue
                    k = run_key[r]
                    if run_copy[r]:
                        if copy_state[k] == 1:  # still queued: someone waits on it now
                            qh, free = _advance(t, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival,
                                                copy_state)
                            if copy_state[k] == 1:
                                q_live[qidx[k]] = False
                                start = t if t > free else free
                                free = start + copy_s[k // E]
                                arrival[k] = free
                        qidx[k] = -1
                        copy_state[k] = 0
                        if arrival[k] > t:
                            F[F_STALL] += arrival[k] - t
                            t = arrival[k]
                    if run_tok[r] == 1:
                        dt = et1[k // E]
                    else:
                        dt = _expert_time(layer_bytes[k // E], run_tok[r], fp)
                    t += dt
                    comp += dt
                    for r2 in range(nrun):  # copies waiting for this expert's slot start now
                        if run_block[r2] == k:
                            k2 = run_key[r2]
                            qh, free = _advance(t, qh, qt, q_key, q_sub, q_dur, q_live, free, arrival, copy_state)
                            start = t if t > free else free
                            free = start + copy_s[k2 // E]
                            arrival[k2] = free
                            copy_state[k2] = 2
                            run_copy[r2] = True
                            run_block[r2] = -1
        pass_time[p] = t - t0
        pass_compute[p] = comp - c0
        pass_bytes[p] = (F[F_DEMAND_B] - F0[F_DEMAND_B]) + (F[F_PF_B] - F0[F_PF_B])
        if counted[p]:
            CT += C - C0
            FT += F - F0
            PLT += PL - PL0
    return CT, PLT, FT, pass_time, pass_compute, pass_bytes


def _params(replay: Any, cfg: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from offload.cache import split_capacity
    from offload.policies import make_policy

    ps = replay.passes
    pol = make_policy(cfg.policy, **cfg.policy_params)
    ip = np.zeros(N_IPARAMS, dtype=np.int64)
    ip[P_POLICY] = POLICY_CODES[cfg.policy]
    ip[P_CAPACITY] = replay.capacity_slots
    ip[P_PER_LAYER] = cfg.cache == "per-layer"
    ip[P_PROTECT] = cfg.protect_layer
    ip[P_DROP] = cfg.miss == "drop"
    ip[P_DROP_FROM] = cfg.drop_from_rank
    ip[P_LFU_CACHE_SCOPE] = getattr(pol, "scope", "run") == "cache"
    ip[P_LS_REVERSE] = getattr(pol, "layer_order", "fifo") == "reverse"
    ip[P_LS_LEFT_FIRST] = getattr(pol, "left_first", True)
    ip[P_LS_PREFILL_LEFT_STALE] = getattr(pol, "prefill_left_is_stale", False)
    ip[P_LS_PREFETCH_CURRENT] = getattr(pol, "prefetch_evicts_current", False)
    ip[P_FLD_CYCLIC] = getattr(pol, "cyclic", True)
    ip[P_LS_AGE] = getattr(pol, "stale_order", "age") == "age"
    ip[P_LOOKAHEAD] = replay.forecast.lookahead if replay.forecast is not None else 0
    if cfg.cache == "per-layer":
        layer_cap = np.asarray(split_capacity(replay.capacity_slots, ps.num_layers), dtype=np.int64)
    else:
        layer_cap = np.zeros(ps.num_layers, dtype=np.int64)
    hw = replay.hardware
    fp = np.array([hw.tflops, hw.hbm_gbps, hw.layer_us, hw.token_us, hw.expert_us, replay.bytes_per_param])
    return ip, layer_cap, fp


def kernel_args(replay: Any, cfg: Any, counted: np.ndarray | None = None) -> tuple:
    """The positional arguments of :func:`replay_kernel` for one configuration."""
    ps = replay.passes
    ip, layer_cap, fp = _params(replay, cfg)
    if cfg.policy == "belady":
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
    else:
        fc_ptr, fc_expert = np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64)
        fc_selected, fc_covered = np.zeros(0, dtype=np.int64), np.zeros((ps.num_layers, 1), dtype=np.bool_)
    link_bytes = np.asarray(replay.link_bytes, dtype=np.float64)
    copy_s = link_bytes / replay.hardware.link_bytes_per_s
    pcost = np.array([replay.predictor_cost(int(n)) if fc is not None else 0.0 for n in ps.pass_tokens])
    if counted is None:
        counted = np.ones(ps.num_passes, dtype=np.bool_)
    return (ps.num_layers, ps.num_experts, ps.phase, ps.pass_tokens, ps.layer_ptr, ps.expert, ps.score,
            ps.best_rank, ps.tokens, next_use, sorted_keys, order, fc_ptr, fc_expert, fc_selected, fc_covered, ip,
            layer_cap, copy_s, replay.layer_bytes.astype(np.float64), link_bytes, fp, pcost, counted)


def simulate_fast(replay: Any, cfg: Any) -> dict[str, Any]:
    from offload.counters import Counters
    from offload.simulator import _counted_passes, _result, _Tally

    ps = replay.passes
    counted = _counted_passes(replay, cfg)
    C, plc, F, pass_time, pass_compute, pass_bytes = replay_kernel(*kernel_args(replay, cfg, counted))
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
    tally = _Tally(counters=c, collisions=plc[3].copy(), prefill_times=pass_time[pre].tolist(),
                   decode_times=pass_time[dec].tolist(), prefill_compute=pass_compute[pre].tolist(),
                   decode_compute=pass_compute[dec].tolist(), prefill_bytes=float(pass_bytes[pre].sum()),
                   decode_bytes=float(pass_bytes[dec].sum()))
    return _result(replay, cfg, tally, counted)
