"""The compiled half of an eviction policy: the contract with the numba replay, and its building blocks.

A policy file holds its Python class and, below it, the same policy as numba functions; the class
names them in one declaration, ``PolicyKernel``::

    LRU.kernel = PolicyKernel(on_insert=touch_insert, on_access=touch_access, on_evict=touch_evict,
                              victim=oldest_victim)

and builds their state from its own parameters in ``kernel_state(ctx)`` (a NamedTuple of arrays and
scalars), so a parameter is declared once, in the constructor. :mod:`offload.simulator_fast`
compiles one replay kernel per ``PolicyKernel`` with these functions called where
:class:`offload.step.LayerStep` calls the Python hooks, in the same order:

=====================================================  =================================================
compiled hook (``st`` = the policy's state)              Python hook it mirrors
=====================================================  =================================================
``on_pass_start(st, pass_index, phase)``                 ``on_pass_start``
``on_layer_start(st, layer)``                            ``on_layer_start``
``on_insert(st, k, prefetch, hint, clock)``              ``on_insert`` (demand miss or prefetch)
``on_access(st, k, score, hint, clock)``                 ``on_access`` (a hit, or right after the insert)
``on_predicted(st, k, clock)``                           ``on_predicted``
``on_forecast(st, layer, experts, p_use, rest)``         ``on_forecast``
``on_evict(st, k)``                                      ``on_evict`` (also a cancelled prefetch)
``victim(st, el, for_prefetch) -> k or -1``              ``victim``
=====================================================  =================================================

Keys are dense, ``k = layer * E + expert``. ``hint`` is the next demand access index (``NEVER``
when none) for a policy whose class sets ``needs_future``, else 0. ``clock`` grows at every hook
call that may touch a key: a policy stores it as the touch stamp that breaks its ties (least
recently touched first), exactly as ``EvictionPolicy._touch`` does with its own clock. Hooks left
``None`` are not called (like the Python defaults, they ignore the event). ``el`` says which
keys may go (:class:`Allowed`, :func:`allowed`): the compiled twin of the ``eligible`` callable.

The building blocks below are the compiled twins of the helpers of :mod:`offload.policies.base`:
``Touch`` lists (touch order per list, ``_oldest``) and an indexed ``Heap`` keyed on (priority,
stamp) (``_min_by`` in O(log n) instead of a scan).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

import numba as nb
import numpy as np

#: How hooks and their helpers are compiled: inlined (at numba's IR level) into the replay kernel,
#: which runs without numba's reference counting (its arrays live as long as the replay). A call
#: would pass a state of many arrays as hundreds of scalar arguments, and counted references would
#: add atomic increments on every array read.
hook = nb.njit(_nrt=False, inline="always")


#: Every index of the replay (keys, slots, queue and heap positions) is below 2**62. numba adds a
#: negative-index wrap-around to every signed index it cannot prove non-negative (a compare, a select
#: and a reload of the array's length, which one kernel with ~60 live arrays keeps on the stack);
#: masking an index loaded from an array with this constant proves it to LLVM and the wrap-around
#: goes, at the cost of one AND. Never mask a value that may still be a -1 sentinel.
NONNEG = 0x3FFFFFFFFFFFFFFF


@hook
def nonneg(i: int) -> int:
    """``i`` (known >= 0), in a form LLVM knows is >= 0 (see :data:`NONNEG`)."""
    return i & NONNEG


@dataclass(frozen=True)
class KernelContext:
    """What a policy's compiled state is sized by."""

    num_layers: int
    num_experts: int
    top_k: int
    capacity: int  # slots (all of them; a per-layer cache splits them)
    per_layer: bool  # a partitioned cache: a victim must come from the inserted key's layer

    @property
    def num_keys(self) -> int:
        return self.num_layers * self.num_experts


@dataclass(frozen=True, eq=False)
class PolicyKernel:
    """A policy's compiled hooks (numba functions, see the module doc). Compared by identity: one
    compiled replay per declaration."""

    victim: Callable[..., int]
    on_insert: Callable[..., None] | None = None
    on_access: Callable[..., None] | None = None
    on_evict: Callable[..., None] | None = None
    on_pass_start: Callable[..., None] | None = None
    on_layer_start: Callable[..., None] | None = None
    on_predicted: Callable[..., None] | None = None
    on_forecast: Callable[..., None] | None = None

    def hooks(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def name(self) -> str:
        """The module that declares the hooks (``lru``, ``least_stale``, ...)."""
        return self.victim.py_func.__module__.rsplit(".", 1)[-1]  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------- eligibility
class Allowed(NamedTuple):
    """Which resident keys may be evicted now (``offload.cache.ExpertCache._choose_victim``).

    mode 0: not pinned by the running layer; 1: served at this layer already (demand, when every
    key is pinned); 2: anything; 3 (prefetch): neither pinned nor still to run at this layer
    (``served`` then holds the layer's runs). ``part``: the partition to search (0 for a global
    cache, the inserted key's layer for a per-layer cache).

    Pins, services and runs are marked with the running layer's ``token``, so in modes 0, 2 and 3
    every key of another layer is allowed and in mode 1 none is (policies may count on it).
    """

    mode: int
    token: int
    pin: np.ndarray
    served: np.ndarray
    part: int


@hook
def allowed(el: Allowed, k: int) -> bool:
    mode = el.mode
    if mode == 0:
        return el.pin[k] != el.token
    if mode == 1:
        return el.served[k] == el.token
    if mode == 3:
        return el.pin[k] != el.token and el.served[k] != el.token
    return True


# ---------------------------------------------------------------------------------- touch lists
class Touch(NamedTuple):
    """Resident keys in touch order (oldest first), in one or several doubly linked lists.

    ``lst[k]`` is the list of key ``k``: one list for a global LRU, one per layer where a policy ranks
    layers (Least-Stale, FLD) or the cache is partitioned. ``stamp[k]``: its last touch.
    """

    prv: np.ndarray
    nxt: np.ndarray
    head: np.ndarray
    tail: np.ndarray
    stamp: np.ndarray
    lst: np.ndarray


def touch_lists(ctx: KernelContext, per_layer: bool) -> Touch:
    """One list per layer when ``per_layer``, else one list for all keys."""
    n = ctx.num_keys
    lists = ctx.num_layers if per_layer else 1
    lst = np.arange(n, dtype=np.int64) // ctx.num_experts if per_layer else np.zeros(n, dtype=np.int64)
    return Touch(np.full(n, -1, dtype=np.int64), np.full(n, -1, dtype=np.int64), np.full(lists, -1, dtype=np.int64),
                 np.full(lists, -1, dtype=np.int64), np.zeros(n, dtype=np.int64), lst)


@hook
def touch_unlink(t: Touch, k: int) -> None:
    li = nonneg(t.lst[k])
    a, b = t.prv[k], t.nxt[k]
    if a >= 0:
        t.nxt[nonneg(a)] = b
    else:
        t.head[li] = b
    if b >= 0:
        t.prv[nonneg(b)] = a
    else:
        t.tail[li] = a
    t.prv[k] = -1
    t.nxt[k] = -1


@hook
def touch_append(t: Touch, k: int, clock: int) -> None:
    li = nonneg(t.lst[k])
    t.stamp[k] = clock
    last = t.tail[li]
    t.prv[k] = last
    t.nxt[k] = -1
    if last >= 0:
        t.nxt[nonneg(last)] = k
    else:
        t.head[li] = k
    t.tail[li] = k


@hook
def touch_again(t: Touch, k: int, clock: int) -> None:
    """``k`` (resident) was touched: it becomes the newest of its list."""
    t.stamp[k] = clock
    if t.tail[nonneg(t.lst[k])] != k:
        touch_unlink(t, k)
        touch_append(t, k, clock)


@hook
def touch_first(t: Touch, li: int, el: Allowed) -> int:
    """The least recently touched eligible key of list ``li``, or -1."""
    k = t.head[li]
    while k >= 0:
        k = nonneg(k)
        if allowed(el, k):
            return k
        k = t.nxt[k]
    return -1


# the whole compiled LRU (and FIFO without ``on_access``): ``st`` is a Touch whose lists are the
# cache's partitions (one global list, or one per layer), so the victim is the head of one list
@hook
def touch_insert(st: Touch, k: int, prefetch: bool, hint: int, clock: int) -> None:
    touch_append(st, k, clock)


@hook
def touch_access(st: Touch, k: int, score: float, hint: int, clock: int) -> None:
    touch_again(st, k, clock)


@hook
def touch_evict(st: Touch, k: int) -> None:
    touch_unlink(st, k)


@hook
def oldest_victim(st: Touch, el: Allowed, for_prefetch: bool) -> int:
    return touch_first(st, el.part, el)


# ---------------------------------------------------------------------------------- indexed heap
class Heap(NamedTuple):
    """Resident keys in binary min-heaps on (``prio``, ``stamp``), one heap per cache partition.

    ``items[q, :size[q]]`` is partition ``q``'s heap; ``pos[k]`` the place of key ``k`` in it.
    Stamps are unique, so the order is total and equals ``_min_by``'s (priority, then least
    recently touched).
    """

    items: np.ndarray
    size: np.ndarray
    pos: np.ndarray
    part: np.ndarray  # partition of every key (fixed)
    prio: np.ndarray
    stamp: np.ndarray
    stack: np.ndarray  # scratch for :func:`heap_min`


def key_heap(ctx: KernelContext) -> Heap:
    n = ctx.num_keys
    parts, cap = (ctx.num_layers, ctx.num_experts) if ctx.per_layer else (1, n)
    part = np.arange(n, dtype=np.int64) // ctx.num_experts if ctx.per_layer else np.zeros(n, dtype=np.int64)
    return Heap(np.zeros((parts, cap), dtype=np.int64), np.zeros(parts, dtype=np.int64), np.full(n, -1, dtype=np.int64),
                part, np.zeros(n, dtype=np.float64), np.zeros(n, dtype=np.int64), np.zeros(cap + 1, dtype=np.int64))


@hook
def _before(h: Heap, a: int, b: int) -> bool:
    pa = h.prio[a]
    pb = h.prio[b]
    return pa < pb or (pa == pb and h.stamp[a] < h.stamp[b])


@hook
def _sift_up(h: Heap, q: int, i: int) -> None:
    items = h.items
    k = nonneg(items[q, i])
    while i > 0:
        j = (i - 1) >> 1
        kj = nonneg(items[q, j])
        if not _before(h, k, kj):
            break
        items[q, i] = kj
        h.pos[kj] = i
        i = j
    items[q, i] = k
    h.pos[k] = i


@hook
def _sift_down(h: Heap, q: int, i: int) -> None:
    items = h.items
    n = h.size[q]
    k = nonneg(items[q, i])
    while True:
        c = 2 * i + 1
        if c >= n:
            break
        kc = nonneg(items[q, c])
        if c + 1 < n:
            kd = nonneg(items[q, c + 1])
            right = _before(h, kd, kc)  # a select, not a branch: which child is a coin toss
            c += right
            kc = kd if right else kc
        if not _before(h, kc, k):
            break
        items[q, i] = kc
        h.pos[kc] = i
        i = c
    items[q, i] = k
    h.pos[k] = i


@hook
def heap_push(h: Heap, k: int) -> None:
    """Add ``k`` (its ``prio`` and ``stamp`` set) to its partition's heap."""
    q = nonneg(h.part[k])
    i = h.size[q]
    h.size[q] = i + 1
    h.items[q, i] = k
    _sift_up(h, q, i)


@hook
def heap_update(h: Heap, k: int) -> None:
    """``k``'s ``prio`` or ``stamp`` changed: restore the heap order."""
    q = nonneg(h.part[k])
    _sift_up(h, q, nonneg(h.pos[k]))
    _sift_down(h, q, nonneg(h.pos[k]))


@hook
def heap_sink(h: Heap, k: int) -> None:
    """``k``'s (``prio``, ``stamp``) grew (a use: a count, a summed weight, and the touch stamp only
    grow): it can only move down."""
    _sift_down(h, nonneg(h.part[k]), nonneg(h.pos[k]))


@hook
def heap_remove(h: Heap, k: int) -> None:
    q = nonneg(h.part[k])
    i = nonneg(h.pos[k])
    n = h.size[q] - 1
    h.size[q] = n
    h.pos[k] = -1
    if i < n:
        last = nonneg(h.items[q, n])
        h.items[q, i] = last
        h.pos[last] = i
        _sift_up(h, q, i)
        _sift_down(h, q, nonneg(h.pos[last]))


@hook
def heap_min(h: Heap, q: int, el: Allowed) -> int:
    """The eligible key of partition ``q`` first in (prio, stamp) order, or -1.

    A depth-first walk that stops at eligible keys: only ineligible keys (the running layer's, a
    handful) are looked past, so it is usually the root.
    """
    n = h.size[q]
    if n == 0:
        return -1
    items = h.items
    stack = h.stack
    stack[0] = 0
    top = 1
    best = -1
    while top > 0:
        top -= 1
        i = nonneg(stack[top])
        k = nonneg(items[q, i])
        if best >= 0 and not _before(h, k, best):
            continue  # k's subtree comes after best
        if allowed(el, k):
            best = k
            continue
        c = 2 * i + 1
        if c < n:
            stack[top] = c
            top += 1
            if c + 1 < n:
                stack[top] = c + 1
                top += 1
    return best


# hooks of every policy whose state keeps its resident keys in ``st.heap`` (LFU, score, Belady)
@hook
def heap_victim(st: Any, el: Allowed, for_prefetch: bool) -> int:
    return heap_min(st.heap, el.part, el)


@hook
def heap_evict(st: Any, k: int) -> None:
    heap_remove(st.heap, k)
