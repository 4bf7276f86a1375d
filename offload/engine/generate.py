"""Greedy generation with the KV cache, timed pass by pass.

The same loop runs the plain HF model (the reference) and the offloaded one, so the two are
compared token for token and logit for logit. One prompt at a time (batch 1): TTFT and TPOT are
per-request numbers, as in the paper; the engine counts cache events per pass.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from core.errors import UserError

PREFILL, DECODE = 0, 1


@dataclass
class Generation:
    prompt_tokens: int
    tokens: list[int]  # generated ids
    pass_s: list[float]  # wall time of every pass: prefill first, then each decode step
    logits: list[torch.Tensor] = field(default_factory=list)  # (V,) fp32 per generated token, if kept

    @property
    def ttft_s(self) -> float:
        return self.pass_s[0]

    @property
    def tpot_s(self) -> float:
        decode = self.pass_s[1:]
        return sum(decode) / len(decode) if decode else 0.0

    @property
    def tokens_per_s(self) -> float:
        total = sum(self.pass_s)
        return len(self.tokens) / total if total > 0 else 0.0


@dataclass
class Scored:
    """A teacher-forced pass over a continuation: per target token, the negative log-likelihood the model
    gave it and the token the model would have chosen there (its argmax)."""

    nll: list[float]
    argmax: list[int]


def context_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def check_fits(model: nn.Module, prompt_tokens: int, max_new_tokens: int) -> None:
    """A prompt plus its generation must fit the model's context: refuse in one line otherwise."""
    limit = context_length(model)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise UserError(
            f"a prompt of {prompt_tokens} tokens plus {max_new_tokens} new tokens exceeds the model's "
            f"context of {limit} tokens; shorten the prompt or lower --max-new-tokens"
        )


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5 renamed ``past_key_values`` to ``cache``; accept either."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def greedy_generate(
    model: nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    keep_logits: bool = False,
    before_pass: Callable[[int], None] | None = None,
) -> Generation:
    """Prefill ``input_ids`` (1, T), then greedy-decode up to ``max_new_tokens`` tokens.

    ``before_pass(phase)`` runs before every forward (the engine starts a new pass there). Decoding
    stops early at ``eos_token_id`` when given.
    """
    # transformers: already loaded with the model; this module imports without it
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"greedy_generate takes one prompt of shape (1, T), got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    check_fits(model, input_ids.shape[1], max_new_tokens)
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_keyword(model)
    gen = Generation(prompt_tokens=int(input_ids.shape[1]), tokens=[], pass_s=[])
    step_input = input_ids.to(device)
    for step in range(max_new_tokens):
        phase = PREFILL if step == 0 else DECODE
        _sync(device)
        t0 = time.perf_counter()
        if before_pass is not None:
            before_pass(phase)
        out = model(input_ids=step_input, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        last = out.logits[0, -1]
        token = int(last.argmax())
        gen.pass_s.append(time.perf_counter() - t0)  # .argmax().item() synchronised the device
        gen.tokens.append(token)
        if keep_logits:
            gen.logits.append(last.float().cpu())
        if eos_token_id is not None and token == eos_token_id:
            break
        step_input = torch.tensor([[token]], device=device)
    return gen


@torch.no_grad()
def teacher_forced(
    model: nn.Module,
    context: torch.Tensor,
    target: torch.Tensor,
    *,
    before_pass: Callable[[int], None] | None = None,
) -> Scored:
    """Score ``target`` (C,) as the continuation of ``context`` (1, T): prefill the context, then feed the
    true tokens one decode pass at a time (the same passes as :func:`greedy_generate`, so an offloaded
    model's cache sees decode-time accesses), reading each pass's next-token distribution."""
    # transformers: already loaded with the model; this module imports without it
    from transformers import DynamicCache

    if context.dim() != 2 or context.shape[0] != 1 or target.dim() != 1 or not len(target):
        raise ValueError(f"teacher_forced takes a (1, T) context and a non-empty (C,) target, got "
                         f"{tuple(context.shape)} and {tuple(target.shape)}")
    check_fits(model, context.shape[1], len(target))
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_keyword(model)
    scored = Scored([], [])
    step_input = context.to(device)
    for i, token in enumerate(target.tolist()):
        if before_pass is not None:
            before_pass(PREFILL if i == 0 else DECODE)
        out = model(input_ids=step_input, use_cache=True, logits_to_keep=1, **{cache_kw: cache})
        logits = out.logits[0, -1].double()
        scored.nll.append(float(torch.logsumexp(logits, 0) - logits[token]))
        scored.argmax.append(int(logits.argmax()))
        step_input = torch.tensor([[token]], device=device)
    return scored
