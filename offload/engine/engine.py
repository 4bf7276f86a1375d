"""The offloaded inference engine: an HF MoE model whose experts live off the device.

Figure 2 of SpecMD, in this code:

- **main loop**: the model's own forward; every MoE block's forward is replaced by
  :meth:`OffloadEngine._moe_forward`, which routes (routing policy) and hands the layer's accesses to
  the one per-layer step (:class:`offload.step.LayerStep`): the same code the simulator runs, so
  every cache, miss-handling and prefetch decision is the simulator's. Only the backend differs:
  :class:`EngineBackend` computes experts from device slots and reads a wall clock.
- **prefetch loop**: at layer ``l`` the predictor reads the real MoE input and forecasts layers
  ``l+1 .. l+D``; :func:`offload.prefetch.rank_candidates` turns its scores into ranked candidates
  (the simulator's own rule); the step admits them (greedy, or by expected value).
- **watchdog**: :class:`offload.engine.copier.ThrottledCopier` moves the bytes over the emulated
  link -- the simulator's own link rules on the wall clock: demand copies before queued prefetches.
  ``expert_bytes`` makes each copy hold the link as long as the target model's expert would
  (OLMoE-1B-7B's 12.6 MB by default in ``evaluate.py``), while the real, small weights are copied:
  outputs do not change.

Lower-bit copies (``miss`` = fetch-lowest-bit, fetch-priority, precision-cascade): the host holds
every expert at each precision of ``precisions`` too (:class:`offload.quantization.QuantizedHostTier`,
built once and shareable between engines); a low-bit copy moves that precision's packed bytes (an
emulated expert: its size times the precision's byte ratio, in ``expert_dtype``) and is dequantized
into its slot when it first runs; a cascade's upgrade replaces it when the step applies it.

All cache decisions are taken on the main thread; only the copies run concurrently. Expert outputs
are summed in ascending expert id whatever order the experts ran in (those already there first),
so with demand fetch the engine's logits are the plain model's, bit for bit.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from data_pipeline.adapters import get_adapter
from offload.cache import ExpertCache
from offload.engine.copier import CopierLink, ThrottledCopier
from offload.engine.device_pool import DevicePool
from offload.engine.expert_store import HostExpertStore
from offload.engine.generate import Generation, Scored, greedy_generate, teacher_forced
from offload.engine.moe_layer import expert_rows, replace_forward, restore_forward
from offload.engine.trace import TraceRecorder
from offload.link import SimCopy
from offload.miss_handling import MissHandling
from offload.policies import make_policy
from offload.precision import PRECISIONS, byte_ratios, itemsize, with_itemsize
from offload.prefetch import PercentileSelection, Selection, TopKSelection, forecast_depth, rank_candidates
from offload.quantization import QuantizedHostTier, dequantize, template_shapes
from offload.routing import ROUTINGS, CacheAwareRouter
from offload.step import Access, Candidates, LayerStep, Run
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
    prefetch: str = "topk"  # how forecast scores become prefetches: topk (x overfetch) or percentile
    prefetch_params: dict[str, Any] = field(default_factory=dict)
    admission: str = "greedy"  # greedy | value (offload.admission)
    expert_bytes: int | None = None  # bytes a copy holds the link for (emulate a bigger model); None: real
    expert_dtype: str | None = None  # native dtype of that emulated expert (low-bit copies scale by its ratio)
    precisions: tuple[str, ...] = PRECISIONS  # what the host tier holds, for the lower-bit miss handlers
    partition: str = "global"
    device: str = "cpu"


def layer_accesses(ids: torch.Tensor, weights: torch.Tensor) -> list[tuple[int, float, int]]:
    """The (expert, score, best rank) accesses of one layer, in the order the cache sees them.

    One access per distinct expert; score = its routing weight summed over the tokens. Order: score
    descending, ties by best rank then expert id, so a decode step (one token) is plain rank order.
    This is exactly :func:`core.passes.build_passes`' order, which is what makes the engine's
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


def clone_loaded(loaded: Any) -> Any:
    """A deep copy of a ``LoadedModel`` with its own adapter: the engine releases the expert weights
    of the model it wraps, so a plain reference and an engine never share one."""
    model = copy.deepcopy(loaded.model)
    return dataclasses.replace(loaded, model=model, adapter=get_adapter(model))


class OffloadEngine:
    """Runs ``loaded.model`` with experts in a host tier and ``capacity_slots`` device slots."""

    def __init__(self, loaded: Any, config: EngineConfig, predictor: Predictor | None = None,
                 tier: QuantizedHostTier | None = None):
        """``tier``: the low-bit host copies, built from the same model (e.g. shared by several engines; the
        precisions it lacks are added); None: built here when the miss handler needs them."""
        self.loaded = loaded
        self.adapter = adapter = loaded.adapter
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda requested but no CUDA GPU is available")
        miss = MissHandling(config.miss, config.drop_from_rank, config.substitute_tolerance, config.precisions)
        if config.bandwidth is not None and not config.bandwidth > 0:
            raise UserError(f"bandwidth must be positive, got {config.bandwidth} bytes/s")
        self.num_layers, self.num_experts, self.top_k = adapter.num_layers, adapter.num_experts, adapter.top_k
        if config.capacity_slots < self.top_k:
            raise UserError(
                f"capacity of {config.capacity_slots} expert slots is below one layer's top-k "
                f"({self.top_k}): the engine could not hold the experts of a single token; raise --capacity"
            )
        if config.capacity_slots > self.num_layers * self.num_experts:
            raise UserError(f"capacity of {config.capacity_slots} expert slots is more than the model's "
                            f"{self.num_layers * self.num_experts} experts")
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
        self.copier = ThrottledCopier(config.bandwidth, self.device)
        link_bytes = int(config.expert_bytes) if config.expert_bytes is not None else self.store.expert_nbytes
        if link_bytes <= 0:
            raise UserError(f"emulated expert size must be positive, got {link_bytes} bytes")
        self.tier = self._host_tier(miss, tier)
        shapes = template_shapes(self.store.template)  # type: ignore[arg-type]
        link_shapes = with_itemsize(shapes, itemsize(config.expert_dtype)) if config.expert_dtype else shapes
        sizes = {p: float(link_bytes) * r for p, r in byte_ratios(link_shapes, miss.precisions).items()}
        self.backend = EngineBackend(self, CopierLink(self.copier, self._host_copy, self.pool.slot, sizes))
        self._select = _make_selection(config) if predictor is not None else None
        self._max_distance = int(config.prefetch_params.get("lookahead", 1 << 30))
        lookahead = min(predictor.lookahead, self._max_distance) if predictor is not None else 1
        self.step = LayerStep(self.cache, self.backend, miss=miss, admission=config.admission, lookahead=lookahead,
                              depth=forecast_depth(self.num_experts, self.top_k))
        self._chosen: list[torch.Tensor] = []  # this pass: (T, K) ids per layer run so far
        self._previous: torch.Tensor | None = None  # (1, L, K) the previous token's experts
        self.recorder: TraceRecorder | None = None
        self._closed = False
        for layer in range(self.num_layers):
            replace_forward(adapter.moe_block(layer), self._block_forward(layer))
        # the token-aware families read the pass's token ids: the input embedding sees them first
        self._token_ids: torch.Tensor | None = None
        self._token_hook = loaded.model.get_input_embeddings().register_forward_pre_hook(self._see_tokens)

    @property
    def counters(self):
        """The step's event counters (offload.counters.Counters)."""
        return self.step.counters

    def _host_tier(self, miss: MissHandling, tier: QuantizedHostTier | None) -> QuantizedHostTier | None:
        if not miss.lower_bit:
            return tier
        if tier is None:
            return QuantizedHostTier(self.store, miss.low_precisions, pin=self.device.type == "cuda",
                                     device=self.device)
        if tier.template != self.store.template:
            raise UserError(f"the quantized host tier holds experts shaped {tier.template}, this model's are "
                            f"{self.store.template}")
        tier.ensure(miss.low_precisions)  # a shared tier grows to what this engine needs
        return tier

    def _host_copy(self, key: tuple[int, int], precision: str) -> Any:
        """The host copy of expert ``key`` at ``precision`` (what the link moves)."""
        if precision == "native":
            return self.store.expert(*key)
        assert self.tier is not None, "a low-bit copy without a quantized host tier"
        return self.tier.expert(key[0], key[1], precision)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Stop the watchdog and give the MoE blocks their own forward back (weights stay released)."""
        if self._closed:
            return
        self._closed = True
        self.copier.close()
        self._token_hook.remove()
        for layer in range(self.num_layers):
            restore_forward(self.adapter.moe_block(layer))

    def _see_tokens(self, module: torch.nn.Module, args: tuple) -> None:
        self._token_ids = args[0].reshape(-1) if args and torch.is_tensor(args[0]) else None

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
        self.backend.begin_pass()
        self.step.begin_pass(phase)
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

    def teacher_forced(self, context: torch.Tensor, target: torch.Tensor) -> Scored:
        """Score ``target`` as the continuation of ``context`` through the offloaded model (quality); these
        passes are not recorded (a recording replays the timed generations)."""
        self.reset_sequence()
        recorder, self.recorder = self.recorder, None
        try:
            return teacher_forced(self.loaded.model, context, target, before_pass=self.begin_pass)
        finally:
            self.recorder = recorder

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
        """One MoE layer: route, then the one per-layer step (offload/step.py) with this engine's
        backend; the experts' outputs are summed in ascending expert id (HF's order, exact)."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        route = self.adapter.route(layer, x)
        ids, weights = self._route(layer, route)
        self._chosen.append(ids)
        if self.recorder is not None:
            self.recorder.layer(layer, ids, weights, x, route.logits)
        accesses = [Access(e, score, rank, int((ids == e).sum())) for e, score, rank in layer_accesses(ids, weights)]

        def probs() -> np.ndarray:
            return torch.softmax(route.logits.double(), dim=-1).mean(dim=0).cpu().numpy()

        self.backend.begin_compute(x, ids, weights)
        forecaster = self._forecaster(x) if self.predictor is not None else None
        self.step.run_layer(layer, accesses, x.shape[0], forecaster=forecaster, probs=probs)
        out = self.backend.finish_compute()
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
        token = None
        if "token" in needs:
            ids = self._token_ids
            token = ids.to(torch.long) if ids is not None and ids.numel() == x.shape[0] else \
                torch.full((x.shape[0],), -1, dtype=torch.long)  # unknown tokens: the prior's popularity
        return PredictContext(layer=layer, hidden=x if "hidden" in needs else None, chosen=chosen,
                              previous=previous, token=token)

    def _forecaster(self, x: torch.Tensor):
        """The step's forecaster at this layer: the predictor on the real MoE input, ranked by the
        simulator's own rule (:func:`offload.prefetch.rank_candidates`)."""
        assert self.predictor is not None and self._select is not None
        predictor, selection = self.predictor, self._select
        depth = forecast_depth(self.num_experts, self.top_k)

        def forecast(layer: int) -> list[Candidates]:
            ctx = self._context(layer, x)
            if ctx is None:
                return []
            scores = predictor.predict(ctx).detach().float().cpu().numpy()  # (T, D, E)
            out = []
            for d in range(1, min(scores.shape[1], self._max_distance) + 1):
                if not predictor.covers(layer, d):
                    continue
                experts, selected = rank_candidates(scores[:, d - 1], selection, self.top_k, depth)
                out.append(Candidates(d, layer + d, experts, selected))
            return out

        return forecast


class EngineBackend:
    """The step's machine in the engine: device slots, the real copier and the wall clock."""

    def __init__(self, engine: OffloadEngine, link: CopierLink):
        self.engine = engine
        self.link = link
        self._x: torch.Tensor | None = None
        self._layer_t0 = 0.0
        self._last_end: float | None = None  # when the previous MoE layer of this pass finished
        # EMAs of a layer's (non-expert, expert) compute, by phase (True: prefill), for admission
        self._estimate = {True: [0.0, 0.0], False: [0.0, 0.0]}
        self._parts: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def begin_pass(self) -> None:
        self._last_end = None

    def _learn(self, prefill: bool, part: int, seconds: float) -> None:
        est = self._estimate[prefill]
        est[part] = seconds if est[part] == 0.0 else 0.8 * est[part] + 0.2 * seconds

    def now(self) -> float:
        return time.perf_counter()

    def begin_layer(self, layer: int, tokens: int) -> None:
        """The attention and norms of this layer ran since the previous MoE layer ended: measure them."""
        self._tokens = tokens
        c = self.engine.step.counters
        self._waited0 = c.stall_s + c.predictor_s
        self._layer_t0 = time.perf_counter()
        if self._last_end is not None:
            self._learn(tokens > 1, 0, self._layer_t0 - self._last_end)

    def charge_forecast(self, started: float) -> float:
        return time.perf_counter() - started  # it already ran on this device

    def layer_estimate(self, layer: int, tokens: int, experts: int) -> tuple[float, float]:
        """Measured: this phase's recent (non-expert, expert) compute per layer, waits excluded."""
        non_expert, expert = self._estimate[tokens > 1]
        return non_expert, expert

    def copy_bytes(self, layer: int, precision: str = "native") -> float:
        return self.link.link_bytes[precision]

    def upgrade(self, copy: SimCopy, slot: int) -> None:
        """Copy the staged full-precision weights into the slot (on the compute stream, after its readers)."""
        self.link.copier.wait(copy)  # it has arrived; on CUDA this also settles its event
        staged = copy.payload.staged
        for name, t in self.engine.pool.slot(slot).items():
            t.copy_(staged[name])
        self.link.copier.release(copy, staged)

    def arrived(self, copy: SimCopy) -> bool:
        return self.link.copier.ready(copy)

    def wait(self, copy: SimCopy) -> float:
        t0 = time.perf_counter()
        self.link.copier.wait(copy)
        return time.perf_counter() - t0

    # ---------------------------------------------------------------- expert compute
    def begin_compute(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self._x, self._ids, self._weights = x, ids, weights
        self._parts = []

    def run(self, run: Run) -> None:
        """Tokens that chose ``run.expert`` get ``run.run_as``'s output (the same unless substituted)."""
        assert self._x is not None
        rank, token = expert_rows(self._ids, run.expert)
        params = self.engine.pool.slot(run.slot)
        if run.unpack is not None:  # a low-bit copy's first run: dequantize it into its slot
            packed = run.unpack.payload.staged
            dequantize(packed, out=params)
            self.engine.copier.release(run.unpack, packed)
        if token.numel():
            y = self.engine.adapter.expert_forward(params, self._x[token]) * self._weights[token, rank, None]
            self._parts.append((run.expert, token, y))

    def finish_compute(self) -> torch.Tensor:
        """The layer's output, summed in ascending expert id (HF's accumulation order)."""
        assert self._x is not None
        out = torch.zeros_like(self._x)
        for _, token, y in sorted(self._parts, key=lambda part: part[0]):
            out.index_add_(0, token, y.to(out.dtype))
        c = self.engine.step.counters
        # compute only: the layer's waits for copies and its forecast are not what the next layer costs
        self._last_end = time.perf_counter()
        self._learn(self._tokens > 1, 1, self._last_end - self._layer_t0 - (c.stall_s + c.predictor_s - self._waited0))
        self._parts = []
        self._x = None
        return out


# ---------------------------------------------------------------------- policy plumbing
def _make_selection(config: EngineConfig) -> Selection:
    if config.prefetch == "topk":
        return TopKSelection(float(config.prefetch_params.get("overfetch", 1.0)))
    if config.prefetch == "percentile":
        return PercentileSelection(float(config.prefetch_params.get("percentile", 0.8)))
    raise UserError(f"unknown prefetch selection {config.prefetch!r}; valid: topk, percentile")
