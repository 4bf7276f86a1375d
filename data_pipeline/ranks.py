"""Who this process is in a ``torchrun`` job, and the few collectives a distributed collection needs.

``torchrun --nproc-per-node N -m data_pipeline.collect ...`` (or several nodes through torchrun's
rendezvous) starts N processes with ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set. :func:`from_env`
joins them into one gloo process group: collection exchanges only small Python objects (plans,
descriptions of staged shards), never tensors, so gloo serves CPU and GPU ranks alike and NCCL is
not needed. Without those variables (a plain ``python -m``) it returns a single rank and imports
nothing from torch.distributed.

A collective that fails because another rank died becomes one :class:`UserError` line
("rerun to resume"), not a gloo traceback. When rank 0 refuses the job (bad input, a store busy),
:meth:`Ranks.agree` lets the other ranks exit with the same code without printing: the user reads
one ``error:`` line, rank 0's.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from core.errors import EXIT_BAD_INPUT, UserError, one_line

T = TypeVar("T")
TIMEOUT = datetime.timedelta(hours=1)  # a rank may load a large model long after another finished


def _dist() -> Any:
    """``torch.distributed``, imported only by a job of several ranks."""
    import torch.distributed as dist  # torch: ~1 s to import; a single-rank collection never loads it

    return dist


@dataclass
class Ranks:
    """This process's rank among ``world`` (``local_rank``: its index on this node, its GPU)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    _initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """``cuda`` / ``auto`` become this rank's own GPU when there are several ranks: ``cuda:<local_rank>``,
        wrapping round when a node runs more ranks than it has GPUs (small models can share one)."""
        if self.world == 1 or device not in ("cuda", "auto"):
            return device
        import torch  # torch: ~1 s to import; a single rank never gets here

        if not torch.cuda.is_available():
            return "cpu" if device == "auto" else device  # "cuda" without a GPU: load_model says so, in one line
        return f"cuda:{self.local_rank % torch.cuda.device_count()}"

    # ----------------------------------------------------------------- collectives
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except (RuntimeError, OSError) as e:  # gloo reports a dead peer as a RuntimeError (DistBackendError)
            raise UserError(f"rank {self.rank}/{self.world}: lost contact with another rank during {what} "
                            f"({one_line(str(e))[:200]}); everything adopted so far is kept: rerun to resume") from None

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == 0 else None]
        self._call("a broadcast", lambda: _dist().broadcast_object_list(box, src=0))
        return box[0]

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.rank == 0 else None
        self._call("a gather", lambda: _dist().gather_object(obj, out, dst=0))
        return out

    def barrier(self) -> None:
        if self.world > 1:
            self._call("a barrier", _dist().barrier)

    def agree(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs ``fn`` (the others do not) and every rank gets its result, or its failure.

        When ``fn`` raises on rank 0 the error surfaces there; the other ranks exit with the
        same code and print nothing, so the job says one ``error:`` line.
        """
        if self.world == 1:
            return fn()
        if self.rank == 0:
            try:
                result = fn()
            except BaseException as e:
                code = EXIT_BAD_INPUT if isinstance(e, (UserError, OSError)) else 1
                self.broadcast(("failed", code))
                raise
            return self.broadcast(("ok", result))[1]
        status, payload = self.broadcast(None)
        if status == "failed":
            raise SystemExit(payload)
        return payload

    def close(self) -> None:
        if self._initialized:
            _dist().destroy_process_group()
            self._initialized = False


def from_env() -> Ranks:
    """The ranks of this ``torchrun`` job (one gloo group), or a single rank outside torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    try:
        _dist().init_process_group("gloo", timeout=TIMEOUT)
    except (RuntimeError, ValueError, OSError) as e:
        raise UserError(f"cannot join the torchrun job as rank {rank}/{world} ({one_line(str(e))[:200]})") from None
    return Ranks(rank=rank, world=world, local_rank=local, _initialized=True)
