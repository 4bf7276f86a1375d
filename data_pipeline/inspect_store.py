"""Inspect a trace store: the numbers a researcher asks first, and an expert-usage heatmap.

``python -m data_pipeline.inspect_store traces/NAME [--png usage.png] [--json]`` prints tokens,
sequences, layers, experts, top-k, and per MoE layer:

- **usage entropy**: entropy (bits) of the distribution of top-k selections over the layer's
  experts, and as a fraction of log2(E) (1.0 = perfectly balanced, 0 = one expert always);
- **repeat at l+1**: mean fraction of a token's top-k expert *indices* at layer l that also appear
  in its top-k at layer l+1 (different layers hold different experts; this measures index
  correlation, e.g. what a "same experts next layer" guess would score);
- **repeat at next token**: mean fraction of a token's top-k at layer l that the next token of the
  same sequence also routes to at layer l (temporal locality: what an LRU-like cache lives on).

When the rows carry token ids (collected traces; imported ones may not), also how much of each
layer's routing the token alone explains (see :mod:`data_pipeline.token_routing`): recall@K of
the token's most-picked experts on held-out sequences next to popularity, and H(expert | token)
against H(expert).

Chance level for both repeat rates is K/E. The statistics are plain functions on a
:class:`~data_pipeline.trace_store.TraceStore` so other code can reuse them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from core.errors import UserError, run_cli
from data_pipeline.token_routing import token_explained
from data_pipeline.trace_store import TraceStore

_CHUNK = 1 << 16


def expert_usage(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """(N, L, K) expert ids -> (L, E) int64 counts of top-k selections per layer and expert."""
    n, L, _ = topk_ids.shape
    counts = np.zeros((L, num_experts), dtype=np.int64)
    for layer in range(L):
        counts[layer] = np.bincount(topk_ids[:, layer][topk_ids[:, layer] >= 0].astype(np.int64), minlength=num_experts)[:num_experts]
    return counts


def usage_entropy(counts: np.ndarray) -> np.ndarray:
    """(L, E) counts -> (L,) entropy in bits of each layer's selection distribution."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    p = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log2(p), 0.0)
    return terms.sum(axis=1)


def topk_overlap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise |set(a) ∩ set(b)| / K for (N, K) id arrays (each row's ids are distinct)."""
    if len(a) == 0:
        return np.zeros(0)
    out = np.empty(len(a), dtype=np.float64)
    k = a.shape[1]
    for s in range(0, len(a), _CHUNK):
        aa, bb = a[s:s + _CHUNK], b[s:s + _CHUNK]
        out[s:s + _CHUNK] = (aa[:, :, None] == bb[:, None, :]).any(axis=2).sum(axis=1) / k
    return out


def cross_layer_repeat(topk_ids: np.ndarray) -> np.ndarray:
    """(N, L, K) -> (L-1,) mean fraction of layer l's top-k indices present at layer l+1, same token."""
    L = topk_ids.shape[1]
    return np.array([topk_overlap(topk_ids[:, l_], topk_ids[:, l_ + 1]).mean() if len(topk_ids) else np.nan
                     for l_ in range(L - 1)])


def next_token_pairs(seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Row indices i such that row i+1 is the next position of the same sequence."""
    if len(seq_ids) < 2:
        return np.zeros(0, dtype=np.int64)
    same = (seq_ids[1:] == seq_ids[:-1]) & (positions[1:] == positions[:-1] + 1)
    return np.flatnonzero(same)


def next_token_repeat(topk_ids: np.ndarray, seq_ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(N, L, K) -> (L,) mean fraction of a token's layer-l experts reused by the next token at layer l."""
    idx = next_token_pairs(seq_ids, positions)
    L = topk_ids.shape[1]
    if len(idx) == 0:
        return np.full(L, np.nan)
    return np.array([topk_overlap(topk_ids[idx, l_], topk_ids[idx + 1, l_]).mean() for l_ in range(L)])


def summarize(store: TraceStore) -> dict[str, Any]:
    """All the numbers :func:`main` prints, as a JSON-able dict."""
    ids = np.asarray(store.topk_ids())
    E, K, L = store.num_experts, store.top_k, store.num_layers
    counts = expert_usage(ids, E)
    ent = usage_entropy(counts)
    phases = store.phases
    cross = cross_layer_repeat(ids)
    nxt = next_token_repeat(ids, store.seq_ids, store.positions)
    m = store.model
    return {
        "path": str(store.path),
        "model_id": m.model_id,
        "family": m.family,
        "tokens": store.num_tokens,
        "prefill_tokens": int((phases == 0).sum()),
        "decode_tokens": int((phases == 1).sum()),
        "sequences": store.num_sequences,
        "layers": L,
        "experts": E,
        "top_k": K,
        "hidden_size": m.hidden_size,
        "expert_bytes": m.expert_bytes,
        "hidden_layers": store.hidden_layers,
        "router_logits": store.has_router_logits,
        "router_weights": store.has_router_weights,
        "dataset": store.manifest.get("dataset", {}).get("name") or store.manifest.get("dataset", {}).get("source"),
        "complete": bool(store.manifest.get("complete")),
        "chance_repeat": K / E,
        "per_layer": [
            {
                "layer": l_,
                "entropy_bits": float(ent[l_]),
                "entropy_fraction": float(ent[l_] / np.log2(E)) if E > 1 else float("nan"),
                "experts_used": int((counts[l_] > 0).sum()),
                "top_expert_share": float(counts[l_].max() / max(counts[l_].sum(), 1)),
                "repeat_next_layer": float(cross[l_]) if l_ < L - 1 else None,
                "repeat_next_token": float(nxt[l_]),
            }
            for l_ in range(L)
        ],
        "usage_counts": counts.tolist(),
        "token": token_explained(store.token_ids, ids, store.seq_ids, E),
    }


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, spec)


def print_summary(s: dict[str, Any]) -> None:
    console = Console()
    head = Table(title=f"trace store {s['path']}", show_header=False, title_justify="left")
    head.add_column(style="bold")
    head.add_column()
    rows = [
        ("model", f"{s['model_id']} ({s['family']})"),
        ("tokens", f"{s['tokens']:,} ({s['prefill_tokens']:,} prefill, {s['decode_tokens']:,} decode)"),
        ("sequences", f"{s['sequences']:,}"),
        ("MoE layers", str(s["layers"])),
        ("experts / layer", str(s["experts"])),
        ("top-k", str(s["top_k"])),
        ("hidden states", ",".join(map(str, s["hidden_layers"])) or "none"),
        ("router logits / weights", f"{'yes' if s['router_logits'] else 'no'} / {'yes' if s['router_weights'] else 'no'}"),
        ("dataset", str(s["dataset"])),
        ("complete", "yes" if s["complete"] else "no (a run was interrupted; rerun to resume)"),
    ]
    for k, v in rows:
        head.add_row(k, v)
    console.print(head)
    t = Table(title=f"per MoE layer (chance repeat = K/E = {s['chance_repeat']:.3f})", title_justify="left")
    for col in ("layer", "entropy (bits)", "entropy / log2 E", "experts used", "top expert share",
                "repeat at l+1", "repeat at next token"):
        t.add_column(col, justify="right")
    for r in s["per_layer"]:
        t.add_row(str(r["layer"]), _fmt(r["entropy_bits"], ".2f"), _fmt(r["entropy_fraction"]),
                  f"{r['experts_used']}/{s['experts']}", _fmt(r["top_expert_share"]), _fmt(r["repeat_next_layer"]),
                  _fmt(r["repeat_next_token"]))
    console.print(t)
    tok = s.get("token")
    if tok is None:
        console.print("token alone: no token ids in this store (imported without a token column)")
        return
    t = Table(title=f"how much the token alone explains (train on {tok['train_rows']:,} rows, test on "
              f"{tok['test_rows']:,} rows of held-out sequences, {tok['holdout']}; {tok['seen_share']:.1%} of "
              f"test tokens seen in training)", title_justify="left")
    for col in ("layer", "token recall@k", "popularity recall@k", "H(expert) bits", "H(expert | token) bits",
                "explained"):
        t.add_column(col, justify="right")
    for r in tok["per_layer"]:
        t.add_row(str(r["layer"]), _fmt(r["token_recall"]), _fmt(r["popularity_recall"]), _fmt(r["entropy_bits"], ".2f"),
                  _fmt(r["conditional_entropy_bits"], ".2f"), _fmt(r["explained"]))
    console.print(t)


def write_heatmap(counts: np.ndarray, path: str | Path, *, title: str = "") -> Path:
    """PNG heatmap of expert usage: one row per MoE layer, share of that layer's top-k selections."""
    import matplotlib  # matplotlib: ~0.5 s to import; only for --png

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(counts, dtype=np.float64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    L, E = share.shape
    fig, ax = plt.subplots(figsize=(min(max(6, E * 0.12), 20), min(max(3, L * 0.3), 12)), dpi=120)
    im = ax.imshow(share, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title or "expert usage (share of each layer's top-k selections)")
    fig.colorbar(im, ax=ax, label="share of selections")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.inspect_store", description=__doc__.split("\n")[0])
    ap.add_argument("store", type=Path, help="trace store folder")
    ap.add_argument("--png", type=Path, default=None, help="write a per-layer expert-usage heatmap here")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON instead of tables")
    ap.add_argument("--verify", action="store_true",
                    help="also check every shard against its checksum and print the store's content digest "
                    "(sha256 of every row in sequence order: equal for stores that hold the same rows, however "
                    "they were written)")
    args = ap.parse_args(argv)
    store = TraceStore(args.store, verify_checksums=args.verify)
    if store.num_tokens == 0:
        raise UserError(f"{args.store} holds no tokens")
    s = summarize(store)
    if args.verify:
        s["content_digest"] = store.content_digest()
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if k != "usage_counts"}, indent=2))
    else:
        print_summary(s)
        if args.verify:
            print(f"content digest (sha256 of every row in sequence order): {s['content_digest']}")
    if args.png:
        write_heatmap(np.asarray(s["usage_counts"]), args.png, title=f"expert usage: {s['model_id']} ({s['tokens']:,} tokens)")
        if not args.json:
            print(f"heatmap -> {args.png}")


if __name__ == "__main__":
    run_cli(main)
