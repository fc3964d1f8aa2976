"""What makes a training run a run: its folder lock, its identity, its RNG state and its DDP ranks.

- `run_lock(out_dir)`: one process per out_dir (utils.file_lock, refusing mode); a second run is
  refused with RunLockedError naming the holder; the lock dies with its process, so the folder of a
  killed run is taken over by the next one; the lock file is removed on release.
- `check_run_identity(out_dir, config, ignored)`: an out_dir holding a run of another config is refused.
- `rng_state()` / `set_rng_state()`: every RNG as plain data (checkpoints), `epoch_seed` re-seeds each epoch.
- `DistContext` / `init_distributed()` and the collectives used by the loop (torchrun: RANK, WORLD_SIZE).
"""
from __future__ import annotations

import json
import os
import random
import socket
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from fer_lib.models.checkpoints import plain_rng_state, restore_rng_state
from fer_lib.utils import (ConfigError, LockHeld, UserError, atomic_write_json, file_lock, portable_path,
                           repo_relative, resolve_device)

LOCK_NAME = ".lock"


class RunLockedError(UserError, RuntimeError):
    """Another live process is training into the same out_dir."""


# --------------------------------------------------------------------------- run folder
@contextmanager
def run_lock(out_dir: Path) -> Iterator[Path]:
    """Exclusive lock of out_dir for this process; refuses a live holder, takes over a dead one's lock."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / LOCK_NAME
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
    for _ in range(3):
        with ExitStack() as held:
            try:
                held.enter_context(file_lock(lock, blocking=False, holder=me))
            except LockHeld as exc:
                raise RunLockedError(f"{out_dir} is in use by another run ({_holder_text(exc.holder)}); wait for it "
                                     f"or choose another out_dir") from None
            try:  # the file we locked may have been removed by its previous holder: then lock the new one
                ours = lock.read_text() == me
            except OSError:
                ours = False
            if not ours:
                continue
            try:
                yield lock
            finally:
                lock.unlink(missing_ok=True)
            return
    raise RunLockedError(f"could not take the lock {lock}")


def _holder_text(holder: str) -> str:
    try:
        info = json.loads(holder or "{}")
    except ValueError:
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "holder unknown"
    return f"pid {info.get('pid')} on {info.get('host')}"


def check_run_identity(out_dir: Path, config: Any, ignored: Sequence[str] = ()) -> None:
    """Refuse an out_dir holding a run with another config; record ours in config.json.

    `config` has `identity()` (the fields that define the run) and `to_dict()`; `ignored` are
    the fields that do not change results. Paths are recorded and compared relative to the
    repository root where they lie inside it (utils.repo_relative), so moving the checkout changes nothing."""
    path = Path(out_dir) / "config.json"
    ours = repo_relative(config.identity())
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path} is unreadable ({exc}); choose another out_dir") from exc
        theirs = {k: v for k, v in repo_relative(theirs).items() if k not in ignored}
        if theirs != ours:
            diffs = [f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
                     if theirs.get(k) != ours.get(k)]
            raise ConfigError(
                f"{out_dir} holds a run with a different config ({'; '.join(diffs)}); a run never overwrites "
                f"another run's results: choose another out_dir")
    else:
        record = config.to_dict()
        if "out_dir" in record:
            record["out_dir"] = portable_path(out_dir)
        atomic_write_json(path, repo_relative(record))


# --------------------------------------------------------------------------- random state
def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and lists (checkpoints stay plain data: fer_lib.models.checkpoints)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return plain_rng_state(state)


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states saved by `rng_state`."""
    state = restore_rng_state(state)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: a resumed run draws the same numbers as an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


def worker_init(worker_id: int) -> None:
    """DataLoader workers: numpy and python seeded from the worker's torch seed."""
    s = torch.initial_seed() % (2**32)
    np.random.seed(s)
    random.seed(s)


# --------------------------------------------------------------------------- distributed
@dataclass
class DistContext:
    """Rank information for this process (world_size 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of this rank: utils.resolve_device with the local rank as CUDA index (made current)."""
    dev = resolve_device(device, index=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return dev


def init_distributed(device: str = "auto") -> DistContext:
    """Join the torchrun process group when RANK/WORLD_SIZE are set (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = rank_device(device, local_rank if world > 1 else 0)
    if world <= 1:
        return DistContext(device=dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=dev, owns_group=owns)


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(ctx: DistContext, values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks (float64)."""
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def param_checksum(model: torch.nn.Module) -> float:
    """Sum of all parameters in float64 plus their squares: equal replicas give equal checksums."""
    with torch.no_grad():
        return float(sum(p.double().sum() + (p.double() ** 2).sum() for p in model.parameters()))


def gather_checksums(model: torch.nn.Module, ctx: DistContext) -> list[float]:
    """Every rank's `param_checksum` (DDP keeps replicas identical: a divergence would show)."""
    local = param_checksum(model)
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, local)
    return [float(v) for v in out]
