"""The trace store: the contract between collection, training and evaluation (see DESIGN.md).

A store is a folder::

    manifest.json                  format version, model numbers, dataset, shard list + checksums
    shards/shard-00000.arrow       Arrow IPC files, one row per token, memory-mapped on read
    router_weights.safetensors     layer_<l> -> (E, H) router matrices (optional; needed by gating lookahead)
    vocab.json                     token strings of imported traces whose token column held strings (optional)
    writer.lock                    the writer lock (see data_pipeline.store_lock); holds the last writer's pid

Rows of one sequence are contiguous, ordered by position, and never split across shards.

**Nothing lost.** One writer at a time (the writer lock). A shard is written under a unique
``.tmp`` name, its checksum and sequence ids are recorded in the manifest as ``pending``, then it
is renamed and moved to the shard list. A run killed at any moment therefore leaves whole shards
that are listed, at most one renamed shard that the manifest names as pending, and ``.tmp``
files. Recovery deletes the ``.tmp`` files and adopts an unlisted shard only when it is the
pending one (same checksum, same sequence ids) and none of its sequences is already stored; any
other unlisted shard is dropped, so a resume never stores a sequence twice. On an exception
(disk full, read-only folder) the writer removes its partial files before the error surfaces.

**Nothing silently wrong.** The manifest carries a checksum of its own content and is checked
for shape; each shard's checksum is verified the first time its data is read in a process
(``verify_on_read``; about 1.4 GB/s here), and ids are range-checked as columns are read (expert
ids in 0..E-1, or -1 where the manifest declares skipped routes; sequence ids non-decreasing and
stored once; positions increasing; phases 0/1; weights finite and >= 0), so damage is one
:class:`TraceStoreError` naming the file, never a traceback or a wrong number. A manifest without
``checksum`` (written by hand, or by an older version) is read unchecked.

Per-token columns:

- ``seq_id`` int64, ``position`` int32, ``token_id`` int32 (-1 when unknown), ``phase`` int8
  (0 = prefill, 1 = decode)
- ``topk_ids`` fixed-size list of int16, L*K values in rank order (highest router weight first);
  a (token, layer) that did not run holds -1 in all K slots (only where the manifest's
  ``skipped_routes`` declares it, e.g. llama.cpp's output-layer pruning in prefill)
- ``topk_weights`` fixed-size list of float32, L*K values (0 where skipped)
- ``router_logits`` (optional) fixed-size list of float16, L*E values
- ``hidden_<l>`` (optional, per chosen layer) fixed-size list of float16, H values: the MoE input
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import safetensors.numpy  # called through the module: the reliability tests patch its save_file

from core.errors import UserError, one_line
from core.model_info import DECODE, PREFILL, ModelInfo
from data_pipeline.store_lock import LOCK_NAME, StoreLock

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
ROUTER_WEIGHTS_NAME = "router_weights.safetensors"
VOCAB_NAME = "vocab.json"
MAX_EXPERTS = int(np.iinfo(np.int16).max)  # expert ids are stored as int16
SKIPPED = -1  # topk id of a (token, layer) that did not run
_SHARD_FILE = re.compile(rf"{SHARD_DIR}/shard-\d+\.arrow")
SPILL_SUFFIX = ".spill"  # a folder of temporary files a writer keeps inside shards/ while it runs (imports)


class TraceStoreError(UserError):
    """A problem with a trace store, phrased as one line for the user (it names the file)."""


@dataclass
class SequenceTrace:
    """All rows of one sequence (views into the memory-mapped shard where possible)."""

    seq_id: int
    start: int  # global row index of the first token
    positions: np.ndarray
    token_ids: np.ndarray
    phases: np.ndarray
    topk_ids: np.ndarray  # (T, L', K) int16
    topk_weights: np.ndarray  # (T, L', K) float32
    router_logits: np.ndarray | None = None  # (T, L', E) float16
    hidden: dict[int, np.ndarray] = field(default_factory=dict)  # layer -> (T, H) float16

    def __len__(self) -> int:
        return len(self.positions)


# ---------------------------------------------------------------------------------- files
def _fixed_list(values: np.ndarray, width: int, pa_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _ids_digest(seq_ids: np.ndarray) -> str:
    """Digest of a shard's distinct sequence ids (recorded in the manifest, checked on adoption)."""
    return hashlib.sha256(np.unique(np.asarray(seq_ids, dtype=np.int64)).tobytes()).hexdigest()


def _tmp_name(final: Path) -> Path:
    """A temporary name no other process or earlier run can hold."""
    return final.with_name(f"{final.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _spill_prefix() -> str:
    return f"import-{os.getpid()}-"


def new_spill_dir(path: str | os.PathLike[str]) -> Path:
    """A fresh folder for a writer's temporary files inside ``path``/shards (call it holding the writer lock).

    Recovery removes those of other processes (they can only be left by a writer that died), so
    they never outlive the next writer.
    """
    folder = Path(path) / SHARD_DIR / f"{_spill_prefix()}{secrets.token_hex(4)}{SPILL_SUFFIX}"
    folder.mkdir(parents=True)
    return folder


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    manifest["checksum"] = _manifest_checksum(manifest)
    _write_json_atomic(path / MANIFEST_NAME, manifest)


# ---------------------------------------------------------------------------------- manifest shape
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_manifest(manifest: Any, mpath: Path) -> None:
    """Refuse a manifest of the wrong shape in one line (it is read by code that trusts its types)."""

    def bad(what: str) -> TraceStoreError:
        return TraceStoreError(f"{mpath} is damaged or not a trace-store manifest: {what}")

    if not isinstance(manifest, dict):
        raise bad(f"it holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TraceStoreError(
            f"{mpath} has format_version {manifest.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )
    for key in ("model", "shards"):
        if key not in manifest:
            raise TraceStoreError(f"{mpath} lacks the '{key}' entry")
    if "checksum" in manifest and manifest["checksum"] != _manifest_checksum(manifest):
        raise TraceStoreError(
            f"{mpath} does not match its checksum: it was damaged or edited by hand (to edit it on purpose, "
            f"delete its 'checksum' entry)"
        )
    model = manifest["model"]
    if not isinstance(model, dict):
        raise bad("'model' is not an object")
    if not isinstance(model.get("model_id"), str):
        raise bad("model.model_id is missing or not a string")
    for key in ("num_layers", "num_experts", "top_k"):
        if not _is_int(model.get(key)) or model[key] < 1:
            raise bad(f"model.{key} is {model.get(key)!r}, not a positive integer")
    if model["num_experts"] > MAX_EXPERTS:
        raise bad(f"model.num_experts {model['num_experts']} does not fit int16 expert ids (at most {MAX_EXPERTS})")
    if model["top_k"] > model["num_experts"]:
        raise bad(f"model.top_k {model['top_k']} exceeds model.num_experts {model['num_experts']}")
    for key in ("hidden_size", "expert_bytes", "moe_intermediate_size"):
        if model.get(key) is not None and (not _is_int(model[key]) or model[key] < 1):
            raise bad(f"model.{key} is {model[key]!r}, not a positive integer or null")
    leb = model.get("layer_expert_bytes")
    if leb is not None and (not isinstance(leb, list) or len(leb) != model["num_layers"]
                            or not all(_is_int(b) and b >= 0 for b in leb)):
        raise bad("model.layer_expert_bytes is not a list of one byte count per layer")
    for key in ("family", "dtype", "revision"):
        if model.get(key) is not None and not isinstance(model[key], str):
            raise bad(f"model.{key} is not a string")
    shards = manifest["shards"]
    if not isinstance(shards, list):
        raise bad("'shards' is not a list")
    files = set()
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                or not _SHARD_FILE.fullmatch(entry["file"]):
            raise bad(f"shard entry {i} has no file name of the form {SHARD_DIR}/shard-NNNNN.arrow")
        if entry["file"] in files:
            raise bad(f"shard {entry['file']} is listed twice")
        files.add(entry["file"])
        if not _is_int(entry.get("rows")) or entry["rows"] < 0:
            raise bad(f"shard {entry['file']} has no valid row count")
        if not isinstance(entry.get("sha256"), str):
            raise bad(f"shard {entry['file']} has no checksum")
    hidden = manifest.get("hidden_layers", [])
    if not isinstance(hidden, list) or not all(_is_int(x) and 0 <= x < model["num_layers"] for x in hidden) \
            or len(set(hidden)) != len(hidden):
        raise bad("'hidden_layers' is not a list of distinct layer indices")
    if not isinstance(manifest.get("has_router_logits", False), bool):
        raise bad("'has_router_logits' is not true/false")
    skipped = manifest.get("skipped_routes")
    if skipped is not None and (not isinstance(skipped, dict) or not isinstance(skipped.get("layers"), list)
                                or not all(_is_int(x) and 0 <= x < model["num_layers"] for x in skipped["layers"])):
        raise bad("'skipped_routes' does not list the layers whose routes may be skipped")
    if manifest.get("vocab") is not None and manifest["vocab"] != VOCAB_NAME:
        raise bad(f"'vocab' names {manifest['vocab']!r}, not {VOCAB_NAME}")
    pending = manifest.get("pending")
    if pending is not None and (not isinstance(pending, dict) or not isinstance(pending.get("file"), str)
                                or not _SHARD_FILE.fullmatch(pending["file"])):
        raise bad("'pending' is not a shard entry")


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST_NAME
    if not path.exists():
        raise TraceStoreError(f"trace store {path} does not exist")
    if not path.is_dir():
        raise TraceStoreError(f"{path} is not a folder, so not a trace store")
    if not mpath.exists():
        raise TraceStoreError(f"{mpath} is missing: {path} is not a trace store")
    try:
        text = mpath.read_bytes().decode("utf-8")
        manifest = json.loads(text)
    except UnicodeDecodeError:
        raise TraceStoreError(f"{mpath} is not UTF-8 text: it is damaged") from None
    except json.JSONDecodeError as e:
        raise TraceStoreError(f"{mpath} is not valid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise TraceStoreError(f"{mpath} is not a trace-store manifest (nested too deeply)") from None
    _check_manifest(manifest, mpath)
    return manifest


# ---------------------------------------------------------------------------------- shards
_VERIFIED: set[tuple[str, int, int, int, str]] = set()  # shards whose checksum matched in this process


def _stat_key(path: Path, sha256: str) -> tuple[str, int, int, int, str]:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns, sha256)


class _Shard:
    """One memory-mapped Arrow IPC file; its checksum and ids are checked when its data is first read."""

    def __init__(self, path: Path, expected_rows: int | None = None, *, sha256: str | None = None,
                 limits: _Limits | None = None):
        self.path = path
        self.sha256 = sha256
        self.limits = limits
        if not path.exists():
            raise TraceStoreError(f"shard {path} is missing")
        try:
            self._source = pa.memory_map(str(path), "r")
            self.table = pa.ipc.open_file(self._source).read_all()
            self.table.validate()  # buffer sizes against lengths: a damaged file never reads out of bounds
            self.types = {f.name: f.type for f in self.table.schema}  # names decoded here, inside the try
        except (pa.ArrowException, OSError, ValueError) as e:
            raise TraceStoreError(f"shard {path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
        if expected_rows is not None and self.table.num_rows != expected_rows:
            raise TraceStoreError(
                f"shard {path} holds {self.table.num_rows} rows but the manifest says {expected_rows}"
            )
        self.num_rows = self.table.num_rows
        self._cache: dict[str, np.ndarray] = {}

    def verify(self) -> None:
        """Compare the file with its checksum (once per process while the file is unchanged)."""
        if self.sha256 is None:
            return
        key = _stat_key(self.path, self.sha256)
        if key in _VERIFIED:
            return
        if _sha256(self.path) != self.sha256:
            raise TraceStoreError(f"shard {self.path} does not match its checksum in the manifest: it is damaged")
        _VERIFIED.add(key)

    def column(self, name: str) -> np.ndarray:
        """Zero-copy numpy view of a column (fixed-size lists come back flat, (rows, width))."""
        if name not in self._cache:
            if self.limits is not None and self.limits.verify and not self._cache:
                self.verify()
            try:
                col = self.table.column(name).combine_chunks()
                if pa.types.is_fixed_size_list(col.type):
                    width = col.type.list_size
                    arr = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
                else:
                    arr = col.to_numpy(zero_copy_only=False)
            except (pa.ArrowException, ValueError) as e:
                raise TraceStoreError(f"shard {self.path} column '{name}' is unreadable ({str(e).splitlines()[0]})") \
                    from None
            if self.limits is not None:
                self.limits.check(self, name, arr)
            self._cache[name] = arr
        return self._cache[name]


@dataclass
class _Limits:
    """What a store's columns may hold, checked per shard as each column is first read."""

    num_layers: int
    num_experts: int
    top_k: int
    skipped_layers: frozenset[int]
    verify: bool

    def check(self, shard: _Shard, name: str, arr: np.ndarray) -> None:
        where = f"shard {shard.path} column '{name}'"
        if name == "topk_ids":
            self._check_ids(where, arr)
        elif name == "topk_weights":
            if len(arr) and (not np.isfinite(arr).all() or (arr < 0).any()):
                raise TraceStoreError(f"{where} holds a NaN, infinite or negative routing weight: it is damaged")
        elif name == "phase":
            if len(arr) and not np.isin(arr, (PREFILL, DECODE)).all():
                raise TraceStoreError(f"{where} holds a phase other than 0 (prefill) or 1 (decode): it is damaged")
        elif name == "token_id":
            if len(arr) and arr.min() < -1:
                raise TraceStoreError(f"{where} holds a negative token id: it is damaged")
        elif name in ("seq_id", "position"):
            self._check_order(shard)

    def _check_ids(self, where: str, arr: np.ndarray) -> None:
        if not len(arr):
            return
        lo, hi = int(arr.min()), int(arr.max())
        if hi >= self.num_experts:
            raise TraceStoreError(f"{where} holds expert id {hi}, outside 0..{self.num_experts - 1}: it is damaged")
        if lo >= 0:
            return
        ids = arr.reshape(len(arr), self.num_layers, self.top_k)
        neg = ids < 0
        whole = neg.all(axis=2)
        if lo < SKIPPED or not (whole | ~neg.any(axis=2)).all():
            raise TraceStoreError(f"{where} holds a negative expert id: it is damaged")
        layers = set(np.flatnonzero(whole.any(axis=0)).tolist())
        if not layers <= self.skipped_layers:
            raise TraceStoreError(
                f"{where} marks layer(s) {sorted(layers - self.skipped_layers)} as not run, which the manifest "
                f"does not declare (skipped_routes): it is damaged"
            )

    def _check_order(self, shard: _Shard) -> None:
        if "seq_id" in shard._cache or "position" in shard._cache:
            return  # checked when the first of the two was read
        sid = shard.table.column("seq_id").to_numpy()
        pos = shard.table.column("position").to_numpy()
        if not len(sid):
            return
        same = sid[1:] == sid[:-1]
        if sid.min() < 0 or (sid[1:] < sid[:-1]).any():
            raise TraceStoreError(f"shard {shard.path}: sequence ids are negative or out of order: it is damaged")
        if pos.min() < 0 or (same & (pos[1:] <= pos[:-1])).any():
            raise TraceStoreError(f"shard {shard.path}: positions within a sequence do not increase: it is damaged")


class TraceStore:
    """Read side of the store: iterate by sequence, random access by token, select layers."""

    def __init__(self, path: str | os.PathLike[str], *, verify_checksums: bool = False, verify_on_read: bool = True):
        """Open a store. ``verify_on_read`` (default): each shard's checksum is checked the first time its
        data is read; ``verify_checksums``: check every shard now. Ids are range-checked either way."""
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.model = ModelInfo.from_dict(self.manifest["model"])
        self.hidden_layers: list[int] = list(self.manifest.get("hidden_layers", []))
        self.has_router_logits: bool = bool(self.manifest.get("has_router_logits", False))
        skipped = (self.manifest.get("skipped_routes") or {}).get("layers", [])
        self._limits = _Limits(self.num_layers, self.num_experts, self.top_k, frozenset(skipped), verify_on_read)
        self._shards: list[_Shard] = []
        for entry in self.manifest["shards"]:
            shard = _Shard(self.path / entry["file"], entry["rows"], sha256=entry["sha256"], limits=self._limits)
            if verify_checksums:
                shard.verify()
            self._shards.append(shard)
        self._check_schema()
        rows = [s.num_rows for s in self._shards]
        self._offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
        self._bounds: np.ndarray | None = None
        self._concat: dict[str, np.ndarray] = {}  # whole columns of multi-shard stores, built once

    # ----------------------------------------------------------------- numbers
    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    @property
    def num_experts(self) -> int:
        return self.model.num_experts

    @property
    def top_k(self) -> int:
        return self.model.top_k

    @property
    def num_tokens(self) -> int:
        return int(self._offsets[-1])

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_bounds())

    def __len__(self) -> int:
        return self.num_tokens

    def has_hidden(self, layer: int) -> bool:
        return layer in self.hidden_layers

    def fingerprint(self) -> str:
        """A short id of the store's content (model numbers + shard checksums), for checkpoints."""
        h = hashlib.sha256(json.dumps(self.model.key(), sort_keys=True).encode())
        for entry in self.manifest["shards"]:
            h.update(str(entry.get("sha256", entry["file"])).encode())
        return h.hexdigest()[:16]

    def content_digest(self) -> str:
        """sha256 of every row in canonical order (by sequence id; rows of a sequence by position).

        It depends on what is stored, not on how: two stores with equal digests hold the same
        sequences with byte-equal values in every column, however their rows were split into
        shards, named, listed or written (one process or many ranks, one run or a resumed one).
        """
        names = [f.name for f in self._shards[0].table.schema] if self._shards else []
        head = hashlib.sha256(json.dumps({"model": self.model.key(), "columns": names}, sort_keys=True).encode())
        bounds = self.sequence_bounds()
        order = np.argsort(bounds[:, 0], kind="stable")
        in_order = bool((order == np.arange(len(order))).all())
        shard_of = np.searchsorted(self._offsets, bounds[:, 1], side="right") - 1
        for name in names:
            h = hashlib.sha256(name.encode())
            if in_order:  # storage order is canonical: whole shard columns, one update each
                for shard in self._shards:
                    h.update(np.ascontiguousarray(shard.column(name)))
            else:
                for i in order:
                    s = int(shard_of[i])
                    lo, hi = int(bounds[i, 1] - self._offsets[s]), int(bounds[i, 2] - self._offsets[s])
                    h.update(np.ascontiguousarray(self._shards[s].column(name)[lo:hi]))
            head.update(h.digest())
        return head.hexdigest()

    # ----------------------------------------------------------------- columns
    def _check_schema(self) -> None:
        L, K, E = self.num_layers, self.top_k, self.num_experts
        want = {"seq_id": None, "position": None, "token_id": None, "phase": None,
                "topk_ids": L * K, "topk_weights": L * K}
        if self.has_router_logits:
            want["router_logits"] = L * E
        hidden_size = self.model.hidden_size
        for layer in self.hidden_layers:
            want[f"hidden_{layer}"] = hidden_size
        for shard in self._shards:
            for name, width in want.items():
                if name not in shard.types:
                    raise TraceStoreError(f"shard {shard.path} lacks column '{name}'")
                t = shard.types[name]
                if width is not None and (not pa.types.is_fixed_size_list(t) or t.list_size != width):
                    raise TraceStoreError(
                        f"shard {shard.path} column '{name}' has type {t}, expected {width} values per token"
                    )

    def column(self, name: str) -> np.ndarray:
        """A whole column over all shards (zero-copy with one shard; concatenated once and kept otherwise)."""
        if not self._shards:
            return np.zeros((0,), dtype=np.int64)
        if len(self._shards) == 1:
            return self._shards[0].column(name)
        if name not in self._concat:
            self._concat[name] = np.concatenate([s.column(name) for s in self._shards])
        return self._concat[name]

    @property
    def seq_ids(self) -> np.ndarray:
        return self.column("seq_id")

    @property
    def positions(self) -> np.ndarray:
        return self.column("position")

    @property
    def token_ids(self) -> np.ndarray:
        return self.column("token_id")

    @property
    def phases(self) -> np.ndarray:
        return self.column("phase")

    def _layers(self, layers: Sequence[int] | None) -> list[int]:
        if layers is None:
            return list(range(self.num_layers))
        out = list(layers)
        for layer in out:
            if not 0 <= layer < self.num_layers:
                raise TraceStoreError(f"layer {layer} is out of range: {self.path} has {self.num_layers} layers")
        return out

    def _per_layer(self, name: str, width: int, layers: Sequence[int] | None) -> np.ndarray:
        arr = self.column(name).reshape(-1, self.num_layers, width)
        if layers is None:
            return arr
        return arr[:, self._layers(layers)]

    def topk_ids(self, layers: Sequence[int] | None = None) -> np.ndarray:
        """(N, L', K) int16 expert ids in rank order."""
        return self._per_layer("topk_ids", self.top_k, layers)

    def topk_weights(self, layers: Sequence[int] | None = None) -> np.ndarray:
        """(N, L', K) float32 routing weights, aligned with :meth:`topk_ids`."""
        return self._per_layer("topk_weights", self.top_k, layers)

    def router_logits(self, layers: Sequence[int] | None = None) -> np.ndarray:
        """(N, L', E) float16 router logits; raises when the store was collected without them."""
        if not self.has_router_logits:
            raise TraceStoreError(f"{self.path} has no router logits (collected without them, or imported)")
        return self._per_layer("router_logits", self.num_experts, layers)

    def hidden(self, layer: int) -> np.ndarray:
        """(N, H) float16 MoE-input hidden states of one layer."""
        if layer not in self.hidden_layers:
            have = ",".join(map(str, self.hidden_layers)) or "none"
            raise TraceStoreError(f"{self.path} has no hidden states for layer {layer} (it has: {have})")
        return self.column(f"hidden_{layer}")

    # ----------------------------------------------------------------- sequences
    def sequence_bounds(self) -> np.ndarray:
        """(S, 3) int64 rows of (seq_id, start, stop) in storage order."""
        if self._bounds is None:
            sid = self.seq_ids
            if len(sid) == 0:
                self._bounds = np.zeros((0, 3), dtype=np.int64)
            else:
                new = np.concatenate([[True], sid[1:] != sid[:-1]])
                new[self._offsets[:-1][self._offsets[:-1] < len(sid)]] = True  # a sequence never spans shards
                starts = np.flatnonzero(new)
                stops = np.concatenate([starts[1:], [len(sid)]])
                bounds = np.stack([sid[starts], starts, stops], axis=1).astype(np.int64)
                uniq, counts = np.unique(bounds[:, 0], return_counts=True)
                if (counts > 1).any():
                    raise TraceStoreError(f"{self.path}: sequence {int(uniq[counts > 1][0])} is stored twice "
                                          f"(in more than one place): the store is damaged")
                self._bounds = bounds
        return self._bounds

    def sequence(self, index: int, layers: Sequence[int] | None = None, *, hidden: bool = True) -> SequenceTrace:
        """The index-th sequence in storage order (zero-copy views into the one shard that holds it)."""
        seq_id, start, stop = (int(x) for x in self.sequence_bounds()[index])
        s = int(np.searchsorted(self._offsets, start, side="right") - 1)
        shard = self._shards[s]
        sl = slice(start - int(self._offsets[s]), stop - int(self._offsets[s]))
        L, sel = self.num_layers, (None if layers is None else self._layers(layers))

        def per_layer(name: str) -> np.ndarray:
            arr = shard.column(name)[sl].reshape(stop - start, L, -1)
            return arr if sel is None else arr[:, sel]

        logits = per_layer("router_logits") if self.has_router_logits else None
        hid = {layer: shard.column(f"hidden_{layer}")[sl] for layer in self.hidden_layers} if hidden else {}
        return SequenceTrace(
            seq_id=seq_id,
            start=start,
            positions=shard.column("position")[sl],
            token_ids=shard.column("token_id")[sl],
            phases=shard.column("phase")[sl],
            topk_ids=per_layer("topk_ids"),
            topk_weights=per_layer("topk_weights"),
            router_logits=logits,
            hidden=hid,
        )

    def iter_sequences(self, layers: Sequence[int] | None = None, *, hidden: bool = True) -> Iterator[SequenceTrace]:
        for i in range(len(self.sequence_bounds())):
            yield self.sequence(i, layers, hidden=hidden)

    def token(self, index: int) -> dict[str, Any]:
        """Random access to one token's row, touching only the shard that holds it."""
        if not 0 <= index < self.num_tokens:
            raise IndexError(f"token {index} out of range [0, {self.num_tokens})")
        s = int(np.searchsorted(self._offsets, index, side="right") - 1)
        shard, row = self._shards[s], index - int(self._offsets[s])
        L = self.num_layers
        out: dict[str, Any] = {
            "seq_id": int(shard.column("seq_id")[row]),
            "position": int(shard.column("position")[row]),
            "token_id": int(shard.column("token_id")[row]),
            "phase": int(shard.column("phase")[row]),
            "topk_ids": shard.column("topk_ids")[row].reshape(L, -1),
            "topk_weights": shard.column("topk_weights")[row].reshape(L, -1),
        }
        if self.has_router_logits:
            out["router_logits"] = shard.column("router_logits")[row].reshape(L, -1)
        for layer in self.hidden_layers:
            out[f"hidden_{layer}"] = shard.column(f"hidden_{layer}")[row]
        return out

    # ----------------------------------------------------------------- side files
    @property
    def has_router_weights(self) -> bool:
        return (self.path / ROUTER_WEIGHTS_NAME).exists()

    def router_weights(self) -> dict[int, np.ndarray]:
        """layer -> (E, H) float32 router matrix, saved beside the shards at collection time."""
        p = self.path / ROUTER_WEIGHTS_NAME
        if not p.exists():
            raise TraceStoreError(f"{p} is missing: the store has no router weights (imported trace?)")
        want = self.manifest.get("router_weights_sha256")
        if want is not None and _sha256(p) != want:
            raise TraceStoreError(f"{p} does not match its checksum in the manifest: it is damaged")
        try:
            tensors = safetensors.numpy.load_file(str(p))
            out = {int(k.removeprefix("layer_")): v for k, v in tensors.items()}
        except Exception as e:  # safetensors raises several types for a bad header
            raise TraceStoreError(f"{p} is corrupt ({one_line(str(e))})") from None
        bad = [k for k, v in out.items() if not 0 <= k < self.num_layers or v.ndim != 2 or v.shape[0] != self.num_experts]
        if bad:
            raise TraceStoreError(f"{p} holds a router matrix that does not fit the model (layer {bad[0]})")
        return out

    @property
    def has_vocab(self) -> bool:
        return self.manifest.get("vocab") == VOCAB_NAME

    def vocab(self) -> list[str]:
        """Token strings by token id, for imported traces whose token column held strings."""
        p = self.path / VOCAB_NAME
        if not self.has_vocab:
            raise TraceStoreError(f"{self.path} has no vocabulary (its token ids are the model's own, or unknown)")
        want = self.manifest.get("vocab_sha256")
        if not p.exists() or (want is not None and _sha256(p) != want):
            raise TraceStoreError(f"{p} is missing or does not match its checksum in the manifest")
        try:
            words = json.loads(p.read_text())
        except (ValueError, UnicodeDecodeError):
            raise TraceStoreError(f"{p} is not a JSON list of token strings") from None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise TraceStoreError(f"{p} is not a JSON list of token strings")
        return words


def open_store(path: str | os.PathLike[str], *, verify_checksums: bool = False) -> TraceStore:
    return TraceStore(path, verify_checksums=verify_checksums)


# ---------------------------------------------------------------------------------- staged shards
_STAGED_NAME = re.compile(r"shard-\d+\.arrow\.[A-Za-z0-9_-]+\.tmp")


@dataclass
class StagedShard:
    """A shard written under a unique ``.tmp`` name in ``shards/`` and not yet part of the store.

    Only the holder of the writer lock makes it part of the store (:meth:`TraceStoreWriter.adopt`:
    checksum and content verified, then the usual pending-rename-register steps), so a process that
    writes shards without the lock (a rank of a distributed collection, an import staging every
    shard before any is committed) can never leave a file that reads as part of the store. Names
    are relative to the store, so a staged shard can be described to a process on another node.
    """

    tmp_name: str  # file name inside shards/
    index: int | None  # the shard number it asks for (shard-<index>.arrow); None: the next free one
    rows: int
    sha256: str
    seq_ids: list[int]  # distinct sequence ids, sorted
    skipped: dict[str, Any] = field(default_factory=dict)  # skipped routes it holds: layers, rows

    def entry(self, file: str) -> dict[str, Any]:
        return {"file": file, "rows": self.rows, "sequences": len(self.seq_ids), "sha256": self.sha256,
                "seq_ids_sha256": _ids_digest(np.asarray(self.seq_ids, dtype=np.int64))}


class ShardFormat:
    """What the shards of one store hold (model numbers, hidden layers, logits, skipped routes).

    Checks rows the way the reader will and writes them as a :class:`StagedShard`. It takes no
    lock and touches no manifest: that is why the ranks of a distributed collection can use it
    while rank 0 holds the store's writer lock.
    """

    def __init__(self, path: str | os.PathLike[str], model: ModelInfo, *, hidden_layers: Sequence[int] = (),
                 store_router_logits: bool = False, skipped_reason: str | None = None):
        self.path = Path(path)
        self.model = model
        self.hidden_layers = sorted(int(x) for x in hidden_layers)
        self.store_router_logits = store_router_logits
        self.skipped_reason = skipped_reason

    def schema(self) -> pa.Schema | None:
        """The Arrow schema of this store's shards (None while the hidden size is not known yet)."""
        L, K, E = self.model.num_layers, self.model.top_k, self.model.num_experts
        fields = [pa.field("seq_id", pa.int64()), pa.field("position", pa.int32()), pa.field("token_id", pa.int32()),
                  pa.field("phase", pa.int8()), pa.field("topk_ids", pa.list_(pa.int16(), L * K)),
                  pa.field("topk_weights", pa.list_(pa.float32(), L * K))]
        if self.store_router_logits:
            fields.append(pa.field("router_logits", pa.list_(pa.float16(), L * E)))
        if self.hidden_layers:
            if self.model.hidden_size is None:
                return None
            fields += [pa.field(f"hidden_{layer}", pa.list_(pa.float16(), self.model.hidden_size))
                       for layer in self.hidden_layers]
        return pa.schema(fields)

    def check_rows(self, n: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """Refuse rows that would read back as damage (the reader's checks, before anything is written).

        Returns the skipped routes the rows hold (``{}`` when none)."""
        L, K, E = self.model.num_layers, self.model.top_k, self.model.num_experts
        for name in ("seq_id", "position", "token_id", "phase"):
            if np.shape(arrays[name]) != (n,):
                raise TraceStoreError(f"{self.path}: {name} has shape {np.shape(arrays[name])}, expected ({n},)")
        for name in ("topk_ids", "topk_weights"):
            if np.size(arrays[name]) != n * L * K:
                raise TraceStoreError(f"{self.path}: {name} does not hold {L} layers x top-{K} per token")
        sid, pos = np.asarray(arrays["seq_id"]), np.asarray(arrays["position"])
        if n and (sid.min() < 0 or pos.min() < 0 or pos.max() > np.iinfo(np.int32).max):
            raise TraceStoreError(f"{self.path}: sequence ids and positions must be >= 0 (positions < 2^31)")
        if n and not np.isin(arrays["phase"], (PREFILL, DECODE)).all():
            raise TraceStoreError(f"{self.path}: phase must be 0 (prefill) or 1 (decode)")
        ids = np.asarray(arrays["topk_ids"]).reshape(n, L, K)
        w = np.asarray(arrays["topk_weights"], dtype=np.float32)
        if n and (ids.max() >= E or ids.min() < SKIPPED):
            raise TraceStoreError(f"{self.path}: an expert id is outside 0..{E - 1}")
        if n and (not np.isfinite(w).all() or (w < 0).any()):
            raise TraceStoreError(f"{self.path}: a routing weight is NaN, infinite or negative")
        skipped = _skipped_routes(ids)
        if skipped is None or (skipped and self.skipped_reason is None):
            raise TraceStoreError(f"{self.path}: an expert id is -1 (not run) where no skipped route is declared")
        return skipped

    def stage(
        self,
        *,
        seq_id: np.ndarray,
        position: np.ndarray,
        token_id: np.ndarray,
        phase: np.ndarray,
        topk_ids: np.ndarray,
        topk_weights: np.ndarray,
        router_logits: np.ndarray | None = None,
        hidden: dict[int, np.ndarray] | None = None,
        index: int | None = None,
    ) -> StagedShard:
        """Write rows of whole sequences as a staged shard (rows sorted by sequence, then position)."""
        L, K, E = self.model.num_layers, self.model.top_k, self.model.num_experts
        n = len(seq_id)
        skipped = self.check_rows(n, {"seq_id": seq_id, "position": position, "token_id": token_id, "phase": phase,
                                      "topk_ids": topk_ids, "topk_weights": topk_weights})
        order = np.lexsort((position, seq_id))  # rows of a sequence contiguous and by position
        cols: dict[str, pa.Array] = {
            "seq_id": pa.array(np.asarray(seq_id, dtype=np.int64)[order]),
            "position": pa.array(np.asarray(position, dtype=np.int32)[order]),
            "token_id": pa.array(np.asarray(token_id, dtype=np.int32)[order]),
            "phase": pa.array(np.asarray(phase, dtype=np.int8)[order]),
            "topk_ids": _fixed_list(np.asarray(topk_ids, dtype=np.int16).reshape(n, L * K)[order], L * K, pa.int16()),
            "topk_weights": _fixed_list(
                np.asarray(topk_weights, dtype=np.float32).reshape(n, L * K)[order], L * K, pa.float32()
            ),
        }
        if self.store_router_logits:
            if router_logits is None:
                raise ValueError("this store records router logits; pass router_logits")
            cols["router_logits"] = _fixed_list(
                np.asarray(router_logits, dtype=np.float16).reshape(n, L * E)[order], L * E, pa.float16()
            )
        for layer in self.hidden_layers:
            if hidden is None or layer not in hidden:
                raise ValueError(f"this store records hidden states of layer {layer}; pass them")
            h = np.asarray(hidden[layer], dtype=np.float16)
            cols[f"hidden_{layer}"] = _fixed_list(h[order], h.shape[1], pa.float16())
        if self.model.hidden_size is None and self.hidden_layers:
            self.model.hidden_size = int(np.asarray(hidden[self.hidden_layers[0]]).shape[1])  # type: ignore[index]
        table = pa.table(cols)
        guess = index if index is not None else 0
        tmp = _tmp_name(self.path / SHARD_DIR / f"shard-{guess:05d}.arrow")
        try:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            digest = _sha256(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return StagedShard(tmp_name=tmp.name, index=index, rows=int(n), sha256=digest,
                           seq_ids=[int(x) for x in np.unique(seq_id)], skipped=skipped)


def _skipped_routes(ids: np.ndarray) -> dict[str, Any] | None:
    """The (token, layer) routes marked as not run in (N, L, K) ids: ``{}`` when none, ``{"layers", "rows"}``
    when some, None when a route is only partly -1 (never valid)."""
    neg = ids < 0
    if not neg.any():
        return {}
    whole = neg.all(axis=2)
    if not (whole | ~neg.any(axis=2)).all():
        return None
    return {"layers": np.flatnonzero(whole.any(axis=0)).tolist(), "rows": int(whole.sum())}


class TraceStoreWriter:
    """Write side: whole sequences per shard, atomic shards, resumable, one writer at a time.

    Opening an existing folder resumes it when it holds the same model (and the same choice of
    hidden layers / logits); any other content is refused before anything is touched. The writer
    holds the store's writer lock (``lock``: one already held by the caller, else its own) until
    :meth:`close` or :meth:`finalize`; use it as a context manager so an error releases it.
    ``skipped_reason``: why some (token, layer) routes may be absent (ids -1); without it a shard
    holding -1 ids is refused.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model: ModelInfo,
        *,
        hidden_layers: Sequence[int] = (),
        store_router_logits: bool = False,
        dataset: dict[str, Any] | None = None,
        collection: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        lock: StoreLock | None = None,
        skipped_reason: str | None = None,
    ):
        self.path = Path(path)
        self.model = model
        self.hidden_layers = sorted(int(x) for x in hidden_layers)
        self.store_router_logits = store_router_logits
        self.skipped_reason = skipped_reason
        self.format = ShardFormat(self.path, model, hidden_layers=self.hidden_layers,
                                  store_router_logits=store_router_logits, skipped_reason=skipped_reason)
        _check_model(model)
        self._check_target()
        self._lock = lock if lock is not None else StoreLock(self.path)
        self._own_lock = lock is None
        self._lock.acquire()
        try:
            self._check_target()  # again, under the lock: another writer may have finished meanwhile
            self._seen: set[int] = set()
            self._first: dict[str, int] = {}  # shard file -> its first sequence id (the canonical order)
            if (self.path / MANIFEST_NAME).exists():
                self.manifest = _read_manifest(self.path)
                (self.path / SHARD_DIR).mkdir(exist_ok=True)
                self._recover()
            else:
                (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
                self.manifest = {
                    "format_version": FORMAT_VERSION,
                    "model": asdict(model),
                    "tokenizer": tokenizer,
                    "dataset": dataset or {},
                    "collection": collection or {},
                    "hidden_layers": self.hidden_layers,
                    "has_router_logits": store_router_logits,
                    "num_tokens": 0,
                    "num_sequences": 0,
                    "complete": False,
                    "shards": [],
                }
                _write_manifest(self.path, self.manifest)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------- lock
    def close(self) -> None:
        """Release the writer lock (when this writer took it)."""
        if self._own_lock:
            self._lock.release()

    def __enter__(self) -> TraceStoreWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _require_lock(self) -> None:
        if not self._lock.held:
            raise TraceStoreError(f"the writer of {self.path} is closed (finalized): open a new one to write more")

    # ----------------------------------------------------------------- checks
    def _check_target(self) -> None:
        """Refuse a folder that holds something else, before anything in it is touched."""
        if self.path.exists() and not self.path.is_dir():
            raise TraceStoreError(f"{self.path} exists and is not a folder")
        mpath = self.path / MANIFEST_NAME
        if mpath.exists():
            old = _read_manifest(self.path)
            old_model = ModelInfo.from_dict(old["model"])
            old_key, new_key = old_model.key(), self.model.key()
            if old_key["hidden_size"] is None or new_key["hidden_size"] is None:  # not known yet: no conflict
                old_key["hidden_size"] = new_key["hidden_size"] = None
            if old_key != new_key:
                raise TraceStoreError(
                    f"{self.path} already holds traces of {old_model.model_id} "
                    f"({old_model.num_layers} layers x {old_model.num_experts} experts); "
                    f"choose another --out or delete it"
                )
            if sorted(old.get("hidden_layers", [])) != self.hidden_layers or bool(
                old.get("has_router_logits")
            ) != bool(self.store_router_logits):
                raise TraceStoreError(
                    f"{self.path} was collected with other --hidden-layers/--router-logits settings; "
                    f"choose another --out or delete it"
                )
        else:
            check_out_folder(self.path)

    # ----------------------------------------------------------------- recovery
    def _recover(self) -> None:
        """Drop partial files; adopt the pending shard when it is whole and new; drop other unlisted shards."""
        shard_dir = self.path / SHARD_DIR
        for tmp in [*shard_dir.glob("*.tmp"), *self.path.glob(f"{MANIFEST_NAME}.*tmp")]:
            tmp.unlink()
        for spill in shard_dir.glob(f"*{SPILL_SUFFIX}"):
            if not spill.name.startswith(_spill_prefix()):  # another (dead) process's: this one holds the lock
                shutil.rmtree(spill, ignore_errors=True)
        limits = _Limits(self.model.num_layers, self.model.num_experts, self.model.top_k,
                         frozenset((self.manifest.get("skipped_routes") or {}).get("layers", [])), verify=True)
        listed = {e["file"] for e in self.manifest["shards"]}
        for entry in self.manifest["shards"]:
            shard = _Shard(self.path / entry["file"], entry["rows"], sha256=entry["sha256"], limits=limits)
            ids = np.unique(shard.column("seq_id"))
            if np.isin(ids, list(self._seen)).any():
                raise TraceStoreError(f"{self.path}: a sequence of {entry['file']} is stored twice: the store is damaged")
            self._seen.update(int(x) for x in ids)
            self._first[entry["file"]] = int(ids[0]) if len(ids) else -1
        pending = self.manifest.pop("pending", None)
        for spath in sorted(shard_dir.glob("shard-*.arrow")):
            rel = f"{SHARD_DIR}/{spath.name}"
            if rel in listed:
                continue
            why, seq_ids = self._adoption_refusal(spath, pending, limits)
            if why is None:
                self._register({**pending, "_seq_ids": seq_ids})  # type: ignore[dict-item]
                continue
            print(f"warning: {self.path}: dropped unlisted shard {rel}: {why}", file=sys.stderr)
            spath.unlink()  # never listed, so never part of the store; its sequences are collected again
        self.manifest["complete"] = False
        _write_manifest(self.path, self.manifest)

    def _adoption_refusal(self, spath: Path, pending: dict[str, Any] | None,
                          limits: _Limits) -> tuple[str | None, list[int]]:
        """(why the unlisted shard ``spath`` must not join the store or None, its sequence ids)."""
        if pending is None or pending.get("file") != f"{SHARD_DIR}/{spath.name}":
            return "the manifest does not name it as the shard being written (another writer's, or stale)", []
        if _sha256(spath) != pending.get("sha256"):
            return "it does not match the checksum recorded for it", []
        try:
            seq_ids = _Shard(spath, pending.get("rows"), sha256=None, limits=limits).column("seq_id")
        except TraceStoreError as e:
            return str(e), []
        uniq = np.unique(seq_ids)
        if _ids_digest(uniq) != pending.get("seq_ids_sha256"):
            return "its sequence ids differ from those recorded for it", []
        if np.isin(uniq, list(self._seen)).any():
            return "some of its sequences are already stored", []
        return None, [int(x) for x in uniq]

    @property
    def done_sequences(self) -> set[int]:
        return set(self._seen)

    def _register(self, entry: dict[str, Any]) -> None:
        self.manifest.pop("pending", None)
        self.manifest["shards"].append(entry)
        ids = entry.pop("_seq_ids", [])
        self._seen.update(ids)
        self._first[entry["file"]] = min(ids) if len(ids) else -1
        self.manifest["num_tokens"] = int(sum(e["rows"] for e in self.manifest["shards"]))
        self.manifest["num_sequences"] = len(self._seen)
        _write_manifest(self.path, self.manifest)

    # ----------------------------------------------------------------- writing
    def write_shard(self, *, index: int | None = None, **arrays: Any) -> Path:
        """Write rows of whole sequences as one new shard. Arrays are per token (N, ...) as in
        :meth:`ShardFormat.stage`; ``index``: the shard number to use when it is free."""
        self._require_lock()
        uniq = np.unique(arrays["seq_id"])
        if np.any(np.isin(uniq, list(self._seen))):
            raise TraceStoreError(f"{self.path}: a sequence in this shard is already stored")
        return self._adopt(self.format.stage(index=index, **arrays), verify=False)

    def adopt(self, staged: StagedShard, *, verify: bool = True) -> Path:
        """Make a staged shard part of the store, after checking it holds what it claims.

        The file must match its checksum, hold this store's schema, pass the reader's id and order
        checks and hold only sequences not stored yet; otherwise it is deleted and the error names it.
        ``verify=False`` skips all but the last check, for a shard this process staged itself.
        """
        self._require_lock()
        return self._adopt(staged, verify=verify)

    def discard(self, staged: StagedShard) -> None:
        """Delete a staged shard that will not be adopted."""
        if _STAGED_NAME.fullmatch(staged.tmp_name):
            (self.path / SHARD_DIR / staged.tmp_name).unlink(missing_ok=True)

    def _adopt(self, staged: StagedShard, *, verify: bool) -> Path:
        if not _STAGED_NAME.fullmatch(staged.tmp_name):
            raise TraceStoreError(f"{self.path}: {staged.tmp_name!r} is not the name of a staged shard")
        tmp = self.path / SHARD_DIR / staged.tmp_name
        try:
            if verify:
                self._verify_staged(tmp, staged)
            if np.isin(staged.seq_ids, list(self._seen)).any():
                raise TraceStoreError(f"{self.path}: a sequence of staged shard {staged.tmp_name} is already stored")
            index = staged.index if staged.index is not None else len(self.manifest["shards"])
            while (self.path / SHARD_DIR / f"shard-{index:05d}.arrow").exists():
                index += 1
            final = self.path / SHARD_DIR / f"shard-{index:05d}.arrow"
            entry = staged.entry(f"{SHARD_DIR}/{final.name}")
            # name the shard before it appears: recovery adopts exactly this file, nothing else
            self.manifest["pending"] = entry
            _write_manifest(self.path, self.manifest)
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            self.manifest.pop("pending", None)
            raise
        if staged.skipped:
            self._note_skipped(staged.skipped)
        self._register({**entry, "_seq_ids": list(staged.seq_ids)})
        return final

    def _verify_staged(self, tmp: Path, staged: StagedShard) -> None:
        """Check a staged shard written by another process before it joins (see :meth:`adopt`)."""
        where = f"staged shard {tmp}"
        if not tmp.exists():
            raise TraceStoreError(f"{where} is missing: the process that wrote it was stopped, or it wrote to "
                                  f"another filesystem (ranks on several nodes need --out on a shared one)")
        if _sha256(tmp) != staged.sha256:
            raise TraceStoreError(f"{where} does not match the checksum its writer reported: it is damaged")
        all_layers = frozenset(range(self.model.num_layers)) if self.format.skipped_reason else frozenset()
        limits = _Limits(self.model.num_layers, self.model.num_experts, self.model.top_k, all_layers, verify=False)
        shard = _Shard(tmp, staged.rows, sha256=None, limits=limits)
        want = self.format.schema()
        if want is None and self.hidden_layers and f"hidden_{self.hidden_layers[0]}" in shard.types:
            t = shard.types[f"hidden_{self.hidden_layers[0]}"]
            if pa.types.is_fixed_size_list(t):
                self.model.hidden_size = t.list_size
                want = self.format.schema()
        if want is None or not shard.table.schema.equals(want):
            raise TraceStoreError(f"{where} does not hold this store's columns")
        for name in ("seq_id", "phase", "token_id", "topk_weights"):
            shard.column(name)  # the reader's range and order checks
        uniq = np.unique(shard.column("seq_id"))
        if uniq.tolist() != list(staged.seq_ids):
            raise TraceStoreError(f"{where} holds other sequences than its writer reported")
        L, K = self.model.num_layers, self.model.top_k
        skipped = _skipped_routes(shard.column("topk_ids").reshape(-1, L, K))
        if skipped != staged.skipped:
            raise TraceStoreError(f"{where} holds other skipped routes than its writer reported")

    def _note_skipped(self, skipped: dict[str, Any]) -> None:
        old = self.manifest.get("skipped_routes") or {"reason": self.skipped_reason, "layers": [], "rows": 0}
        old["layers"] = sorted(set(old["layers"]) | set(skipped["layers"]))
        old["rows"] = int(old.get("rows", 0)) + skipped["rows"]
        self.manifest["skipped_routes"] = old

    def save_router_weights(self, weights: dict[int, np.ndarray]) -> None:
        self._require_lock()

        final = self.path / ROUTER_WEIGHTS_NAME
        tmp = _tmp_name(final)
        try:
            tensors = {f"layer_{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}
            safetensors.numpy.save_file(tensors, str(tmp))
            digest = _sha256(tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        self.update(router_weights_sha256=digest)

    def save_vocab(self, words: list[str]) -> None:
        """Token strings by id (imports whose token column held strings); recorded in the manifest."""
        self._require_lock()
        final = self.path / VOCAB_NAME
        _write_json_atomic(final, list(words))
        self.update(vocab=VOCAB_NAME, vocab_sha256=_sha256(final))

    def update(self, **entries: Any) -> None:
        """Merge extra manifest entries (e.g. collection statistics) and persist atomically."""
        self._require_lock()
        self.manifest.update(entries)
        _write_manifest(self.path, self.manifest)

    def finalize(self) -> TraceStore:
        """Mark the store complete and release the lock. Shards are listed by their first sequence id, so a
        store reads in sequence order whichever process wrote which shard, in whatever order."""
        self._require_lock()
        if all(e["file"] in self._first for e in self.manifest["shards"]):
            self.manifest["shards"].sort(key=lambda e: self._first[e["file"]])
        self.manifest["model"] = asdict(self.model)
        self.manifest["complete"] = True
        _write_manifest(self.path, self.manifest)
        self.close()
        return TraceStore(self.path)


def check_out_folder(path: str | os.PathLike[str]) -> None:
    """Refuse an output path that is a file, or a folder holding something other than a trace store.

    Called before the writer lock is taken, so a refused folder gets no lock file.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise TraceStoreError(f"{path} exists and is not a folder")
    if (path / LOCK_NAME).exists():
        return  # a store a writer began (maybe right now): the lock decides, and the writer checks again under it
    if path.is_dir() and not (path / MANIFEST_NAME).exists() \
            and any(p.name not in (SHARD_DIR, LOCK_NAME) for p in path.iterdir()):
        raise TraceStoreError(f"{path} is not empty and is not a trace store; choose another --out")


def _check_model(model: ModelInfo) -> None:
    """Refuse model numbers the store cannot hold (int16 expert ids) before anything is written."""
    for name in ("num_layers", "num_experts", "top_k"):
        value = getattr(model, name)
        if not _is_int(value) or value < 1:
            raise TraceStoreError(f"{name} must be a positive integer, got {value!r}")
    if model.num_experts > MAX_EXPERTS:
        raise TraceStoreError(f"{model.num_experts} experts per layer do not fit the store's int16 expert ids "
                              f"(at most {MAX_EXPERTS})")
    if model.top_k > model.num_experts:
        raise TraceStoreError(f"top-k {model.top_k} exceeds the {model.num_experts} experts per layer")
