"""Output quality next to speed (offload/engine/quality.py): held-out perplexity and next-token agreement,
teacher-forced on the prompts' reference continuations, on tiny OLMoE (CPU)."""

from __future__ import annotations

import math

import pytest
import torch

from data_pipeline.models import load_model
from offload.engine.engine import EngineConfig, OffloadEngine, clone_loaded
from offload.engine.prompts import load_prompts, split_gsm8k
from offload.engine.quality import continuations, score_engine, score_plain, summarize_quality

TOKENS = 12


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    return load_model("tiny-olmoe")


@pytest.fixture(scope="module")
def conts(tiny):
    return continuations(tiny.tokenizer, load_prompts("demo", 3, skip=20), TOKENS, tiny.model)


@pytest.fixture(scope="module")
def plain(tiny, conts):
    return score_plain(tiny.model, conts)


def _quality(tiny, conts, plain, **config):
    with OffloadEngine(clone_loaded(tiny), EngineConfig(**{"capacity_slots": 10, "bandwidth": None, **config})) as eng:
        scored = score_engine(eng, conts)
        return summarize_quality(scored, plain), scored, eng.counters.snapshot()


def test_continuations_are_the_gsm8k_solutions_after_the_question(tiny, conts):
    text = "Tom has 3 apples.\nHe eats one, so 3 - 1 = 2.\n#### 2"
    prompt = split_gsm8k(text)
    assert prompt.text == "Question: Tom has 3 apples.\nAnswer:" and prompt.continuation == " He eats one, so 3 - 1 = 2.\n#### 2"
    assert len(conts) == 3 and all(len(c.target) == TOKENS and c.context.shape[0] == 1 for c in conts)
    whole = continuations(tiny.tokenizer, [split_gsm8k("a plain text without any answer in it at all")], 50)
    ids = tiny.tokenizer("a plain text without any answer in it at all", return_tensors="pt").input_ids[0]
    assert torch.equal(torch.cat([whole[0].context[0], whole[0].target]), ids)  # split in half, nothing lost


@pytest.mark.parametrize("policy", ["lru", "least_stale"])
def test_fetch_at_full_precision_leaves_perplexity_exactly_unchanged(tiny, conts, plain, policy):
    q, scored, c = _quality(tiny, conts, plain, policy=policy)
    assert c.misses > 0 and c.evictions > 0  # the cache really worked
    assert [s.nll for s in scored] == [s.nll for s in plain]  # bit for bit, not close
    assert q["perplexity"] == summarize_quality(plain)["perplexity"] and q["agreement"] == 1.0
    assert q["tokens"] == 3 * TOKENS
    reference = summarize_quality(plain)
    assert reference["perplexity"] == pytest.approx(math.exp(sum(x for s in plain for x in s.nll) / (3 * TOKENS)))


def test_outputs_that_change_show_in_perplexity_and_agreement(tiny, conts, plain):
    """Dropping low-ranked misses and int2 copies change the logits: the numbers must move (int2 on a random
    model far more than drop), and the plain model agrees with itself."""
    base = summarize_quality(plain, plain)
    assert base["agreement"] == 1.0
    drop, _, c_drop = _quality(tiny, conts, plain, policy="lru", miss="drop")
    low, _, c_low = _quality(tiny, conts, plain, policy="lru", miss="fetch-lowest-bit")
    assert c_drop.dropped > 0 and c_low.served_int2 > 0
    for q in (drop, low):
        assert q["perplexity"] != base["perplexity"] and q["agreement"] < 1.0
    assert low["agreement"] < drop["agreement"]
