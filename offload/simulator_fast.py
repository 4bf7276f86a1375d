"""numba kernels of the simulator: the same replay as :func:`offload.simulator.simulate_reference`.

Covers the policies lru, fifo, lfu (and lhu, which is LFU without a precision cascade), fld,
score, belady and least_stale, with fetch or drop miss handling, standard routing, any forecast
(prefetch), global or per-layer caches and the timing model. Substitution, cache-aware routing and
random eviction run on the reference loop.

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
    return cfg.policy in POLICY_CODES and cfg.miss in ("fetch", "drop") and cfg.routing == "standard"


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
    if mode == 0:
        return pin[k] != token
    if mode == 1:
        return served[k] == token
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


@nb.njit(cache=True)
def replay_kernel(L, E, phase, ptok, layer_ptr, expert, score, best_rank, ntok, next_use,
                  sorted_keys, sorted_pos, fc_ptr, fc_expert, ip, layer_cap, copy_s, layer_bytes, fp):
    """Replay all passes. Returns (int counters, per-layer int counters (4, L), floats, pass times)."""
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
    evicted_pass = np.full(N, -1, dtype=np.int64)
    unused_pf = np.zeros(N, dtype=np.bool_)
    arrival = np.zeros(N, dtype=np.float64)
    n_res_layer = np.zeros(L, dtype=np.int64)
    n_res = 0

    per_layer_counts = np.zeros((4, L), dtype=np.int64)  # accesses, hits, misses, collisions
    evictions = 0
    pf_issued = 0
    pf_used = 0
    dropped = 0
    late = 0
    clock = 0
    token = 0
    link_free = 0.0
    t = 0.0
    stall = 0.0
    pf_bytes = 0.0
    pass_time = np.zeros(P, dtype=np.float64)
    run_key = np.zeros(N + 1, dtype=np.int64)
    run_ready = np.zeros(N + 1, dtype=np.float64)
    run_tok = np.zeros(N + 1, dtype=np.int64)

    for p in range(P):
        is_prefill = phase[p] == 0
        t0 = t
        for layer in range(L):
            token += 1
            a = layer_ptr[p * L + layer]
            b = layer_ptr[p * L + layer + 1]
            if protect:
                for i in range(a, b):
                    pin[layer * E + expert[i]] = token
            t += (fp[F_LAYER_US] + fp[F_TOKEN_US] * ptok[p]) * 1e-6
            nrun = 0
            # ---------------- demand accesses, rank order
            for i in range(a, b):
                k = layer * E + expert[i]
                per_layer_counts[0, layer] += 1
                served[k] = token
                if resident[k]:
                    per_layer_counts[1, layer] += 1
                    if unused_pf[k]:
                        unused_pf[k] = False
                        pf_used += 1
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
                    ready = arrival[k]
                    if ready > t:
                        late += 1
                    run_key[nrun] = k
                    run_ready[nrun] = ready
                    run_tok[nrun] = ntok[i]
                    nrun += 1
                    continue
                per_layer_counts[2, layer] += 1
                if evicted_pass[k] == p:
                    per_layer_counts[3, layer] += 1
                if drop and best_rank[i] >= drop_from:
                    dropped += 1
                    continue
                # demand insert
                full = n_res_layer[layer] >= layer_cap[layer] if per_layer else n_res >= capacity
                if full:
                    v = -1
                    for mode in range(3):
                        v = _victim(mode, False, layer, layer, p, is_prefill, token, ip, L, E,
                                    head, nxt, stamp, last_pass, count, total, nextuse, pin, served)
                        if v >= 0:
                            break
                    _drop(v, glob, L, E, p, prv, nxt, head, tail, resident, n_res_layer, evicted_pass, unused_pf)
                    n_res -= 1
                    evictions += 1
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
                start = t if t > link_free else link_free
                link_free = start + copy_s[layer]
                arrival[k] = link_free
                run_key[nrun] = k
                run_ready[nrun] = link_free
                run_tok[nrun] = ntok[i]
                nrun += 1
            # ---------------- forecasts for layers l+1..l+D
            if D > 0:
                nxt_pos = layer_ptr[p * L + layer + 1]
                for d in range(1, D + 1):
                    target = layer + d
                    if target >= L:
                        break
                    fi = (p * L + layer) * D + d - 1
                    s0 = fc_ptr[fi]
                    s1 = fc_ptr[fi + 1]
                    if policy == LS:
                        for j in range(s0, s1):
                            k2 = target * E + fc_expert[j]
                            if resident[k2]:
                                clock += 1
                                stamp[k2] = clock
                                last_pass[k2] = p
                                _unlink(k2, target, prv, nxt, head, tail)
                                _append(k2, target, prv, nxt, head, tail)
                    for j in range(s0, s1):
                        k2 = target * E + fc_expert[j]
                        if resident[k2]:
                            continue
                        full = n_res_layer[target] >= layer_cap[target] if per_layer else n_res >= capacity
                        if full:
                            v = _victim(0, True, target, layer, p, is_prefill, token, ip, L, E,
                                        head, nxt, stamp, last_pass, count, total, nextuse, pin, served)
                            if v < 0:
                                continue
                            _drop(v, glob, L, E, p, prv, nxt, head, tail, resident, n_res_layer, evicted_pass,
                                  unused_pf)
                            n_res -= 1
                            evictions += 1
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
                        pf_issued += 1
                        unused_pf[k2] = True
                        start = t if t > link_free else link_free
                        link_free = start + copy_s[target]
                        arrival[k2] = link_free
                        pf_bytes += layer_bytes[target]
            # ---------------- run the layer's experts
            for r in range(nrun):
                if run_ready[r] > t:
                    stall += run_ready[r] - t
                    t = run_ready[r]
                if run_tok[r] == 1:
                    t += et1[run_key[r] // E]
                else:
                    t += _expert_time(layer_bytes[run_key[r] // E], run_tok[r], fp)
        pass_time[p] = t - t0
    ints = np.array([evictions, pf_issued, pf_used, dropped, late], dtype=np.int64)
    floats = np.array([stall, pf_bytes], dtype=np.float64)
    return ints, per_layer_counts, floats, pass_time


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


def kernel_args(replay: Any, cfg: Any) -> tuple:
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
    fc_ptr = fc.ptr if fc is not None else np.zeros(1, dtype=np.int64)
    fc_expert = fc.expert if fc is not None else np.zeros(0, dtype=np.int32)
    copy_s = replay.layer_bytes / replay.hardware.link_bytes_per_s
    return (ps.num_layers, ps.num_experts, ps.phase, ps.pass_tokens, ps.layer_ptr, ps.expert, ps.score,
            ps.best_rank, ps.tokens, next_use, sorted_keys, order, fc_ptr, fc_expert, ip, layer_cap,
            copy_s, replay.layer_bytes.astype(np.float64), fp)


def simulate_fast(replay: Any, cfg: Any) -> dict[str, Any]:
    from offload.simulator import _result

    ps = replay.passes
    ints, plc, floats, pass_time = replay_kernel(*kernel_args(replay, cfg))
    return _result(
        replay, cfg,
        accesses=int(plc[0].sum()), hits=int(plc[1].sum()), misses=int(plc[2].sum()),
        collision_per_layer=plc[3].copy(), evictions=int(ints[0]), prefetch_issued=int(ints[1]),
        prefetch_used=int(ints[2]), prefetch_bytes=float(floats[1]), dropped=int(ints[3]),
        substituted=0, late=int(ints[4]), stall=float(floats[0]),
        prefill_times=pass_time[ps.phase == 0].tolist(), decode_times=pass_time[ps.phase == 1].tolist(),
    )
