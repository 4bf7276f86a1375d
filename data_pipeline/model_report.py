"""The numbers of a pretrained model's card, measured on its held-out documents.

    python -m data_pipeline.model_report models/olmoe-mini [--json report.json]

Everything is measured on the committed weights as ``load_model`` returns them (fp32 on CPU) and
on documents the model never trained on (the ``test`` part of :mod:`data_pipeline.corpus`):

- **perplexity** of the model, of the same shape untrained (same seed: the step-0 weights) and of a
  unigram model (token frequencies of the training blocks, add-one smoothed over the tokenizer's
  vocabulary), all on the same target tokens of the held-out blocks;
- **routing entropy per layer**, trained and untrained: the mean entropy (bits) of one token's
  router distribution (a decisive router is low; a uniform one is log2 E), and the entropy of
  the layer's expert usage over all top-k picks (load balance: log2 E is perfectly balanced);
- **gate-lookahead recall@k at d = 1..3** (layer l+d's router on layer l's MoE input; with k = top-k
  it equals the overlap |forecast ∩ truth| / k), next to ``tiny-olmoe`` on the same texts, from
  trace stores collected the way the demo collects them (one text per sequence, ``--seq-len``);
- how much of each layer's routing the token alone explains (:mod:`data_pipeline.token_routing`).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError, run_cli
from data_pipeline.collect import collect_traces
from data_pipeline.corpus import heldout_texts
from data_pipeline.datamodule import TokenDataset
from data_pipeline.models import load_model
from data_pipeline.pretrain import PretrainConfig, build_model, corpus_blocks
from data_pipeline.token_routing import token_explained
from predictors.evaluation import evaluate_predictor
from predictors.gate_lookahead import GateLookahead


@torch.no_grad()
def block_nll(model, blocks: torch.Tensor, batch_size: int = 8, chunk: int = 256) -> tuple[float, int]:
    """(summed next-token NLL in nats, number of predicted tokens) of a causal LM over packed blocks."""
    total, count = 0.0, 0
    w = model.lm_head.weight.float()
    for s in range(0, len(blocks), batch_size):
        x = blocks[s:s + batch_size]
        h = model.model(input_ids=x, use_cache=False).last_hidden_state[:, :-1].reshape(-1, w.shape[1]).float()
        y = x[:, 1:].reshape(-1)
        for c in range(0, len(y), chunk):
            logits = h[c:c + chunk] @ w.T
            total += float((torch.logsumexp(logits, -1) - logits.gather(1, y[c:c + chunk, None])[:, 0]).sum())
        count += len(y)
    return total, count


def unigram_nll(train_blocks: torch.Tensor, test_blocks: torch.Tensor, vocab_size: int) -> tuple[float, int]:
    """Add-one unigram model of the training tokens, scored on the test blocks' predicted tokens."""
    counts = np.bincount(train_blocks.reshape(-1).numpy(), minlength=vocab_size)[:vocab_size].astype(np.float64)
    logp = np.log(counts + 1.0) - np.log(counts.sum() + vocab_size)
    y = test_blocks[:, 1:].reshape(-1).numpy()
    return float(-logp[y].sum()), len(y)


@torch.no_grad()
def routing_entropy(model, blocks: torch.Tensor, batch_size: int = 8) -> dict[str, list[float]]:
    """Per layer: mean per-token router entropy (bits) and expert-usage entropy of the top-k picks (bits)."""
    cfg = model.config
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    token_h = np.zeros(cfg.num_hidden_layers)
    usage = np.zeros((cfg.num_hidden_layers, e))
    n = 0
    for s in range(0, len(blocks), batch_size):
        out = model.model(input_ids=blocks[s:s + batch_size], output_router_logits=True, use_cache=False)
        for layer, logits in enumerate(out.router_logits):
            p = torch.softmax(logits.float(), dim=-1)
            token_h[layer] += float(-(p * torch.log2(p.clamp(min=1e-30))).sum())
            usage[layer] += np.bincount(p.topk(k, dim=-1).indices.reshape(-1).numpy(), minlength=e)
        n += out.router_logits[0].shape[0]
    share = usage / usage.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        usage_h = np.where(share > 0, -share * np.log2(share), 0.0).sum(axis=1)
    return {"token_entropy_bits": (token_h / n).tolist(), "usage_entropy_bits": usage_h.tolist()}


def gate_and_token_stats(loaded, texts: list[str], seq_len: int, lookahead: int = 3) -> dict[str, Any]:
    """Collect a store of ``loaded`` on ``texts`` (hidden states at every layer) in a temp folder;
    gate-lookahead recall@k per distance and the token-explained statistics."""
    with tempfile.TemporaryDirectory() as tmp:
        store = collect_traces(loaded, texts, Path(tmp) / "store", max_tokens=None, seq_len=seq_len,
                               hidden_layers="all", router_logits=False, progress=False,
                               dataset_spec={"name": "heldout", "texts": len(texts)})
        ds = TokenDataset(store, np.arange(store.num_tokens), hidden=True)
        batches = [ds.__getitems__(list(range(s, min(s + 1024, len(ds))))) for s in range(0, len(ds), 1024)]
        gate = GateLookahead.from_store(store, lookahead)
        metric = evaluate_predictor(gate, batches, num_experts=store.num_experts, hidden_layers=store.hidden_layers,
                                    desc="")
        recall = metric.per_distance()["recall@k"].tolist()
        tok = token_explained(store.token_ids, store.topk_ids(), store.seq_ids, store.num_experts)
        return {"tokens": store.num_tokens, "sequences": store.num_sequences, "gate_recall": recall, "token": tok}


def report(model_dir: str | Path, *, max_blocks: int = 400, texts: int = 400, seq_len: int = 128) -> dict[str, Any]:
    """Every number of the card (see the module doc) as a JSON-able dict."""
    model_dir = Path(model_dir)
    record_path = model_dir / "training.json"
    if not record_path.is_file():
        raise UserError(f"{model_dir} has no training.json (not written by data_pipeline.pretrain)")
    record = json.loads(record_path.read_text())
    cfg = PretrainConfig(**record["config"])
    loaded = load_model(str(model_dir))
    model = loaded.model
    blocks = corpus_blocks(cfg, loaded.tokenizer)
    test = blocks["test"][:max_blocks]
    untrained = build_model(cfg).float().eval()
    out: dict[str, Any] = {"model": str(model_dir), "test_blocks": len(test), "seq_len": cfg.seq_len}
    t0 = time.perf_counter()
    for name, nll in (("trained", block_nll(model, test)), ("untrained", block_nll(untrained, test)),
                      ("unigram", unigram_nll(blocks["train"], test, len(loaded.tokenizer)))):
        out.setdefault("perplexity", {})[name] = math.exp(nll[0] / nll[1])
        out["predicted_tokens"] = nll[1]
    out["routing"] = {"trained": routing_entropy(model, test[:100]), "untrained": routing_entropy(untrained, test[:100])}
    held = heldout_texts()[:texts]
    out["lookahead_texts"] = len(held)
    out["olmoe_mini"] = gate_and_token_stats(loaded, held, seq_len)
    out["tiny_olmoe"] = gate_and_token_stats(load_model("tiny-olmoe"), held, seq_len)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def markdown(r: dict[str, Any]) -> str:
    """The card's tables."""
    p = r["perplexity"]
    lines = [f"Held-out perplexity ({r['predicted_tokens']:,} predicted tokens in {r['test_blocks']} blocks of "
             f"{r['seq_len']}):", "", "| model | perplexity |", "|---|---|"]
    lines += [f"| olmoe-mini | {p['trained']:.1f} |", f"| unigram (add-one, training tokens) | {p['unigram']:.1f} |",
              f"| untrained (same shape and seed) | {p['untrained']:.1f} |", ""]
    tr, un = r["routing"]["trained"], r["routing"]["untrained"]
    lines += ["Routing entropy per layer (bits; uniform over the experts = log2 E):", "",
              "| layer | router entropy per token | untrained | usage entropy | untrained |", "|---|---|---|---|---|"]
    for i in range(len(tr["token_entropy_bits"])):
        lines.append(f"| {i} | {tr['token_entropy_bits'][i]:.2f} | {un['token_entropy_bits'][i]:.2f} | "
                     f"{tr['usage_entropy_bits'][i]:.2f} | {un['usage_entropy_bits'][i]:.2f} |")
    a, b = r["olmoe_mini"], r["tiny_olmoe"]
    lines += ["", f"Gate lookahead (layer l+d's router on layer l's MoE input), recall@k = overlap with the true "
              f"top-k, {a['tokens']:,} tokens of {r['lookahead_texts']} held-out documents:", "",
              "| model | d=1 | d=2 | d=3 |", "|---|---|---|---|"]
    for name, s in (("olmoe-mini", a), ("tiny-olmoe (random)", b)):
        lines.append(f"| {name} | " + " | ".join(f"{x:.3f}" for x in s["gate_recall"]) + " |")
    lines += ["", "The token alone (recall@k of the token's most-picked experts on held-out sequences; "
              "H in bits):", "", "| layer | olmoe-mini token recall | popularity recall | H(expert) | "
              "H(expert given token) | tiny-olmoe token recall |", "|---|---|---|---|---|---|"]
    tiny = {y["layer"]: y["token_recall"] for y in b["token"]["per_layer"]}
    for x in a["token"]["per_layer"]:
        other = f"{tiny[x['layer']]:.3f}" if x["layer"] in tiny else "-"
        lines.append(f"| {x['layer']} | {x['token_recall']:.3f} | {x['popularity_recall']:.3f} | "
                     f"{x['entropy_bits']:.2f} | {x['conditional_entropy_bits']:.2f} | {other} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.model_report", description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path, help="a folder written by data_pipeline.pretrain")
    ap.add_argument("--max-blocks", type=int, default=400, help="held-out blocks for perplexity")
    ap.add_argument("--texts", type=int, default=400, help="held-out documents for the lookahead stores")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per document in the lookahead stores")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    r = report(args.model_dir, max_blocks=args.max_blocks, texts=args.texts, seq_len=args.seq_len)
    if args.json:
        args.json.write_text(json.dumps(r, indent=2) + "\n")
    print(markdown(r))


if __name__ == "__main__":
    run_cli(main)
