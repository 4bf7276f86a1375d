"""benchmarks/olmoe_reference.py: the published OLMoE routing counts, the metrics, the verdict, and a CPU run."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.demo_text import gsm8k_texts
from data_pipeline.trace_store import open_store

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "olmoe_reference.py"
REFERENCE = json.loads((REPO / "benchmarks" / "olmoe_reference.json").read_text())
DOMAINS = ("arxiv", "book", "c4", "github", "wikipedia")


def _load_script():
    spec = importlib.util.spec_from_file_location("olmoe_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


ref = _load_script()


@pytest.fixture(autouse=True)
def restore_threads():
    """The script sets torch's thread count (--threads); keep it from leaking into other tests."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_reference_counts_are_whole():
    method = REFERENCE["method"]
    assert REFERENCE["source"]["license"].startswith("Apache-2.0")
    assert tuple(REFERENCE["domains"]) == DOMAINS
    for entry in REFERENCE["domains"].values():
        assert set(entry["counts"]) == {"0", "7", "15"}
        for counts in entry["counts"].values():
            assert len(counts) == method["num_experts"] == 64
            assert sum(counts) == method["top_k"] * method["chunks"] * method["chunk_tokens"] == 8 * 102 * 2048
        assert len(entry["text_sha256"]) == 64
        # every text holds at least the 102 chunks the counts came from
        assert entry["text_tokens"] >= method["chunks"] * method["chunk_tokens"]


def test_metrics_hand_computed():
    same = np.array([4, 3, 2, 1, 0, 0])
    assert ref.compare(same, same * 10) == (pytest.approx(1.0), 5, pytest.approx(0.0))
    up, down = np.arange(1, 7), np.arange(6, 0, -1)
    rho, top, tvd = ref.compare(up, down)
    assert rho == pytest.approx(-1.0)
    assert top == 4  # top-5 of up: experts 5..1, of down: 0..4
    assert tvd == pytest.approx(0.5 * (5 + 3 + 1 + 1 + 3 + 5) / 21)


def test_layer_map():
    assert ref.layer_map([0, 7, 15], 16, 16) == {0: 0, 7: 7, 15: 15}
    assert ref.layer_map([0, 7, 15], 16, 6) == {0: 0, 7: 2, 15: 5}


def _published(num_experts: int = 64) -> dict[str, dict[int, np.ndarray]]:
    return {d: {int(k): np.asarray(v[:num_experts]) for k, v in e["counts"].items()}
            for d, e in REFERENCE["domains"].items()}


def _comparisons(measured: dict[str, str]):
    """Comparisons as the script builds them, with 'ours' = the published vector of ``measured[domain]``."""
    pub = _published()
    out = []
    for text, source in measured.items():
        for d in DOMAINS:
            for layer in (0, 7, 15):
                out.append(ref.Comparison(text, d, layer, layer, *ref.compare(pub[source][layer], pub[d][layer])))
    return out, pub


def test_verdict_matches_the_published_vectors_themselves():
    comps, pub = _comparisons({d: d for d in DOMAINS})
    v = ref.verdict(comps, pub, [0, 7, 15])
    assert v["verdict"] == "MATCH" and v["matched"] == v["of"] == 15


def test_verdict_rejects_another_domains_routing():
    shifted = dict(zip(DOMAINS, DOMAINS[1:] + DOMAINS[:1], strict=True))  # arxiv text "measured" as book, ...
    comps, pub = _comparisons(shifted)
    v = ref.verdict(comps, pub, [0, 7, 15])
    assert v["verdict"] == "NO MATCH" and v["matched"] == 0


@pytest.mark.slow
def test_tiny_olmoe_on_the_demo_text(tmp_path):
    out = tmp_path / "result.json"
    ref.main(["--model", "tiny-olmoe", "--max-chunks", "2", "--no-progress", "--json", str(out),
              "--out", str(tmp_path / "stores")])
    result = json.loads(out.read_text())
    assert result["layer_map"] == {"0": 0, "7": 2, "15": 5}
    assert result["chunk_tokens"] == 512  # tiny-olmoe's max_position_embeddings
    assert result["token_agreement"]["demo"] == {"tokens_same": 1024, "tokens": 1024, "chunks_exact": 2, "chunks": 2}
    assert len(result["comparisons"]) == 5 * 3
    pub = _published(32)
    for c in result["comparisons"]:
        assert -1 <= c["spearman"] <= 1 and 0 <= c["top5_overlap"] <= 5 and 0 <= c["tvd"] <= 1
        ours = np.asarray(result["frequencies"]["demo"][str(c["ref_layer"])])
        theirs = pub[c["reference"]][c["ref_layer"]] / pub[c["reference"]][c["ref_layer"]].sum()
        assert c["tvd"] == pytest.approx(0.5 * np.abs(ours - theirs).sum())  # recomputed here
    freqs = result["frequencies"]["demo"]
    assert all(len(f) == 32 and sum(f) == pytest.approx(1.0) for f in freqs.values())
    # and they are the stored routing: count layer 2's top-4 picks in the kept trace store

    store = open_store(tmp_path / "stores" / "demo")
    counts = np.bincount(store.topk_ids([2]).reshape(-1).astype(np.int64), minlength=32)
    assert np.allclose(counts / counts.sum(), freqs["7"])
    assert result["verdict"]["verdict"] == "NOT APPLICABLE"
    assert set(result["verdict"]["closest"]) == {"0", "7", "15"}


@pytest.mark.slow
def test_published_texts_path_checks_checksums(tmp_path, capsys):
    """The --texts path on two stand-in 'domains' (the real texts are not in this repository)."""
    texts = tmp_path / "text"
    texts.mkdir()
    problems = gsm8k_texts()
    reference = {k: REFERENCE[k] for k in ("source", "method")}
    reference["domains"] = {}
    for i, domain in enumerate(("arxiv", "book")):
        raw = "\n\n".join(problems[i * 40:(i + 1) * 40]).encode()
        (texts / f"{domain}_texts.txt").write_bytes(raw)
        reference["domains"][domain] = {**REFERENCE["domains"][domain], "text_file": f"x/{domain}_texts.txt",
                                        "text_sha256": hashlib.sha256(raw).hexdigest()}
    ref_path = tmp_path / "reference.json"
    ref_path.write_text(json.dumps(reference))
    out = tmp_path / "result.json"
    ref.main(["--model", "tiny-olmoe", "--texts", str(texts), "--reference", str(ref_path), "--max-chunks", "1",
              "--no-progress", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["token_agreement"]) == {"arxiv", "book"}
    assert result["verdict"]["of"] == 6 and result["verdict"]["verdict"] in ("MATCH", "PARTIAL", "NO MATCH")
    assert "verdict:" in capsys.readouterr().out

    (texts / "book_texts.txt").write_bytes(b"not the published text")
    with pytest.raises(SystemExit) as exit_info:
        ref.run_cli(ref.main, ["--model", "tiny-olmoe", "--texts", str(texts), "--reference", str(ref_path)])
    assert exit_info.value.code == 2
    assert "is not the published text" in capsys.readouterr().err
