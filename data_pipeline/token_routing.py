"""How much of the routing the token alone explains: per-token expert counts and their statistics.

Real routers are strongly token-driven: the same token id tends to go to the same experts at a
layer, whatever its context. Two measures per MoE layer, on a store whose rows carry token ids
(imported traces without tokens have ``token_id == -1`` and get none):

- **token recall@K**: count, on the training sequences, how often each token id picked each
  expert; forecast a held-out occurrence with its token's K most-picked experts (a token never
  seen in training gets the layer's K most popular experts) and score |forecast ∩ truth| / K.
  Next to it the same score for popularity alone (the token-blind floor) and the share of
  held-out occurrences whose token was seen in training (the ceiling of what counting can do).
- **H(expert | token) vs H(expert)** (bits, over the layer's top-K selections; each token's K
  picks count 1/K each): the entropy left once the token is known, on all rows. The plug-in
  estimate is biased low for tokens seen only a few times, so read it together with recall.

The held-out sequences are every ``holdout``-th sequence in store order (deterministic).
The counting helper :func:`token_expert_counts` is shared with the token-aware predictors.
"""

from __future__ import annotations

from typing import Any

import numpy as np

NO_TOKEN = -1


def has_tokens(token_ids: np.ndarray) -> bool:
    """True when at least one row carries a token id (imported traces without tokens have -1)."""
    return bool(len(token_ids)) and bool((np.asarray(token_ids) >= 0).any())


def token_vocab(token_ids: np.ndarray, max_vocab: int | None = None) -> np.ndarray:
    """Sorted distinct token ids (>= 0); with ``max_vocab``, the most frequent ones (ties: lower id)."""
    ids, counts = np.unique(np.asarray(token_ids)[np.asarray(token_ids) >= 0], return_counts=True)
    if max_vocab is not None and len(ids) > max_vocab:
        keep = np.lexsort((ids, -counts))[:max_vocab]
        ids = np.sort(ids[keep])
    return ids.astype(np.int64)


def vocab_index(vocab: np.ndarray, token_ids: np.ndarray) -> np.ndarray:
    """Token ids -> rows of ``vocab`` (sorted), ``len(vocab)`` for tokens outside it (and -1)."""
    token_ids = np.asarray(token_ids, dtype=np.int64)
    pos = np.searchsorted(vocab, token_ids)
    pos_c = np.minimum(pos, max(len(vocab) - 1, 0))
    hit = (len(vocab) > 0) & (token_ids >= 0)
    hit = hit & (vocab[pos_c] == token_ids) if len(vocab) else np.zeros(len(token_ids), dtype=bool)
    return np.where(hit, pos_c, len(vocab))


def token_expert_counts(token_ids: np.ndarray, topk_ids: np.ndarray, num_experts: int,
                        vocab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(counts (V, L, E) float32, occurrences (V,) float32) of the rows whose token is in ``vocab``.

    counts[v, l, e] = rows with token ``vocab[v]`` that picked expert e at layer l.
    """
    topk_ids = np.asarray(topk_ids)
    n, num_layers, k = topk_ids.shape
    v = len(vocab)
    idx = vocab_index(vocab, token_ids)
    keep = idx < v
    idx, ids = idx[keep], topk_ids[keep].astype(np.int64)
    flat = (idx[:, None, None] * num_layers + np.arange(num_layers)[None, :, None]) * num_experts + ids
    counts = np.bincount(flat.reshape(-1), minlength=v * num_layers * num_experts)
    occurrences = np.bincount(idx, minlength=v)
    return (counts.reshape(v, num_layers, num_experts).astype(np.float32), occurrences.astype(np.float32))


def _entropy_bits(p: np.ndarray, axis: int = -1) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(p > 0, -p * np.log2(p), 0.0).sum(axis=axis)


def _topk_recall(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |top-k(scores) ∩ truth| / k; scores (N, E), truth (N, K) ids. Ties break by lower expert id."""
    if len(scores) == 0:
        return float("nan")
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return float((order[:, :, None] == truth[:, None, :]).any(axis=2).sum(axis=1).mean() / k)


def token_explained(token_ids: np.ndarray, topk_ids: np.ndarray, seq_ids: np.ndarray, num_experts: int,
                    holdout: int = 5) -> dict[str, Any] | None:
    """Per-layer token recall@K, popularity recall@K, seen share and H(expert|token) vs H(expert).

    None when no row has a token id. See the module doc for the definitions.
    """
    token_ids, topk_ids, seq_ids = np.asarray(token_ids), np.asarray(topk_ids), np.asarray(seq_ids)
    if not has_tokens(token_ids):
        return None
    _, num_layers, k = topk_ids.shape
    order = np.unique(seq_ids, return_inverse=True)[1]
    test = (order % holdout) == holdout - 1
    if not test.any() or test.all():
        test = np.zeros(len(seq_ids), dtype=bool)
        test[len(seq_ids) * 4 // 5:] = True  # a single sequence: its last fifth
    train = ~test & (token_ids >= 0)
    test = test & (token_ids >= 0)
    vocab = token_vocab(token_ids[train])
    counts, _ = token_expert_counts(token_ids[train], topk_ids[train], num_experts, vocab)
    pop = np.stack([np.bincount(topk_ids[train][:, layer].reshape(-1).astype(np.int64), minlength=num_experts)
                    for layer in range(num_layers)]).astype(np.float64)
    idx = vocab_index(vocab, token_ids[test])
    seen = idx < len(vocab)
    all_vocab = token_vocab(token_ids)
    all_counts, all_occ = token_expert_counts(token_ids, topk_ids, num_experts, all_vocab)
    per_layer = []
    for layer in range(num_layers):
        # token forecast: its counts, ties and unseen tokens broken by popularity (tiny weight)
        scores = pop[layer][None, :] * 1e-9 / max(pop[layer].sum(), 1)
        scores = np.repeat(scores, len(idx), axis=0)
        scores[seen] += counts[idx[seen], layer]
        truth = topk_ids[test][:, layer]
        h = float(_entropy_bits(all_counts[:, layer].sum(axis=0) / max(all_counts[:, layer].sum(), 1)))
        p_tok = all_counts[:, layer] / np.maximum(all_counts[:, layer].sum(axis=1, keepdims=True), 1)
        h_cond = float((_entropy_bits(p_tok) * all_occ).sum() / max(all_occ.sum(), 1))
        per_layer.append({
            "layer": layer,
            "token_recall": _topk_recall(scores, truth, k),
            "popularity_recall": _topk_recall(np.repeat(pop[layer][None], len(truth), axis=0), truth, k),
            "entropy_bits": h,
            "conditional_entropy_bits": h_cond,
            "explained": 1.0 - h_cond / h if h > 0 else float("nan"),
        })
    return {
        "holdout": f"every {holdout}th sequence",
        "train_rows": int(train.sum()),
        "test_rows": int(test.sum()),
        "distinct_tokens": int(len(all_vocab)),
        "seen_share": float(seen.mean()) if len(seen) else float("nan"),
        "per_layer": per_layer,
    }
