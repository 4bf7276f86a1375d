"""Import foreign routing logs (no hidden states) into a trace store, streaming: memory does not grow with the file.

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

**Streaming, in two passes.** Rows of one sequence may be anywhere in the file (a serving log
interleaves requests), and a shard must hold whole sequences, so the file cannot be cut into
shards as it is read. Pass 1 reads it in blocks of whole lines (``BLOCK_BYTES``), checks every
value with its line number exactly as before, and spills each block's rows, as numbers sorted by
sequence, to a run file in a temporary folder inside the store (``shards/import-*.spill``); it
keeps only per-sequence row counts, the layers and experts seen, and the token vocabulary. Pass 2
cuts the sequences into groups of about ``GROUP_ROWS`` rows and, group by group, merges the runs'
rows of those sequences (each run is sorted, so this reads each run once, front to back), checks
the group (one phase per token, repeats, a complete top-k at every layer, tokens) and stages it
as a shard. Only when every group has passed are the staged shards adopted into the store, so a
bad line anywhere leaves an existing store as it was and a new one not created; an import killed
at any moment leaves the store as it was, or with whole adopted shards that a rerun keeps (it
imports the sequences still missing). Peak memory is a block, a group and one record batch per
run, whatever the file's size (``benchmarks/import_routes.py`` measures it).

With several faults in one file, the one named is the first in block order, then group order
(an in-memory reader named the first by check kind); every message still names a real fault and
its line.

Usage: ``python -m data_pipeline.import_routes PATH --out traces/NAME [--num-experts E] [--expert-bytes 12MiB]``
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import re
import shutil
import sys
import tempfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from core.errors import UserError, run_cli
from core.model_info import ModelInfo
from data_pipeline.store_lock import StoreLock
from data_pipeline.trace_store import (
    MAX_EXPERTS,
    SKIPPED,
    StagedShard,
    TraceStore,
    TraceStoreWriter,
    check_out_folder,
    new_spill_dir,
)

ROUTE_TRACE_COLUMNS = ("turn", "phase", "step", "layer", "slot", "expert", "weight")
GENERIC_COLUMNS = ("seq", "step", "phase", "layer", "expert")
PRUNED_REASON = ("llama.cpp output-layer pruning: in prefill the last layer runs only for the final prompt "
                 "token, so the other prompt tokens did not run it")
INT32_MAX = int(np.iinfo(np.int32).max)
INT64_SAFE = 10**18
MAX_LAYERS = 4096
BLOCK_BYTES = 2 << 20  # pass 1 reads the file this much at a time (whole lines)
GROUP_ROWS = 1 << 17  # pass 2 checks about this many rows at a time (whole sequences)
SHARD_ROWS = 1 << 22  # ... and writes a shard when its groups hold this many routes
RUN_BATCH_ROWS = 4096  # rows per record batch of a spilled run: what pass 2 holds per open run
MAX_OPEN_RUNS = 64  # more runs that overlap in sequence ids than this are merged first (bounded memory, files)
_INT = r"^\s*[+-]?\d{1,18}\s*$"
_FLOAT = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d{1,3})?\s*$"
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_WHITESPACE = np.zeros(256, dtype=bool)  # the ASCII bytes str.strip() removes
_WHITESPACE[[9, 10, 11, 12, 13, 28, 29, 30, 31, 32]] = True


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
_PHASES, _REPEATS, _RANKS, _INCOMPLETE, _TOKENS = range(5)  # checks of whole tokens, in the order they run


class _GroupError(UserError):
    """A check of whole tokens failed (they run per group of sequences, in pass 2).

    Reading the file whole, each check ran over all tokens before the next, and named the fault
    first in the file (an incomplete top-k: the first in sequence order). :func:`_groups` names
    the same one, by ``kind`` and then ``line`` (or group), when a file has several.
    """

    def __init__(self, message: str, kind: int, line: int):
        super().__init__(message)
        self.kind, self.line = kind, line


@dataclass
class _Table:
    """A routing table as read: every column as strings, and the file line of every row."""

    path: Path
    cols: dict[str, pa.Array]
    lines: np.ndarray
    json_kinds: dict[str, set[str]] = field(default_factory=dict)  # JSONL only: the JSON types per column

    def __len__(self) -> int:
        return len(self.lines)

    def error(self, row: int, message: str, kind: int | None = None) -> UserError:
        """The one-line error for ``row``; ``kind`` marks a check of whole tokens (see :class:`_GroupError`)."""
        text = f"{self.path} line {int(self.lines[row])}: {message}"
        return UserError(text) if kind is None else _GroupError(text, kind, int(self.lines[row]))

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


def _open_binary(path: Path) -> BinaryIO:
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if not path.is_file():
        raise UserError(f"{path} is not a file")
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # type: ignore[return-value]


def _read(f: BinaryIO, n: int, path: Path) -> bytes:
    try:
        return f.read(n)
    except (EOFError, OSError, zlib.error):
        raise UserError(f"{path} is a cut or damaged gzip file") from None


@dataclass
class _Block:
    """Whole lines of the file: the non-blank ones (and, for CSV, not ``#`` comments) and their line numbers."""

    body: bytes  # the kept lines, each ending with a newline (the file's last line may lack it)
    lines: np.ndarray  # file line number of each kept line
    end_line: int  # the file line number of the block's last line


def _blocks(path: Path, *, comments: bool, need_newline: bool, block_bytes: int | None = None,
            progress: Any = None) -> Iterator[_Block]:
    """The file in blocks of whole lines, UTF-8 checked; a CSV whose last line is cut short is refused."""
    block_bytes = block_bytes or BLOCK_BYTES
    first_line = 1
    with _open_binary(path) as f:
        rest = b""
        while True:
            data = _read(f, block_bytes, path)
            if progress is not None:
                progress.update(len(data))
            at_end = not data
            chunk = rest + data
            cut = len(chunk) if at_end else chunk.rfind(b"\n") + 1
            if cut == 0 and not at_end:  # one line longer than a block: read on
                rest = chunk
                continue
            block, rest = chunk[:cut], chunk[cut:]
            if block:
                try:
                    block.decode("utf-8")
                except UnicodeDecodeError as e:
                    line = first_line + block[: e.start].count(b"\n")
                    raise UserError(f"{path} line {line} is not UTF-8 text") from None
                if at_end and need_newline and not block.endswith(b"\n"):
                    last = first_line + block.count(b"\n")
                    raise UserError(f"{path} line {last} does not end with a newline: the file looks cut short "
                                    f"(if it is whole, add a final newline)")
                kept = _kept_lines(block, first_line, comments=comments)
                first_line += block.count(b"\n")
                yield kept
            if at_end:
                return


def _kept_lines(block: bytes, first_line: int, *, comments: bool) -> _Block:
    """Drop blank lines (what ``str.strip()`` empties) and, for CSV, ``#`` lines; vectorised over the block."""
    buf = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(buf == 10)
    if buf[-1] != 10:
        ends = np.append(ends, len(buf))  # the file's unterminated last line
    starts = np.concatenate([[0], ends[:-1] + 1])
    high = buf >= 0x80
    # per line (its bytes up to and including its newline, which is whitespace): any ASCII text? any non-ASCII?
    keep = np.logical_or.reduceat(~_WHITESPACE[buf] & ~high, starts)
    for i in np.flatnonzero(~keep & np.logical_or.reduceat(high, starts)):  # non-ASCII text, or only spaces?
        keep[i] = bool(block[starts[i]:ends[i]].decode("utf-8").strip())
    if comments:
        keep &= ~((buf[np.minimum(starts, len(buf) - 1)] == ord("#")) & (ends > starts))
    numbers = first_line + np.flatnonzero(keep)
    if keep.all():
        body = block
    else:
        lengths = np.minimum(ends + 1, len(buf)) - starts
        body = buf[np.repeat(keep, lengths)].tobytes()
    return _Block(body, numbers.astype(np.int64), first_line + len(ends) - 1)


def _split_header(path: Path, block: _Block) -> tuple[list[str], _Block]:
    """The CSV header (the first kept line) and the block without it."""
    cut = block.body.find(b"\n") + 1 or len(block.body)
    header = [c.strip() for c in block.body[:cut].decode("utf-8").rstrip("\n").rstrip("\r").split(",")]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated or not all(header):
        raise UserError(f"{path} line {block.lines[0]} is not a header of distinct column names "
                        f"({'repeats ' + repr(repeated[0]) if repeated else 'an empty name'}): is the header missing?")
    return header, _Block(block.body[cut:], block.lines[1:], block.end_line)


def _csv_tables(path: Path, *, block_bytes: int | None = None, progress: Any = None) -> Iterator[_Table]:
    """The CSV's rows, block by block, every column as text with the file line of each row."""
    header: list[str] | None = None
    rows = 0
    for block in _blocks(path, comments=True, need_newline=True, block_bytes=block_bytes, progress=progress):
        if header is None:
            if not len(block.lines):
                continue
            header, block = _split_header(path, block)
        if not len(block.lines):
            continue
        rows += len(block.lines)
        yield _parse_csv_block(path, block, header)
    if not rows:
        raise UserError(f"{path} has no rows")


def _parse_csv_block(path: Path, block: _Block, header: list[str]) -> _Table:
    invalid: list[tuple[int, str]] = []

    def on_invalid(row) -> str:
        invalid.append((row.number, row.text))
        return "skip"

    try:
        table = pacsv.read_csv(
            io.BytesIO(block.body),
            # one thread: bad rows come with their line numbers; our (stripped) names, all as text
            read_options=pacsv.ReadOptions(use_threads=False, column_names=header, block_size=4 << 20),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                                 strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as e:
        raise UserError(f"{path} is not a readable CSV ({str(e).splitlines()[0]})") from None
    lines = block.lines
    if invalid:
        number, row_text = invalid[0]
        where = f"line {lines[number - 1]}" if 0 < number <= len(lines) else "a line"
        raise UserError(f"{path} {where} has {len(row_text.split(','))} fields, not {len(header)}: "
                        f"it is cut short or malformed")
    cols = {name: table.column(name).combine_chunks() for name in table.column_names}
    for name, arr in cols.items():
        if len(arr) != len(lines) or pc.any(pc.match_substring(arr, "\n")).as_py():
            raise UserError(f"{path}: a quoted {name} value spans several lines; a routing table holds one row "
                            f"per line")
    return _Table(path, cols, lines)


def _jsonl_tables(path: Path, *, block_bytes: int | None = None, progress: Any = None) -> Iterator[_Table]:
    """The JSONL's rows, block by block, every key as a text column (missing or null: empty text).

    A key first seen after the first block was missing from every row before it: that is the first
    row's fault, named as the in-memory reader named it (an empty value of that column)."""
    seen: list[str] = []
    first_line = None
    for block in _blocks(path, comments=False, need_newline=False, block_bytes=block_bytes, progress=progress):
        rows = []
        texts = block.body.decode("utf-8").split("\n")  # split as the line numbers were counted: at \n only
        for i, line in zip(block.lines, texts, strict=False):
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, RecursionError):
                raise UserError(f"{path} line {i} is not valid JSON (cut short?)") from None
            if not isinstance(row, dict):
                raise UserError(f"{path} line {i} holds a JSON {type(row).__name__}, not an object with the columns")
            rows.append(row)
        if not rows:
            continue
        keys = set().union(*rows)
        if first_line is None:
            first_line = int(block.lines[0])
        elif keys - set(seen):
            late = sorted(keys - set(seen))
            blank = _Table(path, {k: pa.array([""]) for k in late}, np.array([first_line]))
            for k in late:  # the value check of that column on an empty value: the same one-line error
                _check_column(blank, k)
        seen = sorted(set(seen) | keys)
        cols, kinds = {}, {}
        for k in seen:
            values = [r.get(k) for r in rows]
            kinds[k] = {type(v).__name__ for v in values}
            cols[k] = pa.array(["" if v is None else str(v) for v in values], type=pa.string())
        yield _Table(path, cols, block.lines[: len(rows)], kinds)
    if first_line is None:
        raise UserError(f"{path} has no rows")


def _check_column(t: _Table, name: str) -> None:
    """Run the value check of a generic column (used on a one-row table to name a fault)."""
    if name == "phase":
        t.phases()
    elif name == "weight":
        t.floats(name)
    elif name in GENERIC_COLUMNS:
        t.ints(name, 0, 0)


# ---------------------------------------------------------------------------------- pass 1: check and spill
@dataclass
class _Tokens:
    """What pass 1 learns about the optional ``token`` column, decided once the whole file is read."""

    vocab: list[str]  # token strings by id: the store's, then new ones in order of first appearance
    known: int  # how many of ``vocab`` the store had before
    index: dict[str, int] = field(default_factory=dict)
    all_ints: bool = True  # every present value is a whole number (CSV: then they are ids)
    kinds: set[str] = field(default_factory=set)  # JSONL: the JSON types of present values
    first_present: tuple[Path, int] | None = None  # the first row holding a token (where a kind error is named)
    bad_id: tuple[Path, int, str] | None = None  # the first whole number outside 0..INT32_MAX

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.vocab)}

    def read(self, t: _Table) -> tuple[np.ndarray, np.ndarray]:
        """Per row: the value as an id (-1: absent or not a whole number), and as a vocabulary index (-1: absent)."""
        arr = t.cols["token"]
        present = pc.not_equal(arr, "").to_numpy(zero_copy_only=False)
        ids = np.full(len(arr), -1, dtype=np.int64)
        words = np.full(len(arr), -1, dtype=np.int64)
        if not present.any():
            return ids, words
        rows = np.flatnonzero(present)
        if self.first_present is None:
            self.first_present = (t.path, int(t.lines[rows[0]]))
        self.kinds |= t.json_kinds.get("token", set()) - {"NoneType"}
        is_int = pc.match_substring_regex(arr, _INT).to_numpy(zero_copy_only=False) & present
        self.all_ints &= bool(is_int[present].all())
        if is_int.any():
            values = pc.cast(pc.utf8_trim_whitespace(pc.filter(arr, pa.array(is_int))), pa.int64())
            ids[is_int] = values.to_numpy(zero_copy_only=False)
            bad = is_int & ((ids < 0) | (ids > INT32_MAX))
            if bad.any() and self.bad_id is None:
                row = int(np.flatnonzero(bad)[0])
                self.bad_id = (t.path, int(t.lines[row]), arr[row].as_py())
        encoded = pc.dictionary_encode(pc.filter(arr, pa.array(present)))  # dictionary in first-appearance order
        mapping = np.empty(len(encoded.dictionary), dtype=np.int64)
        for j, w in enumerate(encoded.dictionary.to_pylist()):
            if w not in self.index:
                self.index[w] = len(self.vocab)
                self.vocab.append(w)
            mapping[j] = self.index[w]
        words[present] = mapping[encoded.indices.to_numpy(zero_copy_only=False)]
        ids[present & ~is_int] = -1
        return ids, words

    def as_ids(self) -> bool:
        """Whether the column holds ids (else token strings); refuses mixed or other JSON kinds."""
        if self.first_present is None:
            return True
        if self.kinds - {"int", "str"}:
            path, line = self.first_present
            raise UserError(f"{path} line {line}: token must be an integer id or a token string, "
                            f"not JSON {', '.join(sorted(self.kinds - {'int', 'str'}))}")
        if self.kinds == {"int", "str"}:
            raise UserError(f"{self.first_present[0]}: the token column mixes integer ids and strings; use one kind")
        ids = self.kinds == {"int"} if self.kinds else self.all_ints
        if ids:
            del self.vocab[self.known:]
            if self.bad_id is not None:
                path, line, value = self.bad_id
                raise UserError(f"{path} line {line}: token id {value!r} is outside 0..{INT32_MAX}")
        return ids


@dataclass
class _Spill:
    """Pass 1's result: the rows as numbers in runs sorted by sequence, and what the whole file holds."""

    path: Path
    fmt: str
    folder: Path
    runs: list[_RunFile] = field(default_factory=list)
    _seqs: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    _counted: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # per block, not merged yet
    layers_seen: np.ndarray = field(default_factory=lambda: np.zeros(MAX_LAYERS, dtype=bool))
    max_expert: int = -1
    tokens: _Tokens | None = None
    has_weight: bool | None = None
    token_column: bool = False  # some rows have a token column
    merges: int = 0  # runs written by merging others
    meta: dict[str, Any] = field(default_factory=dict)  # route_trace: model numbers from the header

    @property
    def num_rows(self) -> int:
        return int(self.rows_per_seq.sum())

    @property
    def seqs(self) -> np.ndarray:
        """Distinct sequence ids, sorted."""
        self._merge_counts()
        return self._seqs

    @property
    def rows_per_seq(self) -> np.ndarray:
        """Rows of each of :attr:`seqs`."""
        self._merge_counts()
        return self._rows

    def _merge_counts(self) -> None:
        if not self._counted:
            return
        seqs, inverse = np.unique(np.concatenate([self._seqs, *(s for s, _ in self._counted)]), return_inverse=True)
        rows = np.zeros(len(seqs), dtype=np.int64)
        np.add.at(rows, inverse, np.concatenate([self._rows, *(c for _, c in self._counted)]))
        self._seqs, self._rows, self._counted = seqs, rows, []

    def add(self, cols: dict[str, np.ndarray]) -> None:
        """Spill one block's rows (sorted by sequence, file order kept within one) and count them."""
        order = np.argsort(cols["seq"], kind="stable")
        table = pa.table({k: v[order] for k, v in cols.items()})
        self.runs.append(_write_run(self.folder / f"run-{len(self.runs):06d}.arrow", table))
        self._counted.append(np.unique(cols["seq"], return_counts=True))
        if sum(len(s) for s, _ in self._counted) > max(len(self._seqs), 1 << 16):  # merged when they pile up:
            self._merge_counts()  # linear in the blocks, however many sequences the file has


def _spill_generic(spill: _Spill, t: _Table, num_experts: int | None) -> None:
    t.require(GENERIC_COLUMNS)
    # spilled in the narrowest types their checked ranges allow: pass 2 reads every byte again
    cols = {"seq": t.ints("seq", 0, INT64_SAFE), "step": t.ints("step", 0, INT32_MAX).astype(np.int32),
            "layer": t.ints("layer", 0, MAX_LAYERS - 1).astype(np.int16)}
    if num_experts is not None:
        expert = t.ints("expert", 0, num_experts - 1, f" (--num-experts {num_experts})")
    else:
        expert = t.ints("expert", 0, MAX_EXPERTS - 1,
                        " (expert ids are stored as int16; give --num-experts to declare the range)")
    cols["expert"] = expert.astype(np.int16)
    if spill.has_weight is None:
        spill.has_weight = "weight" in t.cols
    cols["weight"] = t.floats("weight") if spill.has_weight else np.zeros(len(t), np.float32)
    cols["phase"] = t.phases()
    cols["line"] = t.lines
    if "token" in t.cols and spill.tokens is not None:  # a block without it (JSONL) has no tokens: -1 in pass 2
        spill.token_column = True
        cols["token_id"], cols["token_word"] = spill.tokens.read(t)
    spill.layers_seen[np.unique(cols["layer"])] = True
    spill.max_expert = max(spill.max_expert, int(cols["expert"].max()))
    spill.add(cols)


def _spill_route_trace(spill: _Spill, t: _Table) -> None:
    t.require(ROUTE_TRACE_COLUMNS)
    L, E, K = spill.meta["L"], spill.meta["E"], spill.meta["K"]
    spill.add({
        "seq": t.ints("turn", 0, INT64_SAFE), "step": t.ints("step", 0, INT32_MAX).astype(np.int32),
        "phase": t.phases(), "layer": t.ints("layer", 0, L - 1, f" (the header says n_layer={L})").astype(np.int16),
        "rank": t.ints("slot", 0, K - 1, f" (the header says n_expert_used={K})").astype(np.int16),
        "expert": t.ints("expert", 0, E - 1, f" (the header says n_expert={E})").astype(np.int16),
        "weight": t.floats("weight"),
        "line": t.lines,
    })


def _route_trace_header(path: Path, num_experts: int | None) -> dict[str, Any]:
    """Model numbers from the ``#`` lines at the top of a route_trace log (read before its rows)."""
    with _open_binary(path) as f:
        head = _read(f, 200_000, path).decode("utf-8", errors="replace")
    header = " ".join(line for line in head.splitlines()[:4096] if line.startswith("#"))
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
    layer_bytes = {int(a): int(b) for a, b in re.findall(r"layer=(\d+) expert_bytes=(\d+)", head)}
    return {"L": L, "E": E, "K": K, "model": meta.get("model", "unknown"), "arch": meta.get("arch", "unknown"),
            "layer_bytes": layer_bytes}


def _spill_file(path: Path, fmt: str, folder: Path, *, num_experts: int | None, vocab: list[str],
                block_bytes: int | None = None, progress: bool = False) -> _Spill:
    """Pass 1: every value checked (line numbers as the file has them), every row spilled as numbers."""
    spill = _Spill(path, fmt, folder)
    is_jsonl = path.name.endswith((".jsonl", ".jsonl.gz", ".json"))
    if fmt == "route_trace":
        spill.meta = _route_trace_header(path, num_experts)
    else:
        spill.tokens = _Tokens(vocab, len(vocab))
    size = path.stat().st_size if path.exists() and path.suffix != ".gz" else None
    with tqdm(total=size, unit="B", unit_scale=True, desc=f"read {path.name}", file=sys.stderr, delay=1,
              disable=not progress, dynamic_ncols=True) as bar:
        reader = _jsonl_tables if (fmt == "generic" and is_jsonl) else _csv_tables
        for t in reader(path, block_bytes=block_bytes, progress=bar):
            if fmt == "route_trace":
                _spill_route_trace(spill, t)
            else:
                _spill_generic(spill, t, num_experts)
    return spill


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


def _unique_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(np.stack([a, b], 1), axis=0, return_inverse=True)``, by a two-key sort (several times faster)."""
    order = np.lexsort((b, a))
    sa, sb = a[order], b[order]
    new = np.ones(len(a), dtype=bool)
    new[1:] = (sa[1:] != sa[:-1]) | (sb[1:] != sb[:-1])
    inverse = np.empty(len(a), dtype=np.int64)
    inverse[order] = np.cumsum(new) - 1
    return np.stack([sa[new], sb[new]], axis=1), inverse


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
    uniq, token_index = _unique_pairs(seq, step)
    n, L, K = len(uniq), num_layers, top_k
    # one phase per token
    tok_phase = _first_per_token(token_index, phase, n).astype(np.int8)
    clash = tok_phase[token_index] != phase
    if clash.any():
        row = _first_line(t, np.flatnonzero(clash))
        raise t.error(row, f"seq {seq[row]} step {step[row]} is marked both prefill and decode", _PHASES)
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
                                 f"(first at line {t.lines[first]}): every routed expert must appear once",
                           _REPEATS if what == "expert" else _RANKS)
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
                      f"not {K}", _INCOMPLETE)
    return {
        "seq_id": uniq[:, 0],
        "position": uniq[:, 1],
        "token_id": np.full(n, -1, dtype=np.int32),
        "phase": tok_phase,
        "topk_ids": ids,
        "topk_weights": weights,
    }, token_index


def _token_ids(t: _Table, token_index: np.ndarray, n: int, per_row: np.ndarray) -> np.ndarray:
    """Per-token ids from per-row ids (-1: none); every row of a token must agree."""
    out = _first_per_token(token_index, per_row, n)
    clash = out[token_index] != per_row
    if clash.any():
        row = _first_line(t, np.flatnonzero(clash))
        raise t.error(row, "this row's token differs from another row of the same seq and step", _TOKENS)
    return out.astype(np.int32)


# ---------------------------------------------------------------------------------- pass 2: groups of sequences
@dataclass
class _RunFile:
    """A spilled run: rows sorted by sequence id, from ``first`` to ``last``."""

    path: Path
    first: int
    last: int


def _write_run(path: Path, table: pa.Table) -> _RunFile:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=RUN_BATCH_ROWS)
    seq = table.column("seq")
    return _RunFile(path, int(seq[0].as_py()), int(seq[-1].as_py()))


def _chains(runs: list[_RunFile]) -> list[list[_RunFile]]:
    """Runs grouped into chains whose sequence ranges follow one another: each chain reads as one sorted stream
    with one file open. A log written request after request makes one chain; a serving log, a few."""
    chains: list[list[_RunFile]] = []
    for run in runs:
        fits = [c for c in chains if c[-1].last <= run.first]
        if fits:
            max(fits, key=lambda c: c[-1].last).append(run)
        else:
            chains.append([run])
    return chains


class _Chain:
    """A chain of runs read front to back, a record batch at a time (never mapped whole, one file open)."""

    def __init__(self, runs: list[_RunFile]):
        self._todo = list(runs)
        self._file: Any = None
        self._reader: Any = None
        self._buf: dict[str, np.ndarray] | None = None

    def _next_batch(self) -> pa.RecordBatch | None:
        while True:
            if self._reader is None:
                if not self._todo:
                    return None
                self._file = pa.OSFile(str(self._todo.pop(0).path), "rb")
                self._reader = pa.ipc.open_stream(self._file)
            try:
                return self._reader.read_next_batch()
            except StopIteration:
                self.close()

    def take_upto(self, last_seq: int) -> list[dict[str, np.ndarray]]:
        """The chain's next rows whose sequence id is at most ``last_seq`` (it is sorted by it)."""
        parts = []
        while True:
            if self._buf is None:
                batch = self._next_batch()
                if batch is None:
                    break
                self._buf = {name: batch.column(i).to_numpy(zero_copy_only=False)
                             for i, name in enumerate(batch.schema.names)}
            k = int(np.searchsorted(self._buf["seq"], last_seq, side="right"))
            if k:
                parts.append({name: a[:k] for name, a in self._buf.items()})
            if k < len(self._buf["seq"]):
                self._buf = {name: a[k:] for name, a in self._buf.items()}
                break
            self._buf = None
        return parts

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = self._reader = None


class _TopKChanged(Exception):
    """A group of a generic file has more rows in one (token, layer) than the first group had."""


def _group_ends(spill: _Spill, group_rows: int) -> np.ndarray:
    """The last sequence id of each group of whole sequences (about ``group_rows`` rows each)."""
    before = np.cumsum(spill.rows_per_seq) - spill.rows_per_seq
    gid = before // max(1, group_rows)
    return spill.seqs[np.flatnonzero(np.append(gid[1:] != gid[:-1], True))]


def _merged(spill: _Spill, chains: list[list[_RunFile]], group_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """The rows of ``chains``, group by group, in file order within each sequence."""
    readers = [_Chain(c) for c in chains]
    try:
        for last in _group_ends(spill, group_rows):
            parts = [p for reader in readers for p in reader.take_upto(int(last))]
            if not parts:
                continue
            if spill.token_column:
                for p in parts:  # JSONL blocks before the first token key: no tokens
                    for name in ("token_id", "token_word"):
                        p.setdefault(name, np.full(len(p["seq"]), -1, dtype=np.int64))
            cols = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}
            order = np.lexsort((cols["line"], cols["seq"]))
            yield {name: a[order] for name, a in cols.items()}
    finally:
        for reader in readers:
            reader.close()


def _fewer_runs(spill: _Spill, group_rows: int) -> list[list[_RunFile]]:
    """The runs as at most ``MAX_OPEN_RUNS`` chains, merging runs first when more than that overlap.

    Pass 2 reads every chain at once; a file whose every block spans all sequences (sorted by layer,
    say) would otherwise hold a batch and a file open per block. Each merge reads and writes the
    spilled rows once more, ``MAX_OPEN_RUNS`` chains into one sorted run at a time."""
    while len(chains := _chains(spill.runs)) > MAX_OPEN_RUNS:
        runs: list[_RunFile] = []
        for i in range(0, len(chains), MAX_OPEN_RUNS):
            subset = chains[i:i + MAX_OPEN_RUNS]
            if len(subset) == 1:
                runs.extend(subset[0])
                continue
            spill.merges += 1
            path = spill.folder / f"merged-{spill.merges:06d}.arrow"
            writer, first, last = None, None, None
            with pa.OSFile(str(path), "wb") as sink:
                for cols in _merged(spill, subset, group_rows):
                    table = pa.table(cols)
                    if writer is None:
                        writer = pa.ipc.new_stream(sink, table.schema)
                        first = int(cols["seq"][0])
                    writer.write_table(table, max_chunksize=RUN_BATCH_ROWS)
                    last = int(cols["seq"][-1])
                if writer is not None:
                    writer.close()
            for chain in subset:
                for run in chain:
                    run.path.unlink()
            runs.append(_RunFile(path, first, last))  # type: ignore[arg-type]
        spill.runs = runs
    return chains


def _group_rows(spill: _Spill, group_rows: int) -> Iterator[dict[str, np.ndarray]]:
    """Every group's rows, merged from all runs, in file order within each sequence."""
    yield from _merged(spill, _fewer_runs(spill, group_rows), group_rows)


def _generic_ranks(cols: dict[str, np.ndarray]) -> np.ndarray:
    """Rank of each row inside its (seq, step, layer): its order of appearance in the file."""
    seq, step, layer = cols["seq"], cols["step"], cols["layer"]
    order = np.lexsort((cols["line"], layer, step, seq))
    group = np.stack([seq, step, layer], axis=1)[order]
    new_group = np.concatenate([[True], np.any(group[1:] != group[:-1], axis=1)])
    starts = np.flatnonzero(new_group)
    run = np.arange(len(order)) - np.repeat(starts, np.diff(np.concatenate([starts, [len(order)]])))
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = run
    return rank


def _groups(spill: _Spill, info: ModelInfo, *, group_rows: int | None = None,
            progress: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """Pass 2: every group checked and turned into per-token arrays, in sequence order.

    A generic file's top-k is the most rows any (token, layer) has; in a valid file every group
    has that many, so the first group tells it. When a group fails a check (or has more rows in a
    (token, layer) than the first group), the rare path of a bad file: the top-k is counted over
    the whole file, every group is checked, and the fault named is the one a reading of the whole
    file names (see :class:`_GroupError`), e.g. a repeated line rather than the incomplete top-k it
    makes elsewhere look like.
    """
    group_rows = group_rows or GROUP_ROWS
    as_ids = spill.tokens is None or spill.tokens.as_ids()

    try:
        with tqdm(total=spill.num_rows, unit="row", unit_scale=True, desc=f"check {spill.path.name}",
                  file=sys.stderr, delay=1, disable=not progress, dynamic_ncols=True) as bar:
            for g, cols in enumerate(_group_rows(spill, group_rows)):
                rank = None
                if spill.fmt == "generic":
                    rank = _generic_ranks(cols)
                    most = int(rank.max()) + 1
                    if g == 0:
                        info.top_k = most
                    elif most > info.top_k:
                        raise _TopKChanged
                yield _group_tokens(spill, info, cols, as_ids, rank)
                bar.update(len(cols["seq"]))
    except (_GroupError, _TopKChanged) as e:
        first = e
    else:
        return
    if spill.fmt == "generic":
        info.top_k = max(int(_generic_ranks(cols).max()) + 1 for cols in _group_rows(spill, group_rows))
    faults: list[tuple[int, int, _GroupError]] = []
    for g, cols in enumerate(_group_rows(spill, group_rows)):
        try:
            _group_tokens(spill, info, cols, as_ids)
        except _GroupError as fault:
            faults.append((fault.kind, g if fault.kind == _INCOMPLETE else fault.line, fault))
    if faults:
        raise min(faults, key=lambda f: f[:2])[2] from None
    raise first if isinstance(first, UserError) else UserError(f"{spill.path}: the number of routed experts "
                                                              f"differs between tokens") from None


def _group_tokens(spill: _Spill, info: ModelInfo, cols: dict[str, np.ndarray], as_ids: bool,
                  rank: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One group's rows as per-token arrays, after the checks of whole tokens."""
    t = _Table(spill.path, {}, cols["line"])
    if rank is None:
        rank = cols["rank"] if spill.fmt == "route_trace" else _generic_ranks(cols)
    tokens, token_index = _to_tokens(
        t, cols["seq"], cols["step"], cols["phase"].astype(np.int8), cols["layer"], rank, cols["expert"],
        cols["weight"], info.num_layers, info.top_k, pruned_last_layer=spill.fmt == "route_trace")
    if spill.token_column:
        per_row = cols["token_id"] if as_ids else cols["token_word"]
        tokens["token_id"] = _token_ids(t, token_index, len(tokens["seq_id"]), per_row)
    return tokens


def _model_info(spill: _Spill, model_id: str | None, num_experts: int | None) -> ModelInfo:
    """The model numbers the whole file gives (a generic file's top-k: from its first group, in pass 2)."""
    if spill.fmt == "route_trace":
        m = spill.meta
        per_layer = [m["layer_bytes"].get(i, 0) for i in range(m["L"])] if m["layer_bytes"] else None
        common = Counter(per_layer).most_common(1)[0][0] if per_layer else None
        return ModelInfo(model_id=model_id or Path(m["model"]).name, family=m["arch"], num_layers=m["L"],
                         num_experts=m["E"], top_k=m["K"], expert_bytes=common or None, layer_expert_bytes=per_layer)
    L = int(np.flatnonzero(spill.layers_seen).max()) + 1
    absent = np.flatnonzero(~spill.layers_seen[:L])
    if len(absent):
        raise UserError(f"{spill.path}: layers are numbered 0..{L - 1} but layer {absent[0]} never appears")
    E = int(num_experts) if num_experts else spill.max_expert + 1
    if spill.tokens is not None:
        spill.tokens.as_ids()  # a token column of mixed or other kinds is refused before any group
    return ModelInfo(model_id=model_id or spill.path.stem, family="unknown", num_layers=L, num_experts=E, top_k=1)


def _parse(path: Path, fmt: str, model_id: str | None, num_experts: int | None,
           vocab: list[str]) -> tuple[ModelInfo, dict[str, np.ndarray]]:
    """The whole file as per-token arrays (small files and tests; the import itself never holds them all)."""
    with tempfile.TemporaryDirectory(prefix="routes-") as tmp:
        spill = _spill_file(path, fmt, Path(tmp), num_experts=num_experts, vocab=vocab)
        info = _model_info(spill, model_id, num_experts)
        groups = list(_groups(spill, info))
    return info, {k: np.concatenate([g[k] for g in groups]) for k in groups[0]}


def parse_route_trace(path: Path, num_experts: int | None = None) -> tuple[ModelInfo, dict[str, np.ndarray]]:
    return _parse(Path(path), "route_trace", None, num_experts, [])


def parse_generic(path: Path, model_id: str, num_experts: int | None,
                  vocab: list[str] | None = None) -> tuple[ModelInfo, dict[str, np.ndarray]]:
    """Parse a generic CSV/JSONL table; ``vocab`` (token strings by id) is extended with new token strings."""
    return _parse(Path(path), "generic", model_id, num_experts, vocab if vocab is not None else [])


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
    progress: bool = False,
    block_bytes: int | None = None,
    group_rows: int | None = None,
    shard_rows: int | None = None,
) -> TraceStore:
    """Read a routing log in blocks and write it as a trace store (rank order kept); see the module docstring.

    Holds the store's writer lock from before reading until the store is written; a file refused
    anywhere leaves no store behind (and an existing one untouched).
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
            return _import_locked(path, out, lock, fmt, model_id, num_experts, size, progress=progress,
                                  block_bytes=block_bytes, group_rows=group_rows, shard_rows=shard_rows)
        except BaseException:
            if new_store and _holds_no_shards(out):
                shutil.rmtree(out, ignore_errors=True)  # the store this run began holds nothing: leave none
            raise


def _holds_no_shards(out: Path) -> bool:
    try:
        return not json.loads((out / "manifest.json").read_text())["shards"]
    except FileNotFoundError:
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _import_locked(path: Path, out: Path, lock: StoreLock, fmt: str, model_id: str | None,
                   num_experts: int | None, size: int | None, *, progress: bool, block_bytes: int | None,
                   group_rows: int | None, shard_rows: int | None) -> TraceStore:
    fmt = detect_format(path) if fmt == "auto" else fmt
    vocab: list[str] = []
    old = TraceStore(out) if (out / "manifest.json").exists() else None
    if old is not None and old.has_vocab:
        vocab = old.vocab()
    known_words = len(vocab)
    spill_dir = new_spill_dir(out)
    writer: TraceStoreWriter | None = None
    staged: list[StagedShard] = []
    try:
        spill = _spill_file(path, fmt, spill_dir, num_experts=num_experts, vocab=vocab, block_bytes=block_bytes,
                            progress=progress)
        info = _model_info(spill, model_id, num_experts)
        done: set[int] = set()
        pending: list[dict[str, np.ndarray]] = []  # groups' tokens not staged yet (a shard holds several groups)

        def stage() -> None:
            if pending:
                staged.append(writer.format.stage(**{k: np.concatenate([g[k] for g in pending]) for k in pending[0]}))
                pending.clear()

        for tokens in _groups(spill, info, group_rows=group_rows, progress=progress):
            if writer is None:  # now the model's numbers are known (a generic file's top-k from its first group)
                if size is not None:  # one size for every layer: the user's word over the file's
                    info.expert_bytes, info.layer_expert_bytes = size, None
                writer = TraceStoreWriter(out, info, dataset={"source": str(path), "format": fmt},
                                          collection={"imported_from": str(path)}, lock=lock,
                                          skipped_reason=PRUNED_REASON if fmt == "route_trace" else None)
                done = writer.done_sequences
            if done:
                todo = ~np.isin(tokens["seq_id"], list(done))
                tokens = {k: v[todo] for k, v in tokens.items()}
            if len(tokens["seq_id"]):
                pending.append(tokens)
            if sum(g["topk_ids"].size for g in pending) >= (shard_rows or SHARD_ROWS):
                stage()
        stage()
        assert writer is not None  # a file without rows was refused in pass 1
        # every group passed: now the store changes (words first, so no stored token id lacks its string)
        if len(vocab) > known_words or (vocab and not writer.manifest.get("vocab")):
            writer.save_vocab(vocab)
        while staged:
            writer.adopt(staged[0], verify=False)
            staged.pop(0)
        return writer.finalize()
    finally:
        for shard in staged:
            writer.discard(shard)  # type: ignore[union-attr]
        if writer is not None:
            writer.close()
        shutil.rmtree(spill_dir, ignore_errors=True)


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
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    store = import_routes(args.path, args.out, fmt=args.format, model_id=args.model_id, num_experts=args.num_experts,
                          expert_bytes=args.expert_bytes, progress=not args.no_progress)
    phases = store.phases
    skipped = store.manifest.get("skipped_routes")
    note = f"; {skipped['rows']} prefill route(s) of layer(s) {skipped['layers']} not run (llama.cpp pruning)" \
        if skipped else ""
    print(
        f"imported {store.num_tokens} tokens ({int((phases == 0).sum())} prefill, {int((phases == 1).sum())} decode) "
        f"in {store.num_sequences} sequence(s), {len(store.manifest['shards'])} shard(s): {store.num_layers} layers x "
        f"{store.num_experts} experts, top-{store.top_k} -> {args.out}{note}"
    )


if __name__ == "__main__":
    run_cli(main)
