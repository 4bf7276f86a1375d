"""Collection overhead: hooked forward (what collect_traces runs) vs a plain forward, same model and batch.

Run by hand: ``.venv/bin/python benchmarks/collect.py [--batches 10] [--olmoe-shaped]``. Prints a table with
ms per batch, tokens/s and the ratio (goal <= 1.10x). "hooked" includes moving the non-pad rows of
top-k ids/weights, fp16 logits and fp16 hidden states of every layer to numpy (no disk writes).
"""

from __future__ import annotations

import argparse
import time

import torch

from data_pipeline.collect import RouterRecorder, _gather, encode_batch
from data_pipeline.demo_text import olmo_tokenizer
from data_pipeline.models import LoadedModel, build_tiny_olmoe, load_model
from data_pipeline.text_sources import demo_texts


def bench(loaded: LoadedModel, batch_size: int, seq_len: int, batches: int) -> tuple[float, float, int]:
    texts = demo_texts()[: batch_size * batches]
    encs = [encode_batch(loaded.tokenizer, texts[i:i + batch_size], seq_len) for i in range(0, len(texts), batch_size)]
    base, ad = loaded.model.model, loaded.adapter
    layers = list(range(ad.num_layers))
    n_tok = sum(int(e["attention_mask"].sum()) for e in encs)

    def plain():
        for e in encs:
            base(**e, use_cache=False)

    def hooked():
        with RouterRecorder(ad, layers, True) as rec:
            for e in encs:
                rec.clear()
                base(**e, use_cache=False)
                _gather(rec, e["attention_mask"].bool(), ad.num_layers, layers, True)

    with torch.inference_mode():
        plain(), hooked()  # warm-up
        tp, th = [], []
        for _ in range(3):  # interleaved, best of 3: robust to a shared machine
            for fn, acc in ((plain, tp), (hooked, th)):
                t = time.perf_counter()
                fn()
                acc.append(time.perf_counter() - t)
    return min(tp), min(th), n_tok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--olmoe-shaped", action="store_true", help="also a 4-layer 64-expert top-8 H=1024 model")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no OpenMP spin on a shared box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [("tiny-olmoe", load_model("tiny-olmoe"), 16, 128)]
    if args.olmoe_shaped:
        m = build_tiny_olmoe(0, hidden_size=1024, intermediate_size=512, num_hidden_layers=4, num_experts=64,
                             num_experts_per_tok=8, num_attention_heads=8, num_key_value_heads=8)
        lm = load_model("tiny-olmoe")
        rows.append(("olmoe-shaped", LoadedModel(m, olmo_tokenizer(), __import__("data_pipeline.adapters",
                     fromlist=["get_adapter"]).get_adapter(m), lm.info, "olmoe-shaped"), 8, 128))
    print(f"{'model':<14}{'plain ms/batch':>16}{'hooked ms/batch':>17}{'overhead':>10}{'tok/s plain':>13}{'tok/s hooked':>14}")
    for name, loaded, bs, sl in rows:
        tp, th, n = bench(loaded, bs, sl, args.batches)
        nb = args.batches
        print(f"{name:<14}{tp / nb * 1e3:>16.1f}{th / nb * 1e3:>17.1f}{th / tp:>9.3f}x{n / tp:>13,.0f}{n / th:>14,.0f}")


if __name__ == "__main__":
    main()
