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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
from offload.engine.trace import TraceRecorder
from offload.miss_handling import MissHandling
from offload.policies import make_policy
from offload.policies.base import Key
from offload.prefetch import PercentileSelection, Selection, TopKSelection
from offload.routing import ROUTINGS, CacheAwareRouter
from predictors.base import PredictContext, Predictor


@dataclass
class EngineConfig:
    """Everything that decides how the engine behaves (the CLI fills it)."""

    capacity_slots: int
    policy: str = "least_stale"
    policy_params: dict[str, Any] = field(default_factory=dict)
    bandwidth: float | None = 5e9  # bytes/s of the emulated host->device link; None: unthrottled
    routing: str = "standard"  # or "cache-aware" (offload.routing)
    routing_lambda: float = 0.3
    miss: str = "fetch"  # fetch | drop | substitute (offload.miss_handling)
    drop_from_rank: int = 2
    substitute_tolerance: float = 0.05
    prefetch: str = "topk"  # how forecast scores become prefetches: topk (x overfetch) or score (percentile)
    prefetch_params: dict[str, Any] = field(default_factory=dict)
    partition: str = "global"
    device: str = "cpu"


def layer_accesses(ids: torch.Tensor, weights: torch.Tensor) -> list[tuple[int, float, int]]:
    """The (expert, score, best rank) accesses of one layer, in the order the cache sees them.

    One access per distinct expert; score = its routing weight summed over the tokens. Order: score
    descending, ties by best rank then expert id, so a decode step (one token) is plain rank order.
    This is exactly :func:`offload.passes.build_passes`' order, which is what makes the engine's
    hits and misses replayable by the simulator. Negative ids mark dropped slots and are skipped.
    """
    K = ids.shape[-1]
    flat_ids = ids.reshape(-1).tolist()
    flat_w = weights.reshape(-1).float().tolist()
    total: dict[int, float] = {}
    best: dict[int, int] = {}
    for i, (e, w) in enumerate(zip(flat_ids, flat_w, strict=True)):
        if e >= 0:
            total[e] = total.get(e, 0.0) + w
            best[e] = min(best.get(e, K), i % K)
    # float32 like the store's score column, so near-ties break the same way
    score = {e: float(np.float32(v)) for e, v in total.items()}
    return [(e, score[e], best[e]) for e in sorted(total, key=lambda e: (-total[e], best[e], e))]


@dataclass
class Run:
    """One expert computation of a layer: tokens that chose ``expert`` run ``run_as`` from ``slot``."""

    expert: int
    run_as: int
    slot: int
    job: CopyJob | None  # the copy to wait for, if any


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
        if isinstance(predictor, torch.nn.Module):
            predictor.to(self.device)  # learned predictors run where the hidden states are
        self.predictor = predictor
        self.store = HostExpertStore(adapter, pin=self.device.type == "cuda")
        loaded.model.to(self.device)
        self.pool = DevicePool(config.capacity_slots, self.store.template, self.device)
        self.cache = ExpertCache(
            self.num_layers, self.num_experts, config.capacity_slots,
            make_policy(config.policy, **config.policy_params), partition=config.partition,
        )
        if config.routing not in ROUTINGS:
            raise UserError(f"unknown routing {config.routing!r}; valid: {', '.join(ROUTINGS)}")
        self._router = (CacheAwareRouter(self.num_layers, self.top_k, config.routing_lambda)
                        if config.routing == "cache-aware" else None)
        self._miss = MissHandling(config.miss, config.drop_from_rank, config.substitute_tolerance)
        self._prefetcher = _make_prefetcher(config, self.top_k) if predictor is not None else None
        self.copier = ThrottledCopier(config.bandwidth, self.device)
        self.counters = Counters()
        self._jobs: dict[Key, CopyJob] = {}
        self._unused_prefetch: set[Key] = set()
        self._chosen: list[torch.Tensor] = []  # this pass: (T, K) ids per layer run so far
        self._previous: torch.Tensor | None = None  # (1, L, K) the previous token's experts
        self._forecasts: dict[int, list[np.ndarray]] = {}  # target layer -> forecasts made this pass
        # per layer: substitutes (kept until they ran), runs still due per key, copies waiting for a slot
        self._substitutes: set[Key] = set()
        self._pending: dict[Key, int] = {}
        self._blocked: dict[Key, list[CopyJob]] = {}
        self.recorder: TraceRecorder | None = None
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
        self._forecasts = {}
        self.cache.begin_pass(phase)
        if self.recorder is not None:
            self.recorder.begin_pass(phase)

    def reset_sequence(self) -> None:
        """Forget the previous token (a new prompt starts); the cache keeps its contents."""
        self._chosen = []
        self._previous = None

    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None,
        keep_logits: bool = False,
    ) -> Generation:
        self.reset_sequence()
        if self.recorder is not None:
            self.recorder.begin_sequence(input_ids)
        gen = greedy_generate(
            self.loaded.model, input_ids, max_new_tokens, eos_token_id=eos_token_id,
            keep_logits=keep_logits, before_pass=self.begin_pass,
        )
        if self.recorder is not None:
            self.recorder.end_sequence(gen.tokens)
        return gen

    def record(self, hidden: bool = False) -> TraceRecorder:
        """Start recording the routing the cache sees (and optionally MoE inputs) for a trace store."""
        self.recorder = TraceRecorder(self.num_layers, self.top_k, hidden=hidden)
        return self.recorder

    # ------------------------------------------------------------------ the MoE block
    def _block_forward(self, layer: int):
        def forward(hidden_states: torch.Tensor) -> torch.Tensor:
            return self._moe_forward(layer, hidden_states)

        return forward

    def _moe_forward(self, layer: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """One MoE layer, in the simulator's order (offload/simulator.py): begin the layer (its experts
        are pinned), the demand accesses in rank order with miss handling, the prefetches for later
        layers, then the experts."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        route = self.adapter.route(layer, x)
        ids, weights = self._route(layer, route)
        self._chosen.append(ids)
        if self.recorder is not None:
            self.recorder.layer(layer, ids, weights, x, route.logits)
        accesses = layer_accesses(ids, weights)
        self._score_forecasts(layer, accesses)
        needed = [(layer, e) for e, _, _ in accesses]
        self.cache.begin_layer(layer, needed)
        self._substitutes = set()
        self._pending = {}
        self._blocked = {}
        runs: list[Run] = []
        probs = None
        for e, score, rank in accesses:
            if probs is None and self._miss.mode == "substitute" and (layer, e) not in self.cache:
                probs = torch.softmax(route.logits.double(), dim=-1).mean(dim=0).cpu().numpy()
            run = self._access(layer, e, score, rank, probs, needed)
            if run is not None:
                runs.append(run)
                self._pending[(layer, run.run_as)] = self._pending.get((layer, run.run_as), 0) + 1
        self._prefetch(layer, x)
        # Without slot reuse inside the layer, run experts in ascending id: HF's accumulation order,
        # bit-identical outputs. When a long prompt needs more experts than there are slots, some copies
        # wait for the expert whose slot they take: then run in access order, which frees slots in the
        # order those copies were decided (a victim was always accessed before the key replacing it).
        out = torch.zeros_like(x)
        for run in (runs if self._blocked else sorted(runs, key=lambda r: r.expert)):
            self._run(out, x, ids, weights, layer, run)
        assert not self._blocked, "a copy was left waiting for an expert that never ran"
        shared = self.adapter.shared_forward(layer, x)
        if shared is not None:
            out = out + shared
        return out.reshape(shape)

    def _route(self, layer: int, route: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing policy: the model's own top-k, or cache-aware re-routing (offload.routing)."""
        if self._router is None:
            return route.ids, route.weights
        cached = np.zeros(self.num_experts, dtype=bool)
        for key in self.cache.resident():
            if key[0] == layer:
                cached[key[1]] = True
        ids_np, _ = self._router.route(layer, route.logits.float().cpu().numpy(), cached)
        ids = torch.as_tensor(ids_np, device=route.ids.device, dtype=route.ids.dtype)
        # dual-logit semantics: chosen on the boosted logits, weighted by the original softmax, with
        # the family's own normalisation and dtype
        weights = torch.softmax(route.logits, dim=-1, dtype=torch.float).gather(1, ids)
        if self.adapter.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(route.weights.dtype)

    def _run(self, out, x, ids, weights, layer: int, run: Run) -> None:
        """Tokens that chose ``run.expert`` get ``run.run_as``'s output (the same unless substituted),
        from the slot decided at access time; then copies waiting for that slot may start."""
        if run.job is not None:
            self._wait(run.job)
        params = self.pool.slot(run.slot)
        add_expert_output(out, x, ids, weights, run.expert, params, self.adapter.expert_forward)
        key = (layer, run.run_as)
        self._pending[key] -= 1
        if self._pending[key] == 0:
            del self._pending[key]
            for job in self._blocked.pop(key, []):
                self.copier.submit(job)

    # ------------------------------------------------------------------ cache events
    def _access(self, layer: int, expert: int, score: float, rank: int, probs: np.ndarray | None,
                needed: list[Key]) -> Run | None:
        """One demand access with miss handling: what will run, from which slot, after which copy; None
        when the miss is dropped."""
        key = (layer, expert)
        c = self.counters
        c.accesses += 1
        if key in self.cache:
            r = self.cache.access(key, score)
            c.hits += 1
            if r.first_use_of_prefetch:
                c.prefetch_used += 1
                self._unused_prefetch.discard(key)
            job = self._jobs.get(key)
            if job is not None and not job.is_ready():
                c.late_prefetch += 1
                self.copier.promote(job)
            return Run(expert, expert, r.slot, job)
        if self._miss.drops(rank):
            self._count_miss(self.cache.access(key, score, fetch=False))
            c.dropped += 1
            return None
        if probs is not None:
            taken = set(needed)
            candidates = [k[1] for k in self.cache.resident() if k[0] == layer and k not in taken]
            sub = self._miss.substitute(expert, probs, candidates)
            if sub is not None:
                self._count_miss(self.cache.access(key, score, fetch=False))
                self.cache.use((layer, sub), score)
                self._substitutes.add((layer, sub))
                c.substituted += 1
                slot = self.cache.slot_of((layer, sub))
                assert slot is not None
                return Run(expert, sub, slot, self._jobs.get((layer, sub)))
        r = self.cache.access(key, score, protected=self._substitutes)
        self._count_miss(r)
        job = self._new_job(key, r.slot, DEMAND)
        if r.evicted is not None and self._on_evicted(r.evicted):
            self._blocked.setdefault(r.evicted, []).append(job)  # its slot is free once it has run
        else:
            self.copier.submit(job)
        return Run(expert, expert, r.slot, job)

    def _count_miss(self, r: Any) -> None:
        self.counters.misses += 1
        self.counters.collision_misses += int(r.collision)

    def _new_job(self, key: Key, slot: int, priority: int) -> CopyJob:
        job = CopyJob(
            key=key, slot=slot, src=self.store.expert(*key), dst=self.pool.slot(slot),
            nbytes=self.store.expert_nbytes, priority=priority,
        )
        self._jobs[key] = job
        self.counters.bytes_copied += job.nbytes
        return job

    def _on_evicted(self, key: Key) -> bool:
        """Book-keeping for an evicted key; True when it still has to run in this layer (its slot
        is then taken only after that run)."""
        self.counters.evictions += 1
        job = self._jobs.pop(key, None)
        if key in self._unused_prefetch:
            self._unused_prefetch.discard(key)
            self.counters.prefetch_wasted += 1
        if key in self._pending:
            return True
        if job is not None and job.state == QUEUED and self.copier.cancel(job):
            self.counters.bytes_copied -= job.nbytes
        return False

    def _wait(self, job: CopyJob) -> None:
        if not job.is_ready():
            t0 = time.perf_counter()
            self.copier.promote(job)
            job.wait()
            self.counters.stall_s += time.perf_counter() - t0
        else:
            job.wait()  # returns at once; on CUDA it also retires the copy's event
        if self._jobs.get(job.key) is job:
            del self._jobs[job.key]

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
        for target, experts in self._prefetcher(scores, layer, self.predictor):
            self._forecasts.setdefault(target, []).append(experts)
            keys = [(target, int(e)) for e in experts]
            self.cache.mark_predicted(keys)
            for key in keys:
                if key in self.cache:
                    continue
                ins = self.cache.insert(key, prefetch=True, protected=self._substitutes)
                if ins is None:
                    continue  # the policy will not evict for a guess
                if ins.evicted is not None:
                    blocked = self._on_evicted(ins.evicted)
                    assert not blocked, "a prefetch evicted an expert the running layer still needs"
                self._unused_prefetch.add(key)
                self.counters.prefetch_issued += 1
                self.copier.submit(self._new_job(key, ins.slot, PREFETCH))

    def _score_forecasts(self, layer: int, accesses: list[tuple[int, float, int]]) -> None:
        """Precision/recall of every forecast made for ``layer`` in this pass, as the simulator's
        ``forecast_quality`` counts them (one entry per (source layer, distance))."""
        made = self._forecasts.pop(layer, [])
        if not made:
            return
        actual = np.array([e for e, _, _ in accesses])
        for predicted in made:
            self.counters.forecast_predicted += len(predicted)
            self.counters.forecast_correct += int(np.isin(predicted, actual).sum())
            self.counters.forecast_relevant += len(actual)


# ---------------------------------------------------------------------- policy plumbing
def _make_selection(config: EngineConfig) -> Selection:
    if config.prefetch == "topk":
        return TopKSelection(float(config.prefetch_params.get("overfetch", 1.0)))
    if config.prefetch == "score":
        return PercentileSelection(float(config.prefetch_params.get("percentile", 0.8)))
    raise UserError(f"unknown prefetch selection {config.prefetch!r}; valid: topk, score")


def _make_prefetcher(config: EngineConfig, top_k: int):
    """Scores (T, D, E) at layer l -> [(layer l+d, experts best first)], the simulator's selection rules.

    Per token the selection (``offload.prefetch``: top ``ceil(k*overfetch)`` or above a percentile)
    picks experts of each covered layer l+d, best first; a prefill pass takes the union over its
    tokens ordered by summed probability, as :class:`offload.prefetch.PredictorPrefetch` does.
    Nearer layers come first: they are needed sooner.
    """
    selection = _make_selection(config)
    max_distance = int(config.prefetch_params.get("lookahead", 1 << 30))

    def select(scores: torch.Tensor, layer: int, predictor: Predictor) -> list[tuple[int, np.ndarray]]:
        probs = scores.detach().float().cpu().numpy()  # (T, D, E)
        out: list[tuple[int, np.ndarray]] = []
        for d in range(1, min(probs.shape[1], max_distance) + 1):
            if not predictor.covers(layer, d):
                continue
            pr = probs[:, d - 1]
            order = np.argsort(-pr, axis=1, kind="stable")
            counts = selection.counts(pr, top_k)
            if pr.shape[0] == 1:
                picked = order[0, : counts[0]]
            else:
                mask = np.zeros(pr.shape[1], dtype=bool)
                for t, n in enumerate(counts):
                    mask[order[t, :n]] = True
                picked = np.flatnonzero(mask)
                picked = picked[np.argsort(-pr.sum(axis=0)[picked], kind="stable")]
            out.append((layer + d, picked))
        return out

    return select
