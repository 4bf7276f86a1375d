"""The offloaded inference engine: an HF MoE model whose experts live off the device.

Figure 2 of SpecMD, in this code:

- **main loop**: the model's own forward; every MoE block's forward is replaced by
  :meth:`OffloadEngine._moe_forward`, which routes (routing policy), looks every needed expert up in
  the shared :class:`offload.cache.ExpertCache` (same cache and eviction policies as the simulator),
  applies the miss handler, and computes the experts from device slots.
- **prefetch loop**: at layer ``l`` the predictor reads the real MoE input and forecasts layers
  ``l+1 .. l+D``; the prefetcher turns scores into keys; the cache admits them (evicting only what
  the policy allows for a prefetch, never an expert the running layer needs: the cache pins them).
- **watchdog**: :class:`offload.engine.copier.ThrottledCopier` moves the bytes over the emulated
  link, demand copies before prefetches.

All cache decisions (which key goes to which slot, which key is evicted) are taken on the main
thread, in the order the simulator takes them, so with demand fetch the engine's hits and misses are
exactly the simulator's. Only the copies run concurrently. A slot whose key was evicted while its
copy was still queued gets that copy cancelled; a copy already on the link finishes before the next
one starts (the link is serial), so a slot is never written by two copies at once.

Hit accounting: an access is a *hit* when the key is resident in the cache directory, including a
prefetch still on the link (the simulator counts those as hits too); the wait for such a late
prefetch is counted as ``late_prefetch`` and as stall time.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from data_pipeline.adapters import get_adapter
from data_pipeline.errors import UserError
from offload.cache import ExpertCache
from offload.engine.copier import DEMAND, PREFETCH, QUEUED, CopyJob, ThrottledCopier
from offload.engine.device_pool import DevicePool
from offload.engine.expert_store import HostExpertStore
from offload.engine.generate import Generation, greedy_generate
from offload.engine.metrics import Counters
from offload.engine.moe_layer import add_expert_output, replace_forward, restore_forward
from offload.policies import make_policy
from offload.policies.base import Key
from predictors.base import PredictContext, Predictor


@dataclass
class EngineConfig:
    """Everything that decides how the engine behaves (the CLI fills it)."""

    capacity_slots: int
    policy: str = "least_stale"
    policy_params: dict[str, Any] = field(default_factory=dict)
    bandwidth: float | None = 5e9  # bytes/s of the emulated host->device link; None: unthrottled
    routing: str = "standard"
    routing_params: dict[str, Any] = field(default_factory=dict)
    miss: str = "fetch"
    miss_params: dict[str, Any] = field(default_factory=dict)
    prefetch: str = "topk"  # how forecast scores become prefetches (offload.prefetch)
    prefetch_params: dict[str, Any] = field(default_factory=dict)
    partition: str = "global"
    device: str = "cpu"


def layer_accesses(ids: torch.Tensor, weights: torch.Tensor) -> list[tuple[int, float]]:
    """The (expert, score) accesses of one layer, in the order the cache sees them.

    One access per distinct expert; score = its summed routing weight over the tokens. Order: score
    descending, ties by expert id, so a decode step (one token) is plain rank order. Negative ids
    mark dropped slots and are skipped.
    """
    ids_cpu = ids.reshape(-1).tolist()
    w_cpu = weights.reshape(-1).float().tolist()
    total: dict[int, float] = {}
    for e, w in zip(ids_cpu, w_cpu, strict=True):
        if e >= 0:
            total[e] = total.get(e, 0.0) + w
    return sorted(total.items(), key=lambda item: (-item[1], item[0]))


def clone_loaded(loaded: Any) -> Any:
    """A deep copy of a ``LoadedModel`` with its own adapter: the engine releases the expert weights
    of the model it wraps, so a plain reference and an engine never share one."""
    model = copy.deepcopy(loaded.model)
    return dataclasses.replace(loaded, model=model, adapter=get_adapter(model))


class OffloadEngine:
    """Runs ``loaded.model`` with experts in a host tier and ``capacity_slots`` device slots."""

    def __init__(self, loaded: Any, config: EngineConfig, predictor: Predictor | None = None):
        self.loaded = loaded
        self.adapter = adapter = loaded.adapter
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda requested but no CUDA GPU is available")
        if config.bandwidth is not None and not config.bandwidth > 0:
            raise UserError(f"bandwidth must be positive, got {config.bandwidth} bytes/s")
        self.num_layers, self.num_experts, self.top_k = adapter.num_layers, adapter.num_experts, adapter.top_k
        if config.capacity_slots < self.top_k:
            raise UserError(
                f"capacity of {config.capacity_slots} expert slots is below one layer's top-k "
                f"({self.top_k}): the engine could not hold the experts of a single token; raise --capacity"
            )
        if config.capacity_slots > self.num_layers * self.num_experts:
            config.capacity_slots = self.num_layers * self.num_experts
        if predictor is not None and (predictor.num_layers, predictor.num_experts) != (
            self.num_layers, self.num_experts
        ):
            raise UserError(
                f"the predictor was built for {predictor.num_layers} layers x {predictor.num_experts} experts, "
                f"the model has {self.num_layers} x {self.num_experts}"
            )
        self.predictor = predictor
        self.store = HostExpertStore(adapter, pin=self.device.type == "cuda")
        loaded.model.to(self.device)
        self.pool = DevicePool(config.capacity_slots, self.store.template, self.device)
        self.cache = ExpertCache(
            self.num_layers, self.num_experts, config.capacity_slots,
            make_policy(config.policy, **config.policy_params), partition=config.partition,
        )
        self._routing = _make_routing(config)
        self._miss = _make_miss_handler(config)
        self._prefetcher = _make_prefetcher(config, self.top_k) if predictor is not None else None
        self.copier = ThrottledCopier(config.bandwidth, self.device)
        self.counters = Counters()
        self._jobs: dict[Key, CopyJob] = {}
        self._unused_prefetch: set[Key] = set()
        self._chosen: list[torch.Tensor] = []  # this pass: (T, K) ids per layer run so far
        self._previous: torch.Tensor | None = None  # (1, L, K) the previous token's experts
        self._closed = False
        for layer in range(self.num_layers):
            replace_forward(adapter.moe_block(layer), self._block_forward(layer))

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the watchdog and give the MoE blocks their own forward back (weights stay released)."""
        if self._closed:
            return
        self._closed = True
        self.copier.close()
        for layer in range(self.num_layers):
            restore_forward(self.adapter.moe_block(layer))

    def __enter__(self) -> OffloadEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def capacity_slots(self) -> int:
        return self.cache.capacity

    def begin_pass(self, phase: int) -> None:
        """A new forward pass: prefill (0) or one decode step (1)."""
        if len(self._chosen) == self.num_layers:
            self._previous = torch.stack([ids[-1:] for ids in self._chosen], dim=1)  # last token
        self._chosen = []
        self.cache.begin_pass(phase)

    def reset_sequence(self) -> None:
        """Forget the previous token (a new prompt starts); the cache keeps its contents."""
        self._chosen = []
        self._previous = None

    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None,
        keep_logits: bool = False,
    ) -> Generation:
        self.reset_sequence()
        return greedy_generate(
            self.loaded.model, input_ids, max_new_tokens, eos_token_id=eos_token_id,
            keep_logits=keep_logits, before_pass=self.begin_pass,
        )

    # ------------------------------------------------------------------ the MoE block
    def _block_forward(self, layer: int):
        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            return self._moe_forward(layer, hidden_states)

        return forward

    def _moe_forward(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        route = self.adapter.route(layer, x)
        ids, weights = self._routing(self, layer, route)
        ids, weights, fetch = self._miss(self, layer, ids, weights)
        self._chosen.append(ids)
        accesses = layer_accesses(ids, weights)
        needed = [(layer, e) for e, _ in accesses]
        self.cache.begin_layer(layer, needed)
        out = torch.zeros_like(x)
        streaming = len(needed) > self._room_for(layer)
        if not streaming:
            # all accesses first: every demand copy is queued before the first expert computes, so
            # copies overlap compute; the cache pins ``needed``, so none of them evicts another
            for e, score in accesses:
                self._access((layer, e), score, fetch=(layer, e) in fetch)
            self._prefetch(layer, x)
            for e in sorted(e for e, _ in accesses):  # HF's order: bit-identical accumulation
                self._compute(out, x, ids, weights, layer, e)
        else:
            # a long prompt needs more experts at this layer than there are slots: take them one by
            # one, compute each right after its access (the cache may then evict it for the next)
            for e, score in accesses:
                self._access((layer, e), score, fetch=(layer, e) in fetch)
                self._compute(out, x, ids, weights, layer, e)
            self._prefetch(layer, x)
        shared = self.adapter.shared_forward(layer, x)
        if shared is not None:
            out = out + shared
        return out.reshape(shape)

    def _room_for(self, layer: int) -> int:
        if self.cache.layer_capacity is not None:
            return self.cache.layer_capacity[layer]
        return self.cache.capacity

    def _compute(self, out, x, ids, weights, layer: int, expert: int) -> None:
        key = (layer, expert)
        slot = self.cache.slot_of(key)
        if slot is None:  # not fetched (dropped miss): contributes nothing
            return
        self._wait(key)
        add_expert_output(out, x, ids, weights, expert, self.pool.slot(slot), self.adapter.expert_forward)

    # ------------------------------------------------------------------ cache events
    def _access(self, key: Key, score: float, *, fetch: bool) -> None:
        c = self.counters
        r = self.cache.access(key, score, fetch=fetch)
        c.accesses += 1
        if r.evicted is not None:
            self._on_evicted(r.evicted)
        if r.hit:
            c.hits += 1
            if r.first_use_of_prefetch:
                c.prefetch_used += 1
                self._unused_prefetch.discard(key)
            job = self._jobs.get(key)
            if job is not None and not job.is_ready():
                c.late_prefetch += 1
                self.copier.promote(job)
            return
        c.misses += 1
        c.collision_misses += int(r.collision)
        if r.slot >= 0:
            self._submit(key, r.slot, DEMAND)

    def _submit(self, key: Key, slot: int, priority: int) -> None:
        job = CopyJob(
            key=key, slot=slot, src=self.store.expert(*key), dst=self.pool.slot(slot),
            nbytes=self.store.expert_nbytes, priority=priority,
        )
        self._jobs[key] = self.copier.submit(job)
        self.counters.bytes_copied += job.nbytes

    def _on_evicted(self, key: Key) -> None:
        self.counters.evictions += 1
        job = self._jobs.pop(key, None)
        if job is not None and job.state == QUEUED and self.copier.cancel(job):
            self.counters.bytes_copied -= job.nbytes
        if key in self._unused_prefetch:
            self._unused_prefetch.discard(key)
            self.counters.prefetch_wasted += 1

    def _wait(self, key: Key) -> None:
        job = self._jobs.get(key)
        if job is None:
            return
        if not job.is_ready():
            t0 = time.perf_counter()
            self.copier.promote(job)
            job.wait()
            self.counters.stall_s += time.perf_counter() - t0
        del self._jobs[key]

    # ------------------------------------------------------------------ prefetch loop
    def _context(self, layer: int, x: torch.Tensor) -> PredictContext | None:
        assert self.predictor is not None
        needs = self.predictor.needs
        previous = None
        if "previous" in needs:
            if self._previous is None or x.shape[0] != 1:
                return None  # a prompt's first pass has no previous token at every layer
            previous = self._previous
        chosen = torch.stack(self._chosen, dim=1) if "chosen" in needs else None
        return PredictContext(layer=layer, hidden=x if "hidden" in needs else None, chosen=chosen,
                              previous=previous)

    def _prefetch(self, layer: int, x: torch.Tensor) -> None:
        if self.predictor is None or self._prefetcher is None or layer + 1 >= self.num_layers:
            return
        ctx = self._context(layer, x)
        if ctx is None:
            return
        scores = self.predictor.predict(ctx)  # (T, D, E)
        keys = self._prefetcher(scores, layer, self.predictor)
        self.cache.mark_predicted(keys)
        protected = frozenset(self._jobs_in_flight())
        for key in keys:
            if key in self.cache:
                continue
            ins = self.cache.insert(key, prefetch=True, protected=protected)
            if ins is None:
                break  # the policy refuses to evict for a guess: no room for the rest either
            if ins.evicted is not None:
                self._on_evicted(ins.evicted)
            self._unused_prefetch.add(key)
            self.counters.prefetch_issued += 1
            self._submit(key, ins.slot, PREFETCH)

    def _jobs_in_flight(self) -> Sequence[Key]:
        """Keys whose prefetch copy is still under way: a later prefetch must not undo them."""
        return [k for k, j in self._jobs.items() if not j.is_ready()]


# ---------------------------------------------------------------------- policy plumbing
def _make_routing(config: EngineConfig):
    def standard(engine: OffloadEngine, layer: int, route: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return route.ids, route.weights

    return standard


def _make_miss_handler(config: EngineConfig):
    def fetch(engine: OffloadEngine, layer: int, ids: torch.Tensor, weights: torch.Tensor):
        return ids, weights, {(layer, int(e)) for e in ids.unique().tolist()}

    return fetch


def _make_prefetcher(config: EngineConfig, top_k: int):
    def topk(scores: torch.Tensor, layer: int, predictor: Predictor) -> list[Key]:
        keys: list[Key] = []
        per_layer = max(1, round(top_k * float(config.prefetch_params.get("factor", 1.0))))
        mean = scores.float().mean(dim=0)  # (D, E)
        for d in range(mean.shape[0]):
            if not predictor.covers(layer, d + 1):
                continue
            top = torch.topk(mean[d], per_layer).indices.tolist()
            keys.extend((layer + d + 1, int(e)) for e in top)
        return keys

    return topk
