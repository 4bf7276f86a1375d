"""Model loading with one call: ``tiny-olmoe``, a local ``save_pretrained`` folder, or a hub id.

``load_model(name)`` returns a :class:`LoadedModel`: the HF model in eval mode, its tokenizer (pad
token set), the family adapter and the :class:`~core.model_info.ModelInfo` that trace
stores and checkpoints record.

- ``tiny-olmoe``: a seeded random OLMoE built from ``OlmoeConfig`` (6 layers x 32 experts, top-4,
  hidden 128), fp32 on CPU, with the real OLMo tokenizer read from the demo wheel. It is the model
  of the offline demo and the tests; see :func:`build_tiny_olmoe` for why its init is not HF's.
- ``olmoe-mini``: the small OLMoE trained on public text in this repository
  (``models/olmoe-mini``, see its README and :mod:`data_pipeline.pretrain`), loaded with
  ``from_pretrained`` like any local folder; fp32 on CPU;
- a local folder written by ``save_pretrained`` (tokenizer beside it, else the OLMo tokenizer);
- a hub id such as ``allenai/OLMoE-1B-7B-0924`` (bf16 on CUDA, fp32 on CPU unless ``dtype`` says
  otherwise). Offline and not cached -> one-line :class:`UserError`, no network wait.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from core.model_info import ModelInfo
from data_pipeline.adapters import MoEAdapter, as_torch_dtype, dtype_name, get_adapter
from data_pipeline.demo_text import olmo_tokenizer

TINY_OLMOE = "tiny-olmoe"
OLMOE_MINI = "olmoe-mini"
OLMOE_HUB_ID = "allenai/OLMoE-1B-7B-0924"
REPO_ROOT = Path(__file__).resolve().parents[1]
#: models committed to this repository (``save_pretrained`` folders), loadable by name offline
REPO_MODELS = {OLMOE_MINI: REPO_ROOT / "models" / OLMOE_MINI}

#: The fixed shape of ``tiny-olmoe`` (see :func:`build_tiny_olmoe`).
TINY_OLMOE_CONFIG: dict[str, Any] = dict(
    vocab_size=50304,  # covers the OLMo tokenizer's 50280 ids (same padding as real OLMoE)
    hidden_size=128,
    intermediate_size=64,  # OLMoE's intermediate_size is the per-expert size
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    num_experts=32,
    num_experts_per_tok=4,
    norm_topk_prob=False,  # as in OLMoE-1B-7B
    max_position_embeddings=512,
    initializer_range=0.1,
    pad_token_id=1,
    eos_token_id=50279,
    bos_token_id=None,
    tie_word_embeddings=False,
)


TINY_EMBEDDING_STD = 1.0  # see build_tiny_olmoe


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any  # PreTrainedTokenizerFast with a pad token
    adapter: MoEAdapter
    info: ModelInfo
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def build_tiny_olmoe(seed: int = 0, **overrides: Any):
    """A seeded random ``OlmoeForCausalLM`` of the demo shape (6 layers, 32 experts, top-4, hidden 128).

    The init is not HF's (std 0.02 everywhere): ``initializer_range=0.1`` for the weights and
    ``embedding_std=1.0`` for the token embeddings (both overridable). Measured on 24 demo texts,
    seed 0 (gating lookahead = layer l+d's router on layer l's MoE input, overlap with the true
    top-4; next-token repeat = share of a token's experts the next token reuses, same layer):

    ======================  =====================  ===========================  ==================
    init                    top-4 router mass      gating lookahead d=1/2/3     next-token repeat
    ======================  =====================  ===========================  ==================
    HF default (0.02)       0.17 (uniform: 0.125)  0.57 / 0.43 / 0.34           0.18 -> 0.70
    0.1                     0.46                   0.53 / 0.40 / 0.31           0.29 -> 0.81
    0.1, embeddings 1.0     0.46                   0.67 / 0.55 / 0.47           0.15 -> 0.45
    ======================  =====================  ===========================  ==================

    Why: with 0.02 the router is nearly uniform, so which experts win is decided by noise-level
    logit differences and routing weights carry no signal. Raising all weights to 0.1 makes the
    router decisive (like a trained one) but the tiny embeddings are soon swamped by what the
    layers add, consecutive tokens' hidden states converge with depth, and deep layers route
    almost the same experts for every token (81% reuse: caches would look unrealistically good).
    Unit-variance embeddings keep token identity in the residual stream while each layer still
    moves it: lookahead gets harder with distance (routing at l+2/l+3 is far from a copy of layer
    l) and temporal reuse sits near the real gemma-4 log's 0.2-0.5. Activations stay finite.

    The same seed always gives identical weights (the global RNG is forked, not disturbed).
    """
    from transformers import OlmoeConfig, OlmoeForCausalLM  # transformers: ~3 s; only to build a model

    cfg = dict(TINY_OLMOE_CONFIG)
    experts_implementation = overrides.pop("experts_implementation", "eager")
    embedding_std = float(overrides.pop("embedding_std", TINY_EMBEDDING_STD))
    cfg.update(overrides)
    config = OlmoeConfig(**cfg)
    config._experts_implementation = experts_implementation
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = OlmoeForCausalLM(config)
        with torch.no_grad():
            model.model.embed_tokens.weight.normal_(0.0, embedding_std)
    return model.eval()


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} requested but no CUDA GPU is available (torch {torch.__version__})")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {device!r} is not supported; use cpu or cuda")
    return dev


def _resolve_dtype(dtype: str, dev: torch.device, *, tiny: bool) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if (dev.type == "cuda" and not tiny) else torch.float32
    return as_torch_dtype(dtype)


def _is_local(name: str) -> bool:
    return os.path.isdir(name) or name.startswith((".", "/", "~")) or os.sep + os.sep in name


def _load_tokenizer(source: str | Path, *, fallback: bool):
    from transformers import AutoTokenizer  # transformers: ~3 s to import; only where a tokenizer is loaded

    src = Path(source)
    has_local_tok = src.is_dir() and any(
        (src / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    )
    if src.is_dir() and not has_local_tok and fallback:
        tok = olmo_tokenizer()
    else:
        try:
            tok = AutoTokenizer.from_pretrained(str(source))
        except (OSError, ValueError) as e:
            if fallback:
                tok = olmo_tokenizer()
            else:
                raise UserError(f"cannot load the tokenizer of {source}: {_first_line(e)}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_model(
    name: str = TINY_OLMOE,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    seed: int = 0,
    experts_implementation: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load ``tiny-olmoe``, a local ``save_pretrained`` folder, or a hub id (see the module doc).

    ``dtype``: ``auto`` (bf16 on CUDA for real models, fp32 otherwise), ``float32``, ``bfloat16``,
    ``float16``. ``experts_implementation``: HF's experts kernel; default ``eager`` on CPU (exact,
    and what the tests compare against) and HF's default on CUDA.
    """
    name = requested = str(name)
    dev = _resolve_device(device)
    tiny = name == TINY_OLMOE
    dt = _resolve_dtype(dtype, dev, tiny=tiny)
    experts_impl = experts_implementation or ("eager" if dev.type == "cpu" else None)

    if tiny:
        tokenizer = olmo_tokenizer()  # first: a missing wheel fails before any model work
        model = build_tiny_olmoe(seed, experts_implementation=experts_impl or "eager")
        model_id = TINY_OLMOE if seed == 0 else f"{TINY_OLMOE}-seed{seed}"
        revision = revision or f"seed={seed}"
    else:
        from transformers import AutoModelForCausalLM  # transformers: ~3 s; only to load a model

        if name in REPO_MODELS:  # a committed model: its folder, named by its short name
            if not REPO_MODELS[name].is_dir():
                raise UserError(f"model {name!r} is missing: {REPO_MODELS[name]} does not exist")
            model_id, name = name, str(REPO_MODELS[name])
        else:
            model_id = None
        local = _is_local(name)
        if local and not os.path.isdir(os.path.expanduser(name)):
            raise UserError(f"model folder {name} does not exist")
        kwargs: dict[str, Any] = {"dtype": dt}
        if experts_impl:
            kwargs["experts_implementation"] = experts_impl
        if revision:
            kwargs["revision"] = revision
        try:
            model = AutoModelForCausalLM.from_pretrained(os.path.expanduser(name), **kwargs)
        except OSError as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
            hint = " (HF_HUB_OFFLINE is set and it is not in the local cache)" if offline and not local else ""
            raise UserError(f"cannot load model {name!r}{hint}: {_first_line(e)}") from None
        except ValueError as e:  # unrecognised config / architecture, bad repo id
            raise UserError(f"cannot load model {name!r}: {_first_line(e)}") from None
        tokenizer = _load_tokenizer(os.path.expanduser(name), fallback=local)
        model_id = model_id or (Path(name).name if local else name)
        revision = revision or getattr(model.config, "_commit_hash", None)

    adapter = get_adapter(model)  # unsupported family -> UserError before moving weights
    model = model.to(device=dev, dtype=dt).eval()
    model.requires_grad_(False)
    info = adapter.model_info(model_id, dtype=dt, revision=revision)
    info.dtype = dtype_name(dt)
    return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, info=info, name=requested)
