"""Build ``benchmarks/olmoe_reference.json`` from a checkout of github.com/allenai/OLMoE (Apache-2.0).

The OLMoE authors published, for five text domains, how often each of OLMoE's 64 experts is in a
token's top-8 at layers 0, 7 and 15 (``scripts/routing_output/olmoe/expert_counts/<domain>.pkl``),
with the input texts (``scripts/routing_output/text/<domain>_texts.txt``). This script turns the
pickled counters into plain JSON (read with an unpickler that admits only ``Counter``,
``defaultdict`` and numpy integer scalars) and records where everything came from, the selection
and chunking rule of ``scripts/run_routing_analysis.py`` at the commit that wrote the counts, and
each text's size and SHA-256 instead of the texts themselves (1.3-1.9 MB each; the benchmark reads
them from a checkout given with ``--texts``). It also tokenises each text with the OLMo tokenizer
this repository uses and checks the token histogram of the counted window against the published
per-expert token tables (``eid2token``), so a user knows how exactly our chunks reproduce theirs.

    git clone https://github.com/allenai/OLMoE && python benchmarks/olmoe_reference_build.py OLMoE
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.errors import UserError, run_cli  # noqa: E402
from data_pipeline.demo_text import olmo_tokenizer  # noqa: E402

OUT = Path(__file__).with_name("olmoe_reference.json")
COUNTS_COMMIT = "2aecf25991ac1bbfb75d96f01853fe65e1f46e3f"  # "Domain specialization: updated scripts, data and plotting"
TEXTS_COMMIT = "ea40431928c13a8caa43c0a39f809a04aa591043"  # "routing_analysis": the texts, unchanged since
#: domain name in the counts -> stem of the text file (the script's name2finaldata, reversed)
DOMAINS = {"arxiv": "arxiv", "book": "b3g", "c4": "c4", "github": "github_oss_with_stack", "wikipedia": "wikipedia"}
LAYERS = (0, 7, 15)
CHUNK_TOKENS, CHUNKS, TOP_K, NUM_EXPERTS, NUM_LAYERS = 2048, 102, 8, 64, 16


class _CountersOnly(pickle.Unpickler):
    """Admit only the types the published pickles hold (Counter/defaultdict of numpy int64 keys)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "Counter"):
            return collections.Counter
        if (module, name) == ("collections", "defaultdict"):
            return collections.defaultdict
        if (module, name) == ("numpy", "dtype"):
            return np.dtype
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            from numpy._core.multiarray import scalar  # numpy 2's private module: only when a pickle names it

            return scalar
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _load(path: Path):
    with open(path, "rb") as f:
        return _CountersOnly(f).load()


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout.strip()


def build(repo: Path) -> dict:
    scripts = repo / "scripts"
    if not (scripts / "routing_output").is_dir():
        raise UserError(f"{repo} is not a checkout of allenai/OLMoE (no scripts/routing_output)")
    tokenizer = olmo_tokenizer()
    domains = {}
    for domain, stem in DOMAINS.items():
        counts_path = scripts / "routing_output" / "olmoe" / "expert_counts" / f"{domain}.pkl"
        text_path = scripts / "routing_output" / "text" / f"{stem}_texts.txt"
        counters = _load(counts_path)
        counts = {str(layer): [int(c.get(e, 0)) for e in range(NUM_EXPERTS)]
                  for layer, c in zip(LAYERS, counters, strict=True)}
        if any(sum(v) != TOP_K * CHUNKS * CHUNK_TOKENS for v in counts.values()):
            raise UserError(f"{counts_path}: counts do not sum to {TOP_K} x {CHUNKS} x {CHUNK_TOKENS} per layer")
        raw = text_path.read_bytes()
        ids = tokenizer(raw.decode("utf-8"), truncation=False, verbose=False)["input_ids"]
        entry = {
            "text_file": f"scripts/routing_output/text/{text_path.name}",
            "text_bytes": len(raw),
            "text_sha256": hashlib.sha256(raw).hexdigest(),
            "text_tokens": len(ids),
            "counts_file": f"scripts/routing_output/olmoe/expert_counts/{domain}.pkl",
            "counts": counts,
        }
        table = scripts / "routing_output" / "olmoe" / "eid2token" / f"{domain}.pkl"
        try:
            per_expert = _load(table)[0]  # layer 0: expert -> Counter(token id -> picks)
        except (pickle.UnpicklingError, EOFError, OSError):
            entry["tokenization_check"] = f"not checked: eid2token/{table.name} could not be read from the checkout used"
        else:
            picks = collections.Counter()  # token id -> picks over all experts = TOP_K x occurrences
            for c in per_expert.values():
                picks.update({int(t): int(n) for t, n in c.items()})
            published = collections.Counter({t: n // TOP_K for t, n in picks.items()})
            ours = collections.Counter(ids[: CHUNKS * CHUNK_TOKENS])
            diff = sum(abs(published[t] - ours[t]) for t in set(published) | set(ours)) // 2
            entry["tokenization_check"] = {
                "tokens_counted_differently": diff, "of": CHUNKS * CHUNK_TOKENS,
                "against": f"scripts/routing_output/olmoe/eid2token/{domain}.pkl, layer 0 (token histogram)",
            }
        domains[domain] = entry
    return {
        "what": "Per-expert routing counts of OLMoE at layers 0, 7 and 15 on five text domains, as published "
                "by the OLMoE authors, with the texts' source and the exact selection and chunking rule.",
        "source": {
            "repository": "https://github.com/allenai/OLMoE",
            "license": "Apache-2.0 (the repository's LICENSE); counts copied, texts referenced by checksum",
            "counts_commit": COUNTS_COMMIT,
            "texts_commit": TEXTS_COMMIT,
            "checked_at_commit": _git(repo, "rev-parse", "HEAD"),
            "script": f"scripts/run_routing_analysis.py at {COUNTS_COMMIT[:7]}",
            "checkpoint": "OLMoE/OLMoE-1B-7B-0824: a pre-release name; the released model is "
                          "allenai/OLMoE-1B-7B-0924, so small differences are expected",
            "not_included": "tulu (its text file is not in the repository and its counts came from a later "
                            "script with different chunking); mistral counts",
        },
        "method": {
            "tokenizer": "OLMoE's (allenai/gpt-neox-olmo-dolma-v1_5), no special tokens added",
            "read": "the whole text file, UTF-8, without newline translation (keeps \\r\\n: matches the "
                    "published token histogram better than Python's default text mode)",
            "chunking": f"tokenize the whole file without truncation; consecutive {CHUNK_TOKENS}-token chunks "
                        f"from the start; the first {CHUNKS} (the script breaks on `i > 100` after processing chunk i); "
                        "one chunk per forward pass, batch 1, no padding",
            "chunk_tokens": CHUNK_TOKENS,
            "chunks": CHUNKS,
            "selection": f"a token's top-{TOP_K} experts by router logit (argsort of -logits)",
            "count": f"per layer, how many of the {CHUNKS} x {CHUNK_TOKENS} tokens have each expert in their "
                     f"top-{TOP_K} (each layer sums to {TOP_K * CHUNKS * CHUNK_TOKENS})",
            "num_layers": NUM_LAYERS,
            "num_experts": NUM_EXPERTS,
            "top_k": TOP_K,
            "layers": list(LAYERS),
        },
        "domains": domains,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", type=Path, help="a checkout (work tree) of github.com/allenai/OLMoE")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    data = build(args.repo)
    text = json.dumps(data, indent=1)
    # one line per list of counts instead of one line per number
    text = re.sub(r"\[\s+([-\d,\s]+?)\s+\]", lambda m: "[" + ", ".join(m.group(1).split()).replace(",,", ",") + "]", text)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    run_cli(main)
