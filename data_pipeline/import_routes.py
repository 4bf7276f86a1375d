"""Import foreign routing logs (no hidden states) into a trace store.

Two formats:

- ``route_trace v1`` (a llama.cpp-based engine): ``#`` comment lines with ``model=... n_layer=...
  n_expert=... n_expert_used=...`` and per-layer ``expert_bytes``, then CSV columns
  ``turn,phase,step,layer,slot,expert,weight,...`` (``slot`` = rank inside the token's top-k,
  ``phase`` 0 = prefill, 1 = decode).
- generic CSV or JSONL with columns ``seq, step, phase (prefill|decode or 0|1), layer, expert[, weight]
  [, token]``; rows of one (seq, step, layer) are taken in file order as rank order. ``token`` is
  the token of that step: an integer id, or a token string (then the store gets a ``vocab.json``
  mapping ids to strings, and the manifest says so); it is stored as ``token_id`` (-1 without it).

Imports are strict: a value that is not what its column holds, a repeated (token, layer, expert),
an id outside the declared range or the store's integer types, a NaN/negative weight, a line cut
short (a CSV must end with a newline) or a JSONL line that is not an object is an error naming the
file and line. Nothing is clamped, dropped or guessed.

**llama.cpp output-layer pruning.** In prefill, llama.cpp runs the last layer only for the tokens
whose logits are wanted (the final prompt token), so a real ``route_trace`` has no last-layer rows
for the other prompt tokens. Those (token, layer) routes are stored as not run (ids -1, weight 0)
and the manifest's ``skipped_routes`` records it; nothing is invented. Any other missing route is
an error.

Usage: ``python -m data_pipeline.import_routes PATH --out traces/NAME [--num-experts E] [--expert-bytes 12MiB]``
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import shutil
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from data_pipeline.errors import UserError, run_cli
from data_pipeline.store_lock import StoreLock
from data_pipeline.trace_store import (
    MAX_EXPERTS,
    SKIPPED,
    ModelInfo,
    TraceStore,
    TraceStoreWriter,
    check_out_folder,
)

ROUTE_TRACE_COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "weight")
GENERIC_COLUMNS = ("seq", "step", "phase", "layer", "expert")
PRUNED_REASON = ("llama.cpp output-layer pruning: in prefill the last layer runs only for the final prompt "
                 "token, so the other prompt tokens did not run it")
INT32_MAX = int(np.iinfo(np.int32).max)
INT64_SAFE = 10**18
_INT = r"^\s*[+-]?\d{1,18}\s*$"
_FLOAT = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?\s*$"
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """``12582912``, ``12MiB``, ``4.3MB`` -> a positive whole number of bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*", str(text).lower())
    if not m:
        raise UserError(f"--expert-bytes {text!r} is not a size (a byte count, or e.g. 12MiB, 4.3MB)")
    value = float(m.group(1)) * _SIZE_UNITS[m.group(2) or ""]
    if value < 1 or value != int(value):
        raise UserError(f"--expert-bytes {text!r} is {value:g} bytes; it must be a positive whole number of bytes")
    return int(value)


# ---------------------------------------------------------------------------------- reading
@dataclass
class _Table:
    """A routing table as read: every column as strings, and the file line of every row."""

    path: Path
    cols: dict[str, pa.Array]
    lines: np.ndarray
    json_kinds: dict[str, set[str]] = field(default_factory=dict)  # JSONL only: the JSON types per column

    def __len__(self) -> int:
        return len(self.lines)

    def error(self, row: int, message: str) -> UserError:
        return UserError(f"{self.path} line {int(self.lines[row])}: {message}")

    def require(self, needed: tuple[str, ...]) -> None:
        missing = [c for c in needed if c not in self.cols]
        if missing:
            raise UserError(f"{self.path} lacks column(s) {', '.join(missing)} (has: {', '.join(sorted(self.cols))})")

    def ints(self, name: str, lo: int, hi: int, what: str = "") -> np.ndarray:
        """The column as int64, every value a whole number in [lo, hi] (else: which line, and why)."""
        arr = self.cols[name]
        ok = pc.match_substring_regex(arr, _INT).to_numpy(zero_copy_only=False)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            raise self.error(row, f"{name} {arr[row].as_py()!r} is not a whole number")
        values = pc.cast(pc.utf8_trim_whitespace(arr), pa.int64()).to_numpy(zero_copy_only=False)
        bad = (values < lo) | (values > hi)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise self.error(row, f"{name} {int(values[row])} is outside {lo}..{hi}{what}")
        return values

    def floats(self, name: str) -> np.ndarray:
        """The column as float32: finite and >= 0 (a routing weight)."""
        arr = self.cols[name]
        ok = pc.match_substring_regex(arr, _FLOAT).to_numpy(zero_copy_only=False)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            raise self.error(row, f"{name} {arr[row].as_py()!r} is not a finite number")
        values = pc.cast(pc.utf8_trim_whitespace(arr), pa.float64()).to_numpy(zero_copy_only=False)
        as32 = values.astype(np.float32)
        bad = (values < 0) | ~np.isfinite(as32)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise self.error(row, f"{name} {arr[row].as_py()!r} is negative or too large for a routing weight")
        return as32

    def phases(self) -> np.ndarray:
        arr = pc.utf8_lower(pc.utf8_trim_whitespace(self.cols["phase"]))
        codes = {"prefill": 0, "0": 0, "decode": 1, "1": 1}
        known = pc.is_in(arr, value_set=pa.array(list(codes))).to_numpy(zero_copy_only=False)
        if not known.all():
            row = int(np.flatnonzero(~known)[0])
            raise self.error(row, f"phase {self.cols['phase'][row].as_py()!r} is neither prefill nor decode (0 or 1)")
        return np.isin(arr.to_numpy(zero_copy_only=False), ["decode", "1"]).astype(np.int8)


def _open_text(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error):
            raise UserError(f"{path} is a cut or damaged gzip file") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path} line {line} is not UTF-8 text") from None


def _lines(path: Path, text: str, *, need_newline: bool) -> list[tuple[int, str]]:
    """(file line number, text) of every non-blank line; a CSV cut short (no final newline) is refused."""
    if need_newline and text and not text.endswith("\n"):
        last = text.count("\n") + 1
        raise UserError(f"{path} line {last} does not end with a newline: the file looks cut short "
                        f"(if it is whole, add a final newline)")
    return [(i, line) for i, line in enumerate(text.split("\n"), 1) if line.strip()]


def _read_csv(path: Path, text: str) -> _Table:
    numbered = [(i, line) for i, line in _lines(path, text, need_newline=True) if not line.startswith("#")]
    if len(numbered) < 2:
        raise UserError(f"{path} has no rows")
    lines = np.array([i for i, _ in numbered], dtype=np.int64)
    header = [c.strip() for c in numbered[0][1].rstrip("\r").split(",")]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated or not all(header):
        raise UserError(f"{path} line {lines[0]} is not a header of distinct column names "
                        f"({'repeats ' + repr(repeated[0]) if repeated else 'an empty name'}): is the header missing?")
    invalid: list[tuple[int, str]] = []

    def on_invalid(row) -> str:
        invalid.append((row.number, row.text))
        return "skip"

    body = "\n".join(line for _, line in numbered).encode()
    try:
        table = pacsv.read_csv(
            io.BytesIO(body),
            # one thread: bad rows come with their physical line numbers; our (stripped) names, all as text
            read_options=pacsv.ReadOptions(use_threads=False, column_names=header, skip_rows=1),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        raise UserError(f"{path} is not a readable CSV ({str(e).splitlines()[0]})") from None
    if invalid:
        number, row_text = invalid[0]
        where = f"line {lines[number - 1]}" if number and number <= len(lines) else "a line"
        raise UserError(f"{path} {where} has {len(row_text.split(','))} fields, not {len(header)}: "
                        f"it is cut short or malformed")
    cols = {name: table.column(name).combine_chunks() for name in table.column_names}
    for name, arr in cols.items():
        if len(arr) != len(lines) - 1 or pc.any(pc.match_substring(arr, "\n")).as_py():
            raise UserError(f"{path}: a quoted {name} value spans several lines; a routing table holds one row "
                            f"per line")
    return _Table(path, cols, lines[1:])


def _read_jsonl(path: Path, text: str) -> _Table:
    rows, lines = [], []
    for i, line in _lines(path, text, need_newline=False):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            raise UserError(f"{path} line {i} is not valid JSON (cut short?)") from None
        if not isinstance(row, dict):
            raise UserError(f"{path} line {i} holds a JSON {type(row).__name__}, not an object with the columns")
        rows.append(row)
        lines.append(i)
    if not rows:
        raise UserError(f"{path} has no rows")
    keys = sorted(set().union(*rows))
    cols, kinds = {}, {}
    for k in keys:
        values = [r.get(k) for r in rows]
        kinds[k] = {type(v).__name__ for v in values}
        cols[k] = pa.array(["" if v is None else str(v) for v in values], type=pa.string())
    return _Table(path, cols, np.array(lines, dtype=np.int64), kinds)


# ---------------------------------------------------------------------------------- rows -> tokens
def _first_per_token(token_index: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """(n,) the value of each token's first row (rows are in file order): what later rows must agree with."""
    tokens, first = np.unique(token_index, return_index=True)
    out = np.empty(n, dtype=np.asarray(values).dtype)
    out[tokens] = np.asarray(values)[first]
    return out


def _first_line(t: _Table, rows: np.ndarray) -> int:
    """The row (index) among ``rows`` that comes first in the file."""
    return int(rows[np.argmin(t.lines[rows])])


def _to_tokens(
    t: _Table,
    seq: np.ndarray,
    step: np.ndarray,
    phase: np.ndarray,
    layer: np.ndarray,
    rank: np.ndarray,
    expert: np.ndarray,
    weight: np.ndarray,
    num_layers: int,
    top_k: int,
    *,
    pruned_last_layer: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Scatter one-row-per-routed-expert into per-token (N, L, K) arrays, checking completeness.

    Returns the token arrays and, per row, its token index. ``pruned_last_layer``: a prefill token
    other than the last of its sequence may lack the last layer (see the module docstring).
    """
    uniq, token_index = np.unique(np.stack([seq, step], axis=1), axis=0, return_inverse=True)
    token_index = token_index.reshape(-1)
    n, L, K = len(uniq), num_layers, top_k
    # one phase per token
    tok_phase = _first_per_token(token_index, phase, n).astype(np.int8)
    clash = tok_phase[token_index] != phase
    if clash.any():
        row = _first_line(t, np.flatnonzero(clash))
        raise t.error(row, f"seq {seq[row]} step {step[row]} is marked both prefill and decode")
    # a (token, layer, expert) once, a (token, layer, rank) once
    for what, key in (("expert", expert), ("rank", rank)):
        flat = (token_index * L + layer) * (MAX_EXPERTS + 1) + key
        order = np.lexsort((t.lines, flat))
        repeat = np.flatnonzero(flat[order][1:] == flat[order][:-1])
        if len(repeat):  # name the repeat that comes first in the file
            at = repeat[np.argmin(t.lines[order[repeat + 1]])]
            again = order[at + 1]
            first = order[np.searchsorted(flat[order], flat[again])]
            label = f"expert {expert[again]}" if what == "expert" else f"rank {rank[again]}"
            raise t.error(again, f"seq {seq[again]} step {step[again]} layer {layer[again]} repeats {label} "
                                 f"(first at line {t.lines[first]}): every routed expert must appear once")
    ids = np.full((n, L, K), SKIPPED, dtype=np.int16)
    weights = np.zeros((n, L, K), dtype=np.float32)
    flat = (token_index * L + layer) * K + rank
    ids.reshape(-1)[flat] = expert
    weights.reshape(-1)[flat] = weight
    filled = (ids >= 0).sum(axis=2)  # (n, L) experts per (token, layer)
    allowed = np.zeros((n, L), dtype=bool)
    if pruned_last_layer:
        last_prefill = np.zeros(n, dtype=bool)
        pre = np.flatnonzero(tok_phase == 0)
        if len(pre):  # the final prompt token of each sequence: the one that ran the last layer
            seq_of = uniq[pre, 0]
            ends = np.flatnonzero(np.append(seq_of[1:] != seq_of[:-1], True))
            last_prefill[pre[ends]] = True
        allowed[:, L - 1] = (tok_phase == 0) & ~last_prefill
    bad = (filled != K) & ~(allowed & (filled == 0))
    if bad.any():
        tok, lay = (int(x) for x in np.argwhere(bad)[0])
        rows_of_token = np.flatnonzero(token_index == tok)
        got = int(filled[tok, lay])
        raise t.error(_first_line(t, rows_of_token),
                      f"seq {uniq[tok, 0]} step {uniq[tok, 1]} (starting here) has {got} expert(s) at layer {lay}, "
                      f"not {K}")
    return {
        "seq_id": uniq[:, 0],
        "position": uniq[:, 1],
        "token_id": np.full(n, -1, dtype=np.int32),
        "phase": tok_phase,
        "topk_ids": ids,
        "topk_weights": weights,
    }, token_index


def _token_column(t: _Table, token_index: np.ndarray, n: int, vocab: list[str]) -> np.ndarray:
    """Per-token ids from the optional ``token`` column: integer ids, or strings mapped through ``vocab``
    (extended in place with new strings, in order of first appearance). -1 where a token has none."""
    arr = t.cols["token"]
    values = arr.to_numpy(zero_copy_only=False).astype(object)
    present = values != ""
    per_row = np.full(len(values), -1, dtype=np.int64)
    if present.any():
        kinds = t.json_kinds.get("token", set()) - {"NoneType"}
        if kinds - {"int", "str"}:
            raise t.error(int(np.flatnonzero(present)[0]), f"token must be an integer id or a token string, "
                                                           f"not JSON {', '.join(sorted(kinds - {'int', 'str'}))}")
        if kinds == {"int", "str"}:
            raise UserError(f"{t.path}: the token column mixes integer ids and strings; use one kind")
        given = pc.filter(arr, pa.array(present))
        as_ids = kinds == {"int"} if kinds else bool(pc.all(pc.match_substring_regex(given, _INT)).as_py())
        if as_ids:
            ids = pc.cast(pc.utf8_trim_whitespace(given), pa.int64()).to_numpy(zero_copy_only=False)
            bad = (ids < 0) | (ids > INT32_MAX)
            if bad.any():
                row = int(np.flatnonzero(present)[np.flatnonzero(bad)[0]])
                raise t.error(row, f"token id {values[row]!r} is outside 0..{INT32_MAX}")
            per_row[present] = ids
        else:
            index = {w: i for i, w in enumerate(vocab)}
            for w in dict.fromkeys(values[present]):
                if w not in index:
                    index[w] = len(vocab)
                    vocab.append(w)
            per_row[present] = [index[w] for w in values[present]]
    out = _first_per_token(token_index, per_row, n)
    clash = out[token_index] != per_row
    if clash.any():
        row = _first_line(t, np.flatnonzero(clash))
        raise t.error(row, "this row's token differs from another row of the same seq and step")
    return out.astype(np.int32)


# ---------------------------------------------------------------------------------- formats
def parse_route_trace(path: Path, num_experts: int | None = None) -> tuple[ModelInfo, dict[str, np.ndarray]]:
    text = _open_text(path)
    header = " ".join(line for line in text.splitlines()[:4096] if line.startswith("#"))
    meta = dict(re.findall(r"(\w+)=(\S+)", header))
    missing = [k for k in ("n_layer", "n_expert", "n_expert_used") if k not in meta]
    if missing:
        raise UserError(f"{path}: route_trace header lacks {', '.join(missing)}")
    try:
        L, E, K = int(meta["n_layer"]), int(meta["n_expert"]), int(meta["n_expert_used"])
    except ValueError:
        raise UserError(f"{path}: route_trace header numbers n_layer/n_expert/n_expert_used are not integers") \
            from None
    if min(L, E, K) < 1 or K > E or E > MAX_EXPERTS:
        raise UserError(f"{path}: route_trace header says {L} layers x {E} experts, top-{K}: not a model this "
                        f"store can hold (1 <= top-k <= experts <= {MAX_EXPERTS})")
    if num_experts is not None and num_experts != E:
        raise UserError(f"--num-experts {num_experts} disagrees with the header of {path} (n_expert={E})")
    layer_bytes = {int(a): int(b) for a, b in re.findall(r"layer=(\d+) expert_bytes=(\d+)", text[:200_000])}
    t = _read_csv(path, text)
    t.require(ROUTE_TRACE_COLUMNS)
    model_id = Path(meta.get("model", "unknown")).name
    per_layer = [layer_bytes.get(i, 0) for i in range(L)] if layer_bytes else None
    common = Counter(per_layer).most_common(1)[0][0] if per_layer else None
    info = ModelInfo(
        model_id=model_id,
        family=meta.get("arch", "unknown"),
        num_layers=L,
        num_experts=E,
        top_k=K,
        expert_bytes=common or None,
        layer_expert_bytes=per_layer,
    )
    tokens, _ = _to_tokens(
        t, t.ints("turn", 0, INT64_SAFE), t.ints("step", 0, INT32_MAX), t.phases(),
        t.ints("layer", 0, L - 1, f" (the header says n_layer={L})"),
        t.ints("slot", 0, K - 1, f" (the header says n_expert_used={K})"),
        t.ints("expert", 0, E - 1, f" (the header says n_expert={E})"), t.floats("weight"), L, K,
        pruned_last_layer=True,
    )
    return info, tokens


def parse_generic(path: Path, model_id: str, num_experts: int | None,
                  vocab: list[str] | None = None) -> tuple[ModelInfo, dict[str, np.ndarray]]:
    """Parse a generic CSV/JSONL table; ``vocab`` (token strings by id) is extended with new token strings."""
    text = _open_text(path)
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz", ".json"))
    t = _read_jsonl(path, text) if is_jsonl else _read_csv(path, text)
    t.require(GENERIC_COLUMNS)
    seq = t.ints("seq", 0, INT64_SAFE)
    step = t.ints("step", 0, INT32_MAX)
    layer = t.ints("layer", 0, 4095)
    if num_experts is not None:
        expert = t.ints("expert", 0, num_experts - 1, f" (--num-experts {num_experts})")
    else:
        expert = t.ints("expert", 0, MAX_EXPERTS - 1,
                        " (expert ids are stored as int16; give --num-experts to declare the range)")
    weight = t.floats("weight") if "weight" in t.cols else np.zeros(len(t), np.float32)
    phase = t.phases()
    L = int(layer.max()) + 1
    absent = np.setdiff1d(np.arange(L), layer)
    if len(absent):
        raise UserError(f"{path}: layers are numbered 0..{L - 1} but layer {absent[0]} never appears")
    # rank = order of appearance inside (seq, step, layer), which a stable sort preserves
    order = np.lexsort((t.lines, layer, step, seq))
    group = np.stack([seq, step, layer], axis=1)[order]
    new_group = np.concatenate([[True], np.any(group[1:] != group[:-1], axis=1)])
    starts = np.flatnonzero(new_group)
    run = np.arange(len(order)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(order)]])))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = run
    E = int(num_experts) if num_experts else int(expert.max()) + 1
    K = int(rank.max()) + 1  # more rows than experts in a (token, layer) is a repeat, refused before K is used
    tokens, token_index = _to_tokens(t, seq, step, phase, layer, rank, expert, weight, L, K)
    info = ModelInfo(model_id=model_id, family="unknown", num_layers=L, num_experts=E, top_k=K)
    if "token" in t.cols:
        tokens["token_id"] = _token_column(t, token_index, len(tokens["seq_id"]), vocab if vocab is not None else [])
    return info, tokens


def detect_format(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", errors="replace") as f:
            first = f.readline()
    except (EOFError, OSError, zlib.error):
        raise UserError(f"{path} is unreadable (a cut or damaged gzip file?)") from None
    return "route_trace" if first.startswith("# route_trace") else "generic"


def import_routes(
    path: str | Path,
    out: str | Path,
    *,
    fmt: str = "auto",
    model_id: str | None = None,
    num_experts: int | None = None,
    expert_bytes: int | str | None = None,
) -> TraceStore:
    """Parse a routing log and write it as a trace store (one shard; rank order kept).

    Holds the store's writer lock from before parsing until the store is written; a file refused
    while parsing leaves no store behind (and an existing one untouched).
    """
    path, out = Path(path), Path(out)
    if fmt not in ("auto", "route_trace", "generic"):
        raise UserError(f"unknown format {fmt!r}; choose auto, route_trace or generic")
    if num_experts is not None and not 1 <= num_experts <= MAX_EXPERTS:
        raise UserError(f"--num-experts {num_experts} is outside 1..{MAX_EXPERTS} (expert ids are stored as int16)")
    size = parse_size(str(expert_bytes)) if expert_bytes is not None else None
    check_out_folder(out)
    new_store = not (out / "manifest.json").exists()
    with StoreLock(out) as lock:
        try:
            return _import_locked(path, out, lock, fmt, model_id, num_experts, size)
        except BaseException:
            if new_store and _holds_no_shards(out):
                shutil.rmtree(out, ignore_errors=True)  # the store this run began holds nothing: leave none
            raise


def _holds_no_shards(out: Path) -> bool:
    try:
        return not json.loads((out / "manifest.json").read_text())["shards"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _import_locked(path: Path, out: Path, lock: StoreLock, fmt: str, model_id: str | None,
                   num_experts: int | None, size: int | None) -> TraceStore:
    fmt = detect_format(path) if fmt == "auto" else fmt
    vocab: list[str] = []
    old = TraceStore(out) if (out / "manifest.json").exists() else None
    if old is not None and old.has_vocab:
        vocab = old.vocab()
    known_words = len(vocab)
    if fmt == "route_trace":
        info, tokens = parse_route_trace(path, num_experts)
        if model_id:
            info.model_id = model_id
    else:
        info, tokens = parse_generic(path, model_id or path.stem, num_experts, vocab)
    if size is not None:  # one size for every layer: the user's word over the file's
        info.expert_bytes, info.layer_expert_bytes = size, None
    skipped = bool((tokens["topk_ids"] < 0).any())
    with TraceStoreWriter(out, info, dataset={"source": str(path), "format": fmt},
                          collection={"imported_from": str(path)}, lock=lock,
                          skipped_reason=PRUNED_REASON if skipped else None) as writer:
        if writer.done_sequences:
            todo = ~np.isin(tokens["seq_id"], list(writer.done_sequences))
            tokens = {k: v[todo] for k, v in tokens.items()}
        if len(vocab) > known_words or (vocab and not writer.manifest.get("vocab")):
            writer.save_vocab(vocab)
        if len(tokens["seq_id"]):
            writer.write_shard(**tokens)
        return writer.finalize()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m data_pipeline.import_routes", description=__doc__.split("\n")[0])
    ap.add_argument("path", type=Path, help="route_trace v1 CSV, or generic CSV/JSONL (optionally .gz)")
    ap.add_argument("--out", type=Path, required=True, help="trace store folder to create")
    ap.add_argument("--format", default="auto", choices=["auto", "route_trace", "generic"])
    ap.add_argument("--model-id", default=None, help="model name to record (default: from the file)")
    ap.add_argument("--num-experts", type=int, default=None,
                    help="experts per layer (generic format: default = largest id + 1; route_trace: must match)")
    ap.add_argument("--expert-bytes", default=None,
                    help="bytes of one expert (12582912, 12MiB, 4.3MB): lets the simulator size caches and copies "
                    "in bytes; overrides a route_trace's per-layer sizes")
    args = ap.parse_args(argv)
    store = import_routes(args.path, args.out, fmt=args.format, model_id=args.model_id, num_experts=args.num_experts,
                          expert_bytes=args.expert_bytes)
    phases = store.phases
    skipped = store.manifest.get("skipped_routes")
    note = f"; {skipped['rows']} prefill route(s) of layer(s) {skipped['layers']} not run (llama.cpp pruning)" \
        if skipped else ""
    print(
        f"imported {store.num_tokens} tokens ({int((phases == 0).sum())} prefill, {int((phases == 1).sum())} decode) "
        f"in {store.num_sequences} sequence(s): {store.num_layers} layers x {store.num_experts} experts, "
        f"top-{store.top_k} -> {args.out}{note}"
    )


if __name__ == "__main__":
    run_cli(main)
