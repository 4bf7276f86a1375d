"""The offloaded engine on tiny OLMoE (CPU): exactness, capacity, prefetch, bad input."""

from __future__ import annotations

import pytest
import torch

from core.errors import UserError
from data_pipeline.models import load_model
from offload.capacity import parse_capacity
from offload.engine.engine import EngineConfig, OffloadEngine, clone_loaded, layer_accesses
from offload.engine.expert_store import HostExpertStore
from offload.engine.generate import greedy_generate
from offload.engine.prompts import load_prompts
from offload.engine.run import encode
from offload.quantization import QuantizedHostTier, dequantize
from offload.simulator import SimConfig, simulate_configs
from predictors.checkpoint import save_predictor
from predictors.frequency import ConditionalFrequency
from predictors.gate_lookahead import GateLookahead
from predictors.token_lookahead import TokenLookahead

MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # tiny matmuls: threads only contend (see benchmarks/engine.py)
    return load_model("tiny-olmoe")


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    return [encode(tiny.tokenizer, p) for p in load_prompts("demo", 2)]


@pytest.fixture(scope="module")
def plain(tiny, prompt_ids):
    return [greedy_generate(tiny.model, ids, MAX_NEW, keep_logits=True) for ids in prompt_ids]


def _router_weights(loaded) -> torch.Tensor:
    a = loaded.adapter
    return torch.stack([a.router_weight(i).detach().float() for i in range(a.num_layers)])


def _engine(tiny, slots: int, **kw) -> OffloadEngine:
    predictor, tier = kw.pop("predictor", None), kw.pop("tier", None)
    return OffloadEngine(clone_loaded(tiny), EngineConfig(capacity_slots=slots, **kw), predictor=predictor,
                         tier=tier)


@pytest.fixture(scope="module")
def tier(tiny):
    """Every tiny-olmoe expert at int8 / int4 / int2 (round-to-nearest: 10x faster to build than HQQ's
    optimiser, and the same code path)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return QuantizedHostTier(HostExpertStore(clone_loaded(tiny).adapter), optimize=False)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("policy", ["lru", "least_stale"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_fetch_mode_reproduces_the_plain_model(tiny, prompt_ids, plain, policy, prefetch):
    predictor = GateLookahead(_router_weights(tiny), tiny.adapter.top_k, 2) if prefetch else None
    with _engine(tiny, 9, policy=policy, predictor=predictor, bandwidth=5e9) as eng:
        # the engine really computes from slots: the model's own expert tensors are gone
        assert eng.adapter.experts_module(0).gate_up_proj.numel() == 0
        for ids, ref in zip(prompt_ids, plain, strict=True):
            gen = eng.generate(ids, MAX_NEW, keep_logits=True)
            assert gen.tokens == ref.tokens
            torch.testing.assert_close(torch.stack(gen.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-5)
        c = eng.counters
        assert c.misses > 0 and c.hits + c.misses == c.accesses
        assert (c.prefetch_issued > 0) == prefetch


def test_full_capacity_has_no_misses_after_warm_up(tiny, prompt_ids):
    L, E = tiny.adapter.num_layers, tiny.adapter.num_experts
    with _engine(tiny, L * E, bandwidth=None) as eng:
        eng.generate(prompt_ids[0], MAX_NEW)
        first = eng.counters.snapshot()
        assert first.misses == len(eng.cache) and first.evictions == 0  # compulsory misses only
        eng.generate(prompt_ids[0], MAX_NEW)  # the same prompt again: every expert is resident
        again = eng.counters.minus(first)
    assert again.accesses > 0 and again.misses == 0 and again.hits == again.accesses


def test_prefetching_predictor_raises_the_hit_rate(tiny, prompt_ids):
    rates = {}
    for name, predictor in [("none", None), ("gate", GateLookahead(_router_weights(tiny), tiny.adapter.top_k, 1))]:
        with _engine(tiny, 16, policy="least_stale", predictor=predictor, bandwidth=None) as eng:
            for ids in prompt_ids:
                eng.generate(ids, MAX_NEW)
            rates[name] = eng.counters.hits / eng.counters.accesses
    assert rates["gate"] > rates["none"] + 0.05, rates


def test_layer_accesses_order_and_scores():
    ids = torch.tensor([[3, 1], [1, 0]])
    w = torch.tensor([[0.5, 0.25], [0.5, 0.5]])
    # score desc; 3 and 0 tie at 0.5 and 3 wins on its best rank (0 < 1), as in core.passes
    assert layer_accesses(ids, w) == [(1, 0.75, 0), (3, 0.5, 0), (0, 0.5, 1)]
    assert layer_accesses(torch.tensor([[2, -1]]), torch.tensor([[0.7, 0.3]])) == [(2, pytest.approx(0.7), 0)]


def test_bad_input_is_refused(tiny):
    with pytest.raises(UserError, match="top-k"):
        _engine(tiny, tiny.adapter.top_k - 1)
    with pytest.raises(UserError, match="bandwidth"):
        _engine(tiny, 8, bandwidth=0)
    with pytest.raises(UserError, match="bandwidth"):
        _engine(tiny, 8, bandwidth=-1e9)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="GPU"):
            _engine(tiny, 8, device="cuda")


def test_prompt_longer_than_context_is_refused(tiny):
    too_long = torch.zeros((1, tiny.model.config.max_position_embeddings), dtype=torch.long)
    with pytest.raises(UserError, match="context"):
        greedy_generate(tiny.model, too_long, 4)


def test_least_stale_has_fewer_collisions_than_lru_at_5_percent(tiny):
    """The demo setting: 5 % of the experts cached, experts forecast two layers ahead."""
    prompts = [encode(tiny.tokenizer, p) for p in load_prompts("demo", 3)]
    slots = parse_capacity("5%", tiny.info)
    collisions = {}
    for policy in ("lru", "least_stale"):
        predictor = GateLookahead(_router_weights(tiny), tiny.adapter.top_k, 2)
        with _engine(tiny, slots, policy=policy, predictor=predictor, bandwidth=None) as eng:
            for ids in prompts:
                eng.generate(ids, 8)
            collisions[policy] = eng.counters.collision_misses
    assert collisions["least_stale"] < collisions["lru"], collisions


@pytest.mark.parametrize("policy", ["lru", "least_stale", "score"])
@pytest.mark.parametrize("miss", ["fetch", "drop"])
def test_simulator_replays_the_engine_hit_for_hit(tiny, tmp_path, policy, miss):
    """Record the routing the engine's cache saw, replay it in the simulator with demand fetch: the
    access, hit, miss, collision and drop counts must be identical, not just close."""
    prompts = [encode(tiny.tokenizer, p) for p in load_prompts("demo", 2)]
    with _engine(tiny, parse_capacity("10%", tiny.info), policy=policy, miss=miss, bandwidth=None) as eng:
        recorder = eng.record()
        for ids in prompts:
            eng.generate(ids, 8)
        c = eng.counters
    store = recorder.write(tmp_path / "engine-trace", tiny.info)
    assert store.num_sequences == 2 and store.num_tokens == sum(ids.shape[1] for ids in prompts) + 2 * 7
    sim = simulate_configs(store, [SimConfig(policy=policy, capacity="10%", miss=miss, prefetch="none")])[0]
    assert c.hits > 0 or policy != "score"
    assert (sim["accesses"], sim["hits"], sim["misses"], sim["collision_misses"], sim["dropped"]) == (
        c.accesses, c.hits, c.misses, c.collision_misses, c.dropped)


@pytest.fixture(scope="module")
def fit_store(tiny, tmp_path_factory):
    """The engine's own routing (and token ids) on 4 demo texts the replay tests never prompt with."""
    with _engine(tiny, tiny.adapter.num_layers * tiny.adapter.num_experts, bandwidth=None) as eng:
        recorder = eng.record()
        for p in load_prompts("demo", 4, skip=10):
            eng.generate(encode(tiny.tokenizer, p), 8)
    return recorder.write(tmp_path_factory.mktemp("fit") / "fit", tiny.info)


@pytest.fixture(scope="module")
def chosen_predictor(tiny, fit_store, tmp_path_factory):
    """A conditional-frequency predictor fitted on the engine's own routing, and its checkpoint: it reads
    the experts already chosen (recorded exactly), not hidden states (stored in fp16 for the simulator)."""
    predictor = ConditionalFrequency.fit(fit_store.topk_ids(), tiny.adapter.num_experts, 2)
    return predictor, save_predictor(predictor, tmp_path_factory.mktemp("cf") / "cf", model=tiny.info)


def _engine_then_replay(tiny, tmp_path, predictor, ckpt, *, policy: str, miss: str = "fetch", before=None, **kw):
    """Run the engine on 2 demo prompts (6 new tokens each) prefetching greedily 2 layers ahead on an
    unthrottled link, then let the simulator replay its recorded routing with the same configuration:
    (the engine's counters, the simulator's result). ``before(engine)`` may alter the engine first."""
    prompts = [encode(tiny.tokenizer, p) for p in load_prompts("demo", 2)]
    with _engine(tiny, 12, policy=policy, predictor=predictor, bandwidth=None, admission="greedy", miss=miss,
                 prefetch_params={"overfetch": 1.5}, **kw) as eng:
        if before is not None:
            before(eng)
        recorder = eng.record()
        for ids in prompts:
            eng.generate(ids, 6)
        c = eng.counters
    store = recorder.write(tmp_path / "engine-trace", tiny.info)
    sim = simulate_configs(store, [SimConfig(policy=policy, capacity="12", prefetch=f"ckpt:{ckpt}", lookahead=2,
                                             overfetch=1.5, miss=miss, hardware="a100-5gbs:link_gbps=inf")])[0]
    return c, sim


@pytest.mark.parametrize("policy", ["lru", "fifo", "lfu", "lhu", "fld", "score", "least_stale", "random",
                                    "forecast", "least_stale_forecast"])
def test_engine_and_simulator_take_the_same_decisions_through_the_one_step(tiny, tmp_path, chosen_predictor,
                                                                           policy):
    """Every policy the engine can run (Belady needs the future), with a predictor prefetching greedily two
    layers ahead: replaying the engine's recorded routing, the simulator's step takes the same decisions --
    hits, misses, collisions, evictions, prefetches issued / used / cancelled, forecast precision --
    because it is the same code (an unthrottled link: no decision depends on the clock)."""
    c, sim = _engine_then_replay(tiny, tmp_path, *chosen_predictor, policy=policy)
    assert c.prefetch_issued > 0 and c.evictions > 0
    engine = (c.accesses, c.hits, c.misses, c.collision_misses, c.evictions, c.prefetch_issued, c.prefetch_used,
              c.prefetch_cancelled, c.forecast_predicted, c.forecast_correct)
    simulated = (sim["accesses"], sim["hits"], sim["misses"], sim["collision_misses"], sim["evictions"],
                 sim["prefetch_issued"], sim["prefetch_used"], sim["prefetch_cancelled"],
                 round(sim["precision"] * c.forecast_predicted), round(sim["precision"] * c.forecast_predicted))
    assert engine[:8] == simulated[:8]
    assert sim["precision"] == pytest.approx(c.forecast_correct / c.forecast_predicted)


def test_token_family_sees_the_same_tokens_in_the_engine_and_the_simulator(tiny, tmp_path, fit_store):
    """The token family forecasts from the token ids alone: the engine reads them off the input embedding,
    the simulator off the store. Both feed the same ids, so both take the same decisions; with the ids
    withheld (every token unknown) the engine's forecasts are popularity and its decisions change."""
    predictor = TokenLookahead.from_store(fit_store, lookahead=2).eval()  # untrained residual: ranks by counts
    ckpt = save_predictor(predictor, tmp_path / "token", model=tiny.info)

    def hide_tokens(eng) -> None:  # the mutant: the engine sees no token ids
        eng._token_hook.remove()
        eng._token_hook = tiny.model.get_input_embeddings().register_forward_pre_hook(lambda module, args: None)

    c, sim = _engine_then_replay(tiny, tmp_path / "seen", predictor, ckpt, policy="lru")
    assert c.prefetch_issued > 0
    assert (c.hits, c.misses, c.prefetch_issued, c.prefetch_used) == (
        sim["hits"], sim["misses"], sim["prefetch_issued"], sim["prefetch_used"])
    blind, _ = _engine_then_replay(tiny, tmp_path / "blind", predictor, ckpt, policy="lru", before=hide_tokens)
    assert (blind.prefetch_used, blind.hits) != (c.prefetch_used, c.hits)


@pytest.mark.parametrize("miss,policy", [("fetch-lowest-bit", "lru"), ("fetch-priority", "least_stale"),
                                         ("precision-cascade", "lhu"), ("precision-cascade", "least_stale")])
def test_engine_and_simulator_agree_on_lower_bit_copies(tiny, tmp_path, chosen_predictor, tier, miss, policy):
    """The lower-bit miss handlers through the one step: replaying the engine's routing, the simulator
    fetches the same experts at the same precisions, hits the same copies at the same precisions, dequantizes
    and upgrades the same ones, and moves the same bytes (sized from the store's model numbers there, from
    the real tensors here). Unthrottled: an upgrade arrives by the next layer in both."""
    c, sim = _engine_then_replay(tiny, tmp_path, *chosen_predictor, policy=policy, miss=miss, tier=tier)
    assert sim["backend"] == "reference"  # the numba kernel leaves lower-bit modes to the step
    low = sum(n for p, n in c.by_precision("served").items() if p != "native")
    assert low > 0 and c.dequantized > 0 and (c.upgrades > 0) == (miss == "precision-cascade")
    engine = (c.accesses, c.hits, c.misses, c.evictions, c.prefetch_issued, c.prefetch_used, c.dequantized,
              c.upgrades_issued, c.upgrades, c.upgrades_cancelled, c.by_precision("hits"), c.by_precision("served"))
    simulated = (sim["accesses"], sim["hits"], sim["misses"], sim["evictions"], sim["prefetch_issued"],
                 sim["prefetch_used"], sim["dequantized"], sim["upgrades_issued"], sim["upgrades"],
                 sim["upgrades_cancelled"], sim["hits_by_precision"], sim["served_by_precision"])
    assert engine == simulated
    for key in ("demand_bytes", "prefetch_bytes", "upgrade_bytes"):
        assert sim[key] == pytest.approx(getattr(c, key), rel=1e-12), key


def test_slots_hold_exactly_the_precision_the_cache_says(tiny, prompt_ids, tier):
    """After a cascade run on a throttled link (upgrades still in flight at the end), every resident
    expert's slot holds its full-precision weights if the cache says native, else exactly the dequantized
    low-bit copy: an upgrade lands in its slot only when the step applies it."""
    seen = set()
    with _engine(tiny, 48, policy="lru", miss="precision-cascade", tier=tier, bandwidth=5e9,
                 expert_bytes=12582912) as eng:
        for ids in prompt_ids:
            eng.generate(ids, MAX_NEW)
            for key in eng.cache.resident():
                precision = eng.cache.precision_of(key)
                seen.add(precision)
                slot = eng.pool.slot(eng.cache.slot_of(key))
                want = (eng.store.expert(*key) if precision == "native"
                        else dequantize(tier.expert(key[0], key[1], precision)))
                assert all(torch.equal(slot[n], want[n]) for n in slot), (key, precision)
        c = eng.counters
    assert seen == {"native", "int2"} and c.upgrades > 0
    assert c.upgrades_issued > c.upgrades + c.upgrades_cancelled  # some were still on their way
