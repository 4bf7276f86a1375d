"""The trace store: the contract between collection, training and evaluation (see DESIGN.md).

A store is a folder::

    manifest.json                  format version, model numbers, dataset, shard list + checksums
    shards/shard-00000.arrow       Arrow IPC files, one row per token, memory-mapped on read
    router_weights.safetensors     layer_<l> -> (E, H) router matrices (optional; needed by gating lookahead)

Rows of one sequence are contiguous, ordered by position, and never split across shards. A shard is
written under a ``.tmp`` name and renamed when complete, and the manifest is rewritten atomically
after every shard, so a run killed at any moment leaves only whole shards that read as whole, and a
resumed run skips exactly the sequences already stored.

Per-token columns:

- ``seq_id`` int64, ``position`` int32, ``token_id`` int32 (-1 for imported traces), ``phase`` int8
  (0 = prefill, 1 = decode)
- ``topk_ids`` fixed-size list of int16, L*K values in rank order (highest router weight first)
- ``topk_weights`` fixed-size list of float32, L*K values
- ``router_logits`` (optional) fixed-size list of float16, L*E values
- ``hidden_<l>`` (optional, per chosen layer) fixed-size list of float16, H values: the MoE input
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipeline.errors import UserError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
ROUTER_WEIGHTS_NAME = "router_weights.safetensors"
PREFILL, DECODE = 0, 1


class TraceStoreError(UserError):
    """A problem with a trace store, phrased as one line for the user (it names the file)."""


@dataclass
class ModelInfo:
    """The numbers of the model a store was collected from; everything downstream checks them."""

    model_id: str
    family: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int | None = None
    expert_bytes: int | None = None  # bytes of one expert in ``dtype``
    dtype: str | None = None
    revision: str | None = None
    moe_intermediate_size: int | None = None
    norm_topk_prob: bool | None = None
    layer_expert_bytes: list[int] | None = None  # per-layer sizes where they differ (imported traces)

    def key(self) -> dict[str, Any]:
        """The identity that decides whether two stores/checkpoints talk about the same model."""
        return {
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "hidden_size": self.hidden_size,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


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


def _fixed_list(values: np.ndarray, width: int, pa_type: pa.DataType) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values).reshape(-1), type=pa_type)
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST_NAME
    if not path.exists():
        raise TraceStoreError(f"trace store {path} does not exist")
    if not mpath.exists():
        raise TraceStoreError(f"{mpath} is missing: {path} is not a trace store")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise TraceStoreError(f"{mpath} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise TraceStoreError(
            f"{mpath} has format_version {manifest.get('format_version')!r}; this code reads {FORMAT_VERSION}"
        )
    for key in ("model", "shards"):
        if key not in manifest:
            raise TraceStoreError(f"{mpath} lacks the '{key}' entry")
    return manifest


class _Shard:
    """One memory-mapped Arrow IPC file."""

    def __init__(self, path: Path, expected_rows: int | None = None):
        self.path = path
        if not path.exists():
            raise TraceStoreError(f"shard {path} is missing")
        try:
            self._source = pa.memory_map(str(path), "r")
            self.table = pa.ipc.open_file(self._source).read_all()
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
            raise TraceStoreError(f"shard {path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
        if expected_rows is not None and self.table.num_rows != expected_rows:
            raise TraceStoreError(
                f"shard {path} holds {self.table.num_rows} rows but the manifest says {expected_rows}"
            )
        self.num_rows = self.table.num_rows
        self._cache: dict[str, np.ndarray] = {}

    def column(self, name: str) -> np.ndarray:
        """Zero-copy numpy view of a column (fixed-size lists come back flat, (rows, width))."""
        if name not in self._cache:
            col = self.table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                width = col.type.list_size
                arr = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            else:
                arr = col.to_numpy(zero_copy_only=False)
            self._cache[name] = arr
        return self._cache[name]


class TraceStore:
    """Read side of the store: iterate by sequence, random access by token, select layers."""

    def __init__(self, path: str | os.PathLike[str], *, verify_checksums: bool = False):
        self.path = Path(path)
        self.manifest = _read_manifest(self.path)
        self.model = ModelInfo.from_dict(self.manifest["model"])
        self.hidden_layers: list[int] = list(self.manifest.get("hidden_layers", []))
        self.has_router_logits: bool = bool(self.manifest.get("has_router_logits", False))
        self._shards: list[_Shard] = []
        for entry in self.manifest["shards"]:
            spath = self.path / entry["file"]
            if verify_checksums and spath.exists() and _sha256(spath) != entry.get("sha256"):
                raise TraceStoreError(f"shard {spath} does not match its checksum in the manifest")
            self._shards.append(_Shard(spath, entry.get("rows")))
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
            schema = shard.table.schema
            for name, width in want.items():
                if name not in schema.names:
                    raise TraceStoreError(f"shard {shard.path} lacks column '{name}'")
                t = schema.field(name).type
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
                starts = np.flatnonzero(np.concatenate([[True], sid[1:] != sid[:-1]]))
                stops = np.concatenate([starts[1:], [len(sid)]])
                self._bounds = np.stack([sid[starts], starts, stops], axis=1).astype(np.int64)
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
        from safetensors.numpy import load_file

        p = self.path / ROUTER_WEIGHTS_NAME
        if not p.exists():
            raise TraceStoreError(f"{p} is missing: the store has no router weights (imported trace?)")
        try:
            tensors = load_file(str(p))
        except Exception as e:  # safetensors raises several types for a bad header
            raise TraceStoreError(f"{p} is corrupt ({str(e).splitlines()[0]})") from None
        return {int(k.split("_")[1]): v for k, v in tensors.items() if k.startswith("layer_")}


def open_store(path: str | os.PathLike[str], *, verify_checksums: bool = False) -> TraceStore:
    return TraceStore(path, verify_checksums=verify_checksums)


class TraceStoreWriter:
    """Write side: whole sequences per shard, atomic shards, resumable.

    Opening an existing folder resumes it when it holds the same model (and the same choice of
    hidden layers / logits); any other content is refused before anything is touched.
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
    ):
        self.path = Path(path)
        self.model = model
        self.hidden_layers = sorted(int(x) for x in hidden_layers)
        self.store_router_logits = store_router_logits
        self._check_target()
        (self.path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        self._seen: set[int] = set()
        if (self.path / MANIFEST_NAME).exists():
            self.manifest = _read_manifest(self.path)
            self._recover()
        else:
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
            _write_json_atomic(self.path / MANIFEST_NAME, self.manifest)

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
        elif self.path.exists() and any(p.name != SHARD_DIR for p in self.path.iterdir()):
            raise TraceStoreError(f"{self.path} is not empty and is not a trace store; choose another --out")

    def _recover(self) -> None:
        """Drop half-written shards; adopt whole shards written before the manifest caught up."""
        shard_dir = self.path / SHARD_DIR
        for tmp in shard_dir.glob("*.tmp"):
            tmp.unlink()
        listed = {e["file"] for e in self.manifest["shards"]}
        for entry in self.manifest["shards"]:
            shard = _Shard(self.path / entry["file"], entry.get("rows"))
            self._seen.update(int(x) for x in np.unique(shard.column("seq_id")))
        for spath in sorted(shard_dir.glob("shard-*.arrow")):
            rel = f"{SHARD_DIR}/{spath.name}"
            if rel in listed:
                continue
            try:
                shard = _Shard(spath)
            except TraceStoreError:
                spath.unlink()  # never listed, so never read as whole: safe to drop
                continue
            self._register(spath, shard.column("seq_id"))
        self.manifest["complete"] = False
        _write_json_atomic(self.path / MANIFEST_NAME, self.manifest)

    @property
    def done_sequences(self) -> set[int]:
        return set(self._seen)

    def _register(self, spath: Path, seq_ids: np.ndarray) -> None:
        uniq = np.unique(seq_ids)
        self._seen.update(int(x) for x in uniq)
        self.manifest["shards"].append(
            {"file": f"{SHARD_DIR}/{spath.name}", "rows": int(len(seq_ids)), "sequences": int(len(uniq)),
             "sha256": _sha256(spath)}
        )
        self.manifest["num_tokens"] = int(sum(e["rows"] for e in self.manifest["shards"]))
        self.manifest["num_sequences"] = len(self._seen)
        _write_json_atomic(self.path / MANIFEST_NAME, self.manifest)

    def write_shard(
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
    ) -> Path:
        """Write rows of whole sequences as one new shard. Arrays are per token (N, ...)."""
        L, K, E = self.model.num_layers, self.model.top_k, self.model.num_experts
        n = len(seq_id)
        order = np.lexsort((position, seq_id))  # rows of a sequence contiguous and by position
        if np.any(np.isin(np.unique(seq_id), list(self._seen))):
            raise TraceStoreError(f"{self.path}: a sequence in this shard is already stored")
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
        index = len(self.manifest["shards"])
        while (self.path / SHARD_DIR / f"shard-{index:05d}.arrow").exists():
            index += 1
        final = self.path / SHARD_DIR / f"shard-{index:05d}.arrow"
        tmp = final.with_name(final.name + ".tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self._register(final, np.asarray(seq_id))
        return final

    def save_router_weights(self, weights: dict[int, np.ndarray]) -> None:
        from safetensors.numpy import save_file

        final = self.path / ROUTER_WEIGHTS_NAME
        tmp = final.with_name(final.name + ".tmp")
        save_file({f"layer_{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()}, str(tmp))
        os.replace(tmp, final)

    def update(self, **entries: Any) -> None:
        """Merge extra manifest entries (e.g. collection statistics) and persist atomically."""
        self.manifest.update(entries)
        _write_json_atomic(self.path / MANIFEST_NAME, self.manifest)

    def finalize(self) -> TraceStore:
        self.manifest["model"] = asdict(self.model)
        self.manifest["complete"] = True
        _write_json_atomic(self.path / MANIFEST_NAME, self.manifest)
        return TraceStore(self.path)
