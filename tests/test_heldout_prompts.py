"""The engine's prompts are texts the predictor's trace store never held, also when the prompts are the
first halves of the store's documents (``demo:heldout-prompts`` next to a ``demo:heldout`` store)."""

from __future__ import annotations

import json
from argparse import Namespace
from types import SimpleNamespace

import numpy as np

from core.model_info import DECODE, ModelInfo
from data_pipeline.demo_text import same_documents
from data_pipeline.text_sources import load_texts
from data_pipeline.trace_store import TraceStoreWriter
from offload.engine.cli import _prompts


def test_same_documents():
    assert same_documents("demo:heldout", "demo:heldout-prompts")
    assert same_documents("demo:heldout-prompts", "demo:heldout-prompts")
    assert not same_documents("demo:heldout", "demo:gsm8k")
    assert not same_documents(None, "demo:heldout")


def test_prompts_skip_the_documents_the_predictor_trained_on(tmp_path):
    L, E, K, texts = 2, 8, 2, 5
    model = ModelInfo("synthetic", "test", L, E, K)
    n = 3 * texts
    with TraceStoreWriter(tmp_path / "store", model, dataset={"name": "demo:heldout"}) as w:
        ids = np.tile(np.arange(K), (n, L, 1))
        w.write_shard(seq_id=np.repeat(np.arange(texts), 3), position=np.tile(np.arange(3), texts),
                      token_id=np.zeros(n), phase=np.full(n, DECODE, dtype=np.int8), topk_ids=ids,
                      topk_weights=np.full((n, L, K), 0.5))
        w.finalize()
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"store": str(tmp_path / "store")}))
    predictor = SimpleNamespace(source=str(run / "mlp_lookahead.safetensors"))
    prompts, note = _prompts(Namespace(prompts=2), "demo:heldout-prompts", predictor)
    halves = load_texts("demo:heldout-prompts", limit=texts + 2).texts
    assert [p.text for p in prompts] == halves[texts:texts + 2]  # texts 0-4 trained on, 5-6 held out
    assert note.startswith(f"held out: texts {texts}-{texts + 1} of demo:heldout-prompts")
