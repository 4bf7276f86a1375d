"""Helpers for the "nothing lost, nothing silently wrong" tests: one-line CLI failures, store snapshots,
byte-level damage to shards, simulated full disks and read-only folders."""

from __future__ import annotations

import builtins
import errno
import io
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import safetensors.numpy
import safetensors.torch

from core.errors import run_cli
from data_pipeline.trace_store import TraceStore

_PROGRESS = re.compile(r"\d+%\|.*\| \d+/\d+ \[")


def cli_error(main: Callable[[list[str] | None], object], argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run a CLI's main through the shared runner; assert exit 2 and exactly one ``error:`` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    # progress bars (tqdm, erased on a terminal) are not messages
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip() and not _PROGRESS.search(line)]
    assert len(err) == 1, err
    assert err[0].startswith("error: ") and "Traceback" not in err[0], err[0]
    return err[0]


def snapshot(path: Path) -> dict[str, Any]:
    """Everything a reader gets from a store (checksums verified), for equality before/after."""
    store = TraceStore(path, verify_checksums=True)
    out: dict[str, Any] = {"model": store.model.__dict__.copy(), "bounds": store.sequence_bounds().tolist()}
    for name in ("seq_id", "position", "token_id", "phase", "topk_ids", "topk_weights"):
        out[name] = store.column(name).copy() if store.num_tokens else np.zeros(0)
    if store.has_router_logits and store.num_tokens:
        out["router_logits"] = store.router_logits().copy()
    for layer in store.hidden_layers:
        out[f"hidden_{layer}"] = store.hidden(layer).copy() if store.num_tokens else None
    return out


def assert_same(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"), k
        else:
            assert a[k] == b[k], k


def no_partial_files(folder: Path) -> None:
    left = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert not left, f"partial files left behind: {left}"


def buffer_offset(shard: Path, column: str) -> tuple[int, np.dtype]:
    """Byte offset inside the shard file of the first value of ``column`` (a fixed-size list or plain column)."""
    data = pa.py_buffer(shard.read_bytes())
    table = pa.ipc.open_file(data).read_all()
    arr = table.column(column).chunks[0]
    if pa.types.is_fixed_size_list(arr.type):
        arr = arr.values
    values = arr.buffers()[1]
    return values.address - data.address, np.dtype(arr.type.to_pandas_dtype())


def poke(shard: Path, column: str, index: int, value: int) -> None:
    """Overwrite value ``index`` of ``column`` in place: the file still parses, its content is wrong."""
    offset, dtype = buffer_offset(shard, column)
    raw = bytearray(shard.read_bytes())
    at = offset + index * dtype.itemsize
    raw[at:at + dtype.itemsize] = np.array([value], dtype=dtype).tobytes()
    shard.write_bytes(bytes(raw))


def disk_full_on_shard_write(monkeypatch: pytest.MonkeyPatch, written: int = 64) -> None:
    """The next Arrow shard write puts ``written`` bytes on disk, then fails as a full disk does."""
    def new_file(sink, schema, **kwargs):
        sink.write(b"\0" * written)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pa.ipc, "new_file", new_file)


def disk_full_on_save_file(monkeypatch: pytest.MonkeyPatch) -> None:
    """safetensors writes half a file, then fails as a full disk does (predictor files)."""
    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 32)
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Make ``root`` behave as a read-only folder for this process (chmod does not stop root, who runs CI).

    Every way this code base creates, changes or removes files is refused under ``root`` with EROFS;
    reads work.
    """
    root_s = str(Path(root).resolve())

    def inside(path: Any) -> bool:
        try:
            return str(Path(os.fsdecode(path)).resolve()).startswith(root_s)
        except (TypeError, ValueError):
            return False

    def refuse(path: Any) -> OSError:
        return OSError(errno.EROFS, "Read-only file system", os.fsdecode(path))

    real_open, real_os_open = builtins.open, os.open
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def open_(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and inside(file) and any(c in mode for c in "wax+"):
            raise refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if inside(path) and flags & writing:
            raise refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(real: Callable[..., Any], n_paths: int = 1) -> Callable[..., Any]:
        def wrapped(*args, **kwargs):
            for p in args[:n_paths]:
                if inside(p):
                    raise refuse(p)
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)  # pathlib's write_text/open go through io.open
    monkeypatch.setattr(os, "open", os_open)
    for name, n in (("mkdir", 1), ("makedirs", 1), ("unlink", 1), ("remove", 1), ("rmdir", 1), ("replace", 2),
                    ("rename", 2)):
        monkeypatch.setattr(os, name, guard(getattr(os, name), n))
    real_write_bytes = pa.OSFile

    def osfile(path, mode="r", *args, **kwargs):
        if "w" in mode and inside(path):
            raise refuse(path)
        return real_write_bytes(path, mode, *args, **kwargs)

    monkeypatch.setattr(pa, "OSFile", osfile)
    for module in (safetensors.numpy, safetensors.torch):  # they write from Rust, past the patches above
        real_save = module.save_file

        def save_file(tensors, filename, metadata=None, _real=real_save):
            if inside(filename):
                raise refuse(filename)
            return _real(tensors, filename, metadata=metadata)

        monkeypatch.setattr(module, "save_file", save_file)
