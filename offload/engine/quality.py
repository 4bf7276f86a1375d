"""Output quality of an offloaded configuration: held-out perplexity and next-token agreement.

Drop, substitute, cache-aware routing and lower-bit experts change what the model computes; the
paper reports quality next to speed, and so does ``evaluate.py``. Both numbers are **teacher-forced
on held-out text continuations**: each prompt's context is prefilled, then the reference
continuation (a GSM8K prompt's solution; another text's second half) is fed one true token per
decode pass (:func:`offload.engine.generate.teacher_forced`: the passes generation runs, so the
cache sees decode-time accesses), and every configuration is scored on the same tokens:

- **perplexity** = exp(mean negative log-likelihood of the continuation's tokens, over all prompts);
- **next-token agreement** = share of those positions where the configuration's most likely next
  token is the plain model's (a greedy generation's agreement compounds one early difference over
  the rest of the text; this one does not).

With demand fetch at full precision the engine's logits are the plain model's bit for bit, so its
perplexity is exactly the plain model's (tests/test_engine_quality.py). Perplexity is defined for
any causal LM: on a randomly initialised model it sits near the vocabulary size and only its
*change* is informative; on a trained model it is the usual quality measure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from core.errors import UserError
from offload.engine.generate import Scored, context_length, teacher_forced
from offload.engine.prompts import Prompt
from offload.engine.run import encode


@dataclass(frozen=True)
class Continuation:
    """A held-out context and the reference tokens that follow it."""

    context: torch.Tensor  # (1, T)
    target: torch.Tensor  # (C,)


def continuations(tokenizer: Any, prompts: list[Prompt], max_tokens: int, model: Any = None) -> list[Continuation]:
    """One continuation per prompt, at most ``max_tokens`` tokens long (and within the model's context)."""
    if max_tokens < 1:
        raise UserError(f"--quality-tokens must be at least 1 (0 turns quality off), got {max_tokens}")
    limit = context_length(model) if model is not None else None
    out = []
    for prompt in prompts:
        ids = encode(tokenizer, prompt)
        if prompt.continuation:
            target = tokenizer(prompt.continuation, add_special_tokens=False, return_tensors="pt").input_ids[0]
            context = ids
        else:  # a plain text: its second half continues its first
            cut = max(1, ids.shape[1] // 2)
            context, target = ids[:, :cut], ids[0, cut:]
        if limit is not None:
            target = target[: max(0, limit - context.shape[1])]
        target = target[:max_tokens]
        if len(target):
            out.append(Continuation(context, target))
    if not out:
        raise UserError("no prompt leaves a continuation to measure quality on (texts too short for the context)")
    return out


def score_plain(model: Any, conts: list[Continuation]) -> list[Scored]:
    """The plain model on every continuation: the reference."""
    return [teacher_forced(model, c.context, c.target) for c in conts]


def score_engine(engine: Any, conts: list[Continuation]) -> list[Scored]:
    """An offloaded engine on every continuation (its cache carries on from whatever it ran before)."""
    return [engine.teacher_forced(c.context, c.target) for c in conts]


def summarize_quality(scored: list[Scored], reference: list[Scored] | None = None) -> dict[str, float]:
    """Perplexity over every scored token and, against ``reference`` (the plain model), next-token agreement."""
    nll = [x for s in scored for x in s.nll]
    out = {"tokens": float(len(nll)), "nll": sum(nll) / len(nll), "perplexity": math.exp(sum(nll) / len(nll))}
    if reference is not None:
        pairs = [(a, b) for s, r in zip(scored, reference, strict=True)
                 for a, b in zip(s.argmax, r.argmax, strict=True)]
        out["agreement"] = sum(a == b for a, b in pairs) / len(pairs)
    return out
