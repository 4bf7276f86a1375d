"""A synthetic trace store with learnable structure, shared by the predictor tests.

The "model" is a random residual stack: the hidden state drifts from layer to layer through a
fixed nonlinearity (so layer l+d's router on h_l is good but imperfect, and more so as d grows),
and each sequence's first hidden state follows an AR(1) process over positions (so the previous
token's experts carry information, which the trajectory family uses).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from core.model_info import DECODE, PREFILL, ModelInfo
from data_pipeline.trace_store import TraceStore, TraceStoreWriter


def make_synthetic_store(
    path: Path,
    *,
    num_sequences: int = 12,
    seq_len: int = 24,
    num_layers: int = 6,
    num_experts: int = 16,
    top_k: int = 2,
    hidden_size: int = 32,
    seed: int = 0,
    hidden: bool = True,
    router_weights: bool = True,
    drift: float = 0.8,
    temporal: float = 0.8,
    model_id: str = "synthetic-moe",
) -> TraceStore:
    rng = np.random.default_rng(seed)
    L, E, K, H = num_layers, num_experts, top_k, hidden_size
    routers = rng.normal(size=(L, E, H)).astype(np.float32)
    mixers = (rng.normal(size=(L, H, H)) / np.sqrt(H)).astype(np.float32)
    info = ModelInfo(model_id=model_id, family="olmoe", num_layers=L, num_experts=E, top_k=K,
                     hidden_size=H, expert_bytes=1000, dtype="float32")
    writer = TraceStoreWriter(path, info, hidden_layers=list(range(L)) if hidden else [],
                              store_router_logits=True)
    cols: dict[str, list[np.ndarray]] = {k: [] for k in ("seq_id", "position", "token_id", "phase", "ids", "w", "logits")}
    hid: dict[int, list[np.ndarray]] = {layer: [] for layer in range(L)}
    for s in range(num_sequences):
        h = np.zeros((seq_len, H), dtype=np.float32)
        h[0] = rng.normal(size=H)
        for t in range(1, seq_len):
            h[t] = temporal * h[t - 1] + np.sqrt(1 - temporal**2) * rng.normal(size=H)
        ids = np.zeros((seq_len, L, K), dtype=np.int64)
        weights = np.zeros((seq_len, L, K), dtype=np.float32)
        logits = np.zeros((seq_len, L, E), dtype=np.float32)
        for layer in range(L):
            hid[layer].append(h.astype(np.float16))
            z = h @ routers[layer].T
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            order = np.argsort(-p, axis=1, kind="stable")[:, :K]
            ids[:, layer], weights[:, layer], logits[:, layer] = order, np.take_along_axis(p, order, 1), z
            h = h + drift * np.tanh(h @ mixers[layer].T) * np.sqrt(H)
            h = h / np.linalg.norm(h, axis=1, keepdims=True) * np.sqrt(H)
        cols["seq_id"].append(np.full(seq_len, s))
        cols["position"].append(np.arange(seq_len))
        cols["token_id"].append(rng.integers(0, 100, seq_len))
        cols["phase"].append(np.where(np.arange(seq_len) < seq_len // 4, PREFILL, DECODE))
        cols["ids"].append(ids)
        cols["w"].append(weights)
        cols["logits"].append(logits)
    cat = {k: np.concatenate(v) for k, v in cols.items()}
    writer.write_shard(seq_id=cat["seq_id"], position=cat["position"], token_id=cat["token_id"],
                       phase=cat["phase"], topk_ids=cat["ids"], topk_weights=cat["w"],
                       router_logits=cat["logits"],
                       hidden={layer: np.concatenate(v) for layer, v in hid.items()} if hidden else None)
    if router_weights:
        writer.save_router_weights({layer: routers[layer] for layer in range(L)})
    return writer.finalize()


def test_synthetic_store_routes_with_its_own_routers(tmp_path: Path) -> None:
    store = make_synthetic_store(tmp_path / "s", num_sequences=2, seq_len=5)
    w = store.router_weights()
    h = store.hidden(3).astype(np.float32)
    top = np.argsort(-(h @ w[3].T), axis=1)[:, : store.top_k]
    assert (np.sort(top, 1) == np.sort(store.topk_ids([3])[:, 0], 1)).mean() > 0.95  # fp16 rounding aside
    assert store.num_sequences == 2 and store.num_tokens == 10
