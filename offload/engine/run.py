"""Run prompts through the plain model or the engine and measure each one."""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from offload.counters import Counters
from offload.engine.generate import Generation, greedy_generate
from offload.engine.metrics import PromptMetrics
from offload.engine.prompts import Prompt, exact_match


def encode(tokenizer: Any, prompt: Prompt) -> torch.Tensor:
    return tokenizer(prompt.text, return_tensors="pt").input_ids


def agreement(tokens: list[int], reference: list[int]) -> float:
    """Fraction of the reference's generated tokens reproduced position by position.

    A shorter run (stopped at EOS) counts its missing positions as disagreements.
    """
    if not reference:
        return 1.0
    same = sum(a == b for a, b in zip(tokens, reference, strict=False))
    return same / max(len(reference), len(tokens))


def run_prompts(
    loaded: Any,
    prompts: list[Prompt],
    max_new_tokens: int,
    *,
    engine: Any = None,
    reference: list[list[int]] | None = None,
    stop_at_eos: bool = True,
    progress: str | None = None,
) -> tuple[list[PromptMetrics], list[Generation]]:
    """Greedy-generate every prompt (batch 1, one after another) with ``engine`` (None: plain model).

    ``reference``: the plain model's generated ids per prompt, to score token agreement.
    """
    eos = loaded.tokenizer.eos_token_id if stop_at_eos else None
    metrics: list[PromptMetrics] = []
    generations: list[Generation] = []
    for i, prompt in enumerate(tqdm(prompts, desc=progress, disable=progress is None, leave=False)):
        ids = encode(loaded.tokenizer, prompt)
        before = engine.counters.snapshot() if engine is not None else Counters()
        if engine is None:
            gen = greedy_generate(loaded.model, ids, max_new_tokens, eos_token_id=eos)
        else:
            gen = engine.generate(ids, max_new_tokens, eos_token_id=eos)
        counters = engine.counters.minus(before) if engine is not None else Counters()
        text = loaded.tokenizer.decode(gen.tokens, skip_special_tokens=True)
        metrics.append(PromptMetrics(
            index=i, prompt_tokens=gen.prompt_tokens, new_tokens=len(gen.tokens), ttft_s=gen.ttft_s,
            tpot_s=gen.tpot_s, tokens_per_s=gen.tokens_per_s, counters=counters, generated=gen.tokens,
            agreement=agreement(gen.tokens, reference[i]) if reference is not None else None,
            exact_match=exact_match(text, prompt.answer),
        ))
        generations.append(gen)
    return metrics, generations
