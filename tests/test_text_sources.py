"""Text sources: demo text from the wheel, local files through the datasets code path, bad specs."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from core.errors import UserError
from data_pipeline import text_sources
from data_pipeline.corpus import split_documents
from data_pipeline.text_sources import load_texts


def test_demo_is_gsm8k_test():
    src = load_texts("demo")
    texts = list(src)
    assert len(texts) == 1319 and texts[0].startswith("Janet’s ducks lay 16 eggs") and "#### 18" in texts[0]
    assert src.spec["name"] == "demo:gsm8k" and len(load_texts("demo", limit=5)) == 5


def test_txt_paragraphs_or_lines(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("first para\nstill first\n\nsecond\n")
    assert list(load_texts(str(p))) == ["first para\nstill first", "second"]
    p.write_text("one\ntwo\nthree\n")
    assert list(load_texts(str(p))) == ["one", "two", "three"]


def test_jsonl_and_parquet_fields(tmp_path):
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "q": "x"}\n{"text": "b", "q": "y"}\n')
    assert list(load_texts(str(j))) == ["a", "b"]
    assert list(load_texts(str(j), text_field="q")) == ["x", "y"]
    with pytest.raises(UserError, match="no text field 'body'"):
        load_texts(str(j), text_field="body")
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["a1", "a2"]}), tmp_path / "d.parquet")
    with pytest.raises(UserError, match="choose a text field"):
        load_texts(str(tmp_path / "d.parquet"))
    assert list(load_texts(str(tmp_path / "d.parquet"), text_field="answer", limit=1)) == ["a1"]


def test_preset_through_local_parquet(tmp_path, monkeypatch):
    """The gsm8k preset's hub call, served from a local parquet by the same datasets.load_dataset."""
    import datasets  # datasets: ~1 s to import; only this test

    pq.write_table(pa.table({"question": ["How many?"], "answer": ["Two.\n#### 2"]}), tmp_path / "g.parquet")
    real = datasets.load_dataset
    seen = {}

    def fake(path, config=None, split=None, **kw):
        seen["args"] = (path, config, split)
        return real("parquet", data_files=str(tmp_path / "g.parquet"), split="train")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    src = load_texts("gsm8k")
    assert seen["args"] == ("gsm8k", "main", "test")
    assert list(src) == ["How many?\nTwo.\n#### 2"] and src.spec["split"] == "test"
    assert list(load_texts("gsm8k", text_field="question")) == ["How many?"]


def test_unknown_dataset_offline_one_line():
    with pytest.raises(UserError) as e:
        load_texts("nobody/no-such-dataset-xyz")
    assert "no-such-dataset-xyz" in str(e.value) and "offline" in str(e.value) and "\n" not in str(e.value)


def test_missing_file():
    with pytest.raises(UserError, match="does not exist"):
        load_texts("./no/such.jsonl")


def test_presets_named():
    assert set(text_sources.PRESETS) == {"gsm8k", "nq_open", "truthful_qa", "wikitext"}


def test_demo_heldout_is_olmoe_minis_test_documents():
    src = load_texts("demo:heldout", limit=50)
    test = [d.text for d in split_documents()["test"]]
    assert list(src) == test[:50] and len(test) > 4000
    assert src.spec["name"] == "demo:heldout" and src.spec["split"] == "test"


def test_demo_heldout_prompts_are_document_halves():
    docs = list(load_texts("demo:heldout", limit=20))
    prompts = list(load_texts("demo:heldout-prompts", limit=20))
    for doc, prompt in zip(docs, prompts, strict=True):
        words = doc.split(" ")
        assert prompt == " ".join(words[: max(1, len(words) // 2)]) and doc.startswith(prompt)
