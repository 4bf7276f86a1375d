"""The eviction-policy interface shared by the simulator and the real engine.

A policy never owns memory: :class:`offload.cache.ExpertCache` decides *when* something must go and
asks the policy *which* key. The cache notifies the policy of everything that happens, in this order
inside a pass::

    on_pass_start(pass_index, phase)          a new forward pass (prefill of a prompt, or one decode step)
    on_layer_start(layer)                     the execution point moves to ``layer``
    on_insert(key, prefetch, hint)            a key became resident (demand fetch or prefetch)
    on_access(key, score, hint)               a demand access (a hit, or the access right after its miss insert)
    on_served(key, precision)                 ... and the precision that access ran at (right after on_access)
    on_predicted(key)                         a resident key was forecast for this pass (Least-Stale: "current")
    on_forecast(layer, experts, p_use, rest)  the whole ranked forecast of a layer ahead, with P(use)
    on_evict(key)                             a key left the cache
    on_advice(key, info)                      side information about a key, outside any access

and, when the cache is full, :meth:`EvictionPolicy.victim` picks the key to throw out among those
``eligible`` says may go (the experts of the running layer are protected; a per-layer partitioned
cache only offers keys of the inserted key's layer).

**Side information** (e.g. a forecast eviction policy that wants a predicted next-use distance per
key): callers pass any object as ``hint=`` to ``ExpertCache.access``/``ExpertCache.insert`` and it
reaches ``on_access``/``on_insert`` untouched; ``ExpertCache.advise(key, info)`` delivers updates
for resident keys between accesses. Policies that do not care ignore both, so adding such a policy
never changes the cache interface. Belady uses exactly this channel: the simulator passes the
global index of the key's next demand access as ``hint``.

Every policy breaks ties by *least recently touched* (touch = insert or demand access), so the
readable Python policies and their compiled twins choose the same victim on every eviction.

**Compiled twin**: below its class, a policy file declares the same policy as numba functions
(``Cls.kernel = PolicyKernel(...)``, :mod:`offload.policies.compiled`) and the class builds their
state from its parameters in :meth:`EvictionPolicy.kernel_state`. The simulator's fast path
(:mod:`offload.simulator_fast`) compiles one replay per declaration; a test replays every registered
policy through both and asserts identical results.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from offload.policies.compiled import KernelContext, PolicyKernel

Key = tuple[int, int]  # (layer, expert)
Eligible = Callable[[Key], bool]

PREFILL, DECODE = 0, 1


class EvictionPolicy(ABC):
    """Choose which resident expert to evict. Subclasses override the hooks they need."""

    #: name on the command line
    name: ClassVar[str]
    #: True when the policy needs ``hint`` = next-use index on every insert/access (simulator only)
    needs_future: ClassVar[bool] = False
    #: the compiled twin, declared below the class in its file (None: the simulator replays it in Python)
    kernel: ClassVar[PolicyKernel | None] = None

    def __init__(self) -> None:
        self.num_layers = 0
        self.num_experts = 0
        self.bind(1, 1)

    # ------------------------------------------------------------------ lifecycle
    def bind(self, num_layers: int, num_experts: int) -> None:
        """Size the policy for a model and forget all state (called by the cache)."""
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.pass_index = -1
        self.phase = DECODE
        self.layer = 0  # execution point
        self.clock = 0
        self.stamp: dict[Key, int] = {}  # last touch time of each resident key
        # per layer, resident keys in touch order (oldest first): O(1) oldest-per-layer lookups
        self.order: list[OrderedDict[Key, None]] = [OrderedDict() for _ in range(num_layers)]

    def on_pass_start(self, pass_index: int, phase: int) -> None:
        self.pass_index = pass_index
        self.phase = phase
        self.layer = 0

    def on_layer_start(self, layer: int) -> None:
        self.layer = layer

    def on_insert(self, key: Key, *, prefetch: bool, hint: Any = None) -> None:
        self._touch(key)

    def on_access(self, key: Key, *, score: float = 0.0, hint: Any = None) -> None:
        self._touch(key)

    def on_served(self, key: Key, precision: str) -> None:
        """The demand access just reported ran ``key`` at ``precision`` (``native``, ``int8``, ``int4``,
        ``int2``: offload.quantization); a substitute's use is reported too. Ignored by default."""
        return None

    def on_predicted(self, key: Key) -> None:
        """A resident key was selected by the prefetcher/predictor for this pass (ignored by default)."""
        return None

    def on_forecast(self, layer: int, experts: Any, p_use: Any, rest: float) -> None:
        """The ranked forecast for ``layer`` in this pass: ``p_use[i]`` = P(``experts[i]`` is needed),
        ``rest`` = P(an unlisted expert is). Ignored by default."""
        return None

    def reuse_probability(self, key: Key) -> float | None:
        """P(resident ``key`` is needed at its next opportunity), for policies that estimate it."""
        return None

    def on_evict(self, key: Key) -> None:
        del self.stamp[key]
        del self.order[key[0]][key]

    def on_advice(self, key: Key, info: Any) -> None:
        """Side information about ``key`` outside an access (ignored by default)."""
        return None

    @abstractmethod
    def victim(self, eligible: Eligible, *, for_prefetch: bool = False) -> Key | None:
        """The key to evict among eligible resident keys, or None when none may go.

        ``for_prefetch`` is True when the space is wanted for a prefetch rather than a demand miss;
        a policy may refuse (return None) to evict for a mere guess.
        """

    # ------------------------------------------------------------------ helpers
    def _touch(self, key: Key) -> None:
        self.clock += 1
        self.stamp[key] = self.clock
        od = self.order[key[0]]
        od[key] = None
        od.move_to_end(key)

    def resident(self) -> Iterator[Key]:
        for od in self.order:
            yield from od

    def _oldest(self, eligible: Eligible, layers: range | list[int] | None = None) -> Key | None:
        """The least recently touched eligible key (the heads of the per-layer touch orders)."""
        best: Key | None = None
        best_stamp = 0
        for layer in range(self.num_layers) if layers is None else layers:
            for key in self.order[layer]:
                if eligible(key):
                    if best is None or self.stamp[key] < best_stamp:
                        best, best_stamp = key, self.stamp[key]
                    break
        return best

    def _min_by(self, priority: Callable[[Key], float], eligible: Eligible) -> Key | None:
        """The eligible key with the lowest ``priority``; ties go to the least recently touched."""
        best: Key | None = None
        best_p = (0.0, 0)
        for key in self.resident():
            if not eligible(key):
                continue
            p = (priority(key), self.stamp[key])
            if best is None or p < best_p:
                best, best_p = key, p
        return best

    def describe(self) -> dict[str, Any]:
        """Parameters recorded in results."""
        return {"policy": self.name}

    # ------------------------------------------------------------------ compiled twin
    def kernel_state(self, ctx: KernelContext) -> Any:
        """The state of the compiled hooks (a NamedTuple), built from this instance's parameters."""
        raise NotImplementedError(f"{self.name} declares no compiled twin")

    def kernel_supported(self) -> bool:
        """Whether the compiled twin covers this instance's parameters (e.g. its forecaster)."""
        return self.kernel is not None
