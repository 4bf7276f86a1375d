"""Prompts for the engine: texts from a dataset, split into question and reference answer.

GSM8K texts (the offline demo text and the ``gsm8k`` preset) are ``question + newline + solution``
ending in ``#### <number>``; the engine prompts with the question only and scores exact match on
that number, and the solution is the prompt's *continuation*: the reference text perplexity is
measured on (offload.engine.quality). Other texts are used whole as prompts, with no answer; their
quality is measured on their own second half.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import UserError
from data_pipeline.text_sources import load_texts

_FINAL = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")
_NUMBER = re.compile(r"[-+]?\d[\d,]*\.?\d*")


@dataclass(frozen=True)
class Prompt:
    text: str  # what the model is given
    answer: str | None = None  # the reference final answer (GSM8K), normalised
    continuation: str | None = None  # the reference text that follows ``text`` (GSM8K: the solution)


def _normalise(number: str) -> str:
    n = number.replace(",", "").strip().rstrip(".")
    if "." in n:
        n = n.rstrip("0").rstrip(".")
    return n.lstrip("+") or "0"


def split_gsm8k(text: str) -> Prompt:
    """``question\\nsolution #### 18`` -> Prompt("Question: ...\\nAnswer:", "18"); other text whole."""
    m = _FINAL.search(text)
    if m is None or "\n" not in text:
        return Prompt(text)
    question, solution = text.split("\n", 1)
    return Prompt(f"Question: {question.strip()}\nAnswer:", _normalise(m.group(1)), " " + solution.strip())


def extract_answer(generated: str) -> str | None:
    """The final number of a generation: after ``####`` when present, else the last number."""
    m = _FINAL.search(generated)
    if m is not None:
        return _normalise(m.group(1))
    numbers = _NUMBER.findall(generated)
    return _normalise(numbers[-1]) if numbers else None


def exact_match(generated: str, answer: str | None) -> bool | None:
    if answer is None:
        return None
    return extract_answer(generated) == answer


def load_prompts(dataset: str, count: int, *, skip: int = 0) -> list[Prompt]:
    """``count`` prompts of ``dataset`` (a :func:`data_pipeline.text_sources.load_texts` spec)."""
    if count < 1:
        raise UserError(f"--prompts must be at least 1, got {count}")
    source = load_texts(dataset, limit=skip + count)
    texts = list(source)[skip:]
    if not texts:
        raise UserError(f"dataset {dataset!r} has no texts after skipping {skip}")
    return [split_gsm8k(t) for t in texts]
