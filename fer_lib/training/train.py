"""AU-guided training: a plain loop, readable top to bottom, for any timm backbone.

    config = TrainConfig(dataset="synthetic", backbone="resnet18", au_weight=9.0, out_dir="runs/r18")
    results = train(config)        # or: python -m fer_lib.training.train --backbone resnet18 --au-weight 9
                                   # or: torchrun --nproc_per_node 2 -m fer_lib.training.train ...

What one run does (only rank 0 writes files):
1. validates the config (bad values fail at once, listing the choices), takes a lock on
   `out_dir` (a second run on the same folder is refused; a stale lock of a dead process is
   taken over), refuses a folder that holds a run with another config;
2. builds the datasets (fer_lib.data.build_datasets) and the tapped model (fer_lib.models);
3. resumes from `checkpoints/last.pt` if this run was interrupted (model, optimizer,
   scheduler, AMP scaler, epoch, RNG states); every epoch re-seeds from (seed, epoch) so a
   resumed run ends with the same metrics as an uninterrupted one;
4. per epoch: trains with CE + lambda * AU alignment (fer_lib.training.losses), evaluates val
   (accuracy, macro-F1, per-class accuracy, confusion, ATT-COS per tapped layer), writes
   `metrics.csv` / `history.json` and the `last` / `best` (by val accuracy; last epoch when
   there is no val split) checkpoints, all atomically;
5. reloads the best checkpoint, evaluates val and test and writes `metrics.json`.

On CUDA it uses AMP (fp16 + GradScaler) and channels_last; on CPU it is deterministic for a
given seed. Under torchrun (RANK / WORLD_SIZE set) it runs DistributedDataParallel with NCCL
on GPU or gloo on CPU; resuming under DDP expects `out_dir` on a filesystem all ranks see.
A non-finite loss stops the run (nan_policy="stop"; the last good checkpoint is kept) or
skips the batch on every rank (nan_policy="skip").
"""
from __future__ import annotations

import argparse
import errno
import dataclasses
import json
import math
import os
import random
import shutil
import socket
import sys
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from fer_lib.training.losses import ATTENTIONS, AU_LOSSES, AU_RESIZES, AUGuidedLoss, valid_map_mask
from fer_lib.metrics import classification_metrics, map_cosine, protocol_note
from fer_lib.models.checkpoints import load_file, plain_rng_state, restore_rng_state, to_plain
from fer_lib.models import (TappedModel, build_model, check_image_size, check_pretrained, layer_attention,
                     pretrained_normalisation, resolve_layers)
from fer_lib.utils import (ConfigError, UserError, atomic_path, atomic_write_csv, atomic_write_json,
                    check_choice, run_cli, run_info, seed_everything)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "none")
DEVICES = ("auto", "cpu", "cuda")
LANDMARK_MODES = ("detect", "ground_truth", "none")
NAN_POLICIES = ("stop", "skip")
#: config fields that do not change results: a run restarted with other values still resumes
_IDENTITY_IGNORED = ("out_dir", "num_workers", "trust_checkpoint")


class RunLockedError(UserError, RuntimeError):
    """Another live process is training into the same out_dir."""


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN/inf with nan_policy='stop'."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; validated at construction."""

    dataset: str = "synthetic"
    data_root: str | None = None
    dataset_kwargs: dict = field(default_factory=dict)  # passed to fer_lib.data.build_datasets
    landmarks: str = "detect"  # detect | ground_truth | none
    augment: bool = True
    cache_dir: str | None = None
    backbone: str = "resnet18"
    layers: tuple = ("last",)  # stage numbers (1-based), negative indices, "last" or module names
    pretrained: bool | str = False  # "imagenet" (offline for tf_efficientnet_lite0/1/2), or True with weights=
    weights: str | None = None  # local weights file for pretrained=True (never downloaded)
    output_stride: int | None = None  # 8 / 16: dilate the last stages (timm) for finer tapped maps
    au_weight: float = 9.0  # lambda; 0 = CE-only baseline
    au_loss: str = "cosine"  # cosine | l1 | l2 | kl | std_cosine
    attention: str = "mean"  # mean | random_avg (the reference code's: a Bernoulli(attention_p) channel subset)
    attention_p: float = 1.0
    au_resize: str = "area"  # area | bilinear_clamp (the reference code's resize of the AU map to the layer)
    label_smoothing: float = 0.0
    epochs: int = 10
    image_size: int = 112
    batch_size: int = 32
    eval_batch_size: int | None = None  # default 2 * batch_size
    lr: float = 0.01
    optimizer: str = "sgd"  # sgd | adamw
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # step | cosine | none
    step_size: int | None = None  # epochs between decays for schedule="step" (default epochs // 3)
    step_gamma: float = 0.1  # the factor of each step decay
    warmup: float = 0.0  # epochs of linear warm-up
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    num_workers: int = 0
    max_steps_per_epoch: int | None = None  # for smoke tests
    nan_policy: str = "stop"  # stop | skip
    trust_checkpoint: bool = False  # unpickle weights / resume files that are not plain data (files you made)
    out_dir: str = "runs/train"

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("device", self.device, DEVICES)
        check_choice("landmarks", self.landmarks, LANDMARK_MODES)
        check_choice("au_loss", self.au_loss, AU_LOSSES)
        check_choice("attention", self.attention, ATTENTIONS)
        check_choice("au_resize", self.au_resize, AU_RESIZES)
        if not isinstance(self.attention_p, (int, float)) or not 0.0 < float(self.attention_p) <= 1.0:
            raise ConfigError(f"attention_p must be in (0, 1], got {self.attention_p!r}")
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        for name in ("epochs", "image_size", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("eval_batch_size", "max_steps_per_epoch", "step_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if not isinstance(self.step_gamma, (int, float)) or not 0.0 < float(self.step_gamma) <= 1.0:
            raise ConfigError(f"step_gamma must be in (0, 1], got {self.step_gamma!r}")
        for name in ("lr", "momentum", "weight_decay", "warmup", "au_weight"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.lr == 0:
            raise ConfigError("lr must be > 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if not isinstance(self.dataset_kwargs, dict):
            raise ConfigError(f"dataset_kwargs must be a dict, got {type(self.dataset_kwargs).__name__}")
        if isinstance(self.layers, (str, int)):
            self.layers = (self.layers,)
        self.layers = tuple(self.layers)
        resolve_layers(self.backbone, self.layers)  # unknown backbone / layer -> ConfigError now
        check_image_size(self.backbone, self.image_size)  # last feature map >= 1x1, or ConfigError now
        self.pretrained = check_pretrained(self.pretrained, self.weights)
        if self.output_stride not in (None, 8, 16, 32):
            raise ConfigError(f"output_stride must be None, 8, 16 or 32, got {self.output_stride!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' but no CUDA GPU is available; use device='auto' or 'cpu'")
        names = _dataset_names()
        if names is not None:
            check_choice("dataset", self.dataset, names)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (layers as a list)."""
        d = dataclasses.asdict(self)
        d["layers"] = list(d["layers"])
        return d

    def identity(self) -> dict[str, Any]:
        """The fields that define the run (a restart with the same identity resumes)."""
        plain = json.loads(json.dumps(self.to_dict(), default=str))  # tuples -> lists, as in config.json
        return {k: v for k, v in plain.items() if k not in _IDENTITY_IGNORED}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "TrainConfig":
        """A TrainConfig from a notebook's parameters (papermill), in one call.

        Fields are taken by name, as notebooks spell them: numbers converted to the field's type,
        `layers="a,b"` split into a tuple, `weights=""` meaning none (and `pretrained` = bool(weights)
        unless given); `n_per_class` and `spurious_p` become the synthetic set's dataset_kwargs (unless
        dataset_kwargs is given). The known notebook-only parameters `output_dir`, `preset` and
        `num_examples` are ignored; any other name that is not a field is an error (a typo).
        """
        notebook_only, dataset_keys = {"output_dir", "preset", "num_examples"}, ("n_per_class", "spurious_p")
        fields = {f.name: str(f.type) for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - set(fields) - notebook_only - set(dataset_keys))
        if unknown:
            raise ConfigError(f"unknown parameter(s) {', '.join(unknown)}: not TrainConfig fields ({', '.join(fields)}) "
                              f"nor notebook parameters ({', '.join(sorted(notebook_only.union(dataset_keys)))})")
        kwargs: dict[str, Any] = {}
        for name, value in ((k, v) for k, v in params.items() if k in fields):
            kind = fields[name].replace(" | None", "")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind == "float" and numeric:
                value = float(value)
            elif kind == "int" and numeric and float(value) == int(float(value)):
                value = int(float(value))
            kwargs[name] = value
        if isinstance(kwargs.get("layers"), str):
            kwargs["layers"] = tuple(s.strip() for s in kwargs["layers"].split(","))
        if "weights" in kwargs:
            kwargs["weights"] = kwargs["weights"] or None
            kwargs.setdefault("pretrained", bool(kwargs["weights"]))
        if "dataset_kwargs" not in kwargs:
            synthetic = kwargs.get("dataset", cls.dataset) == "synthetic"
            kwargs["dataset_kwargs"] = {k: (float(params[k]) if k == "spurious_p" else params[k])
                                        for k in dataset_keys if k in params and synthetic}
        return cls(**kwargs)


def _dataset_names() -> Sequence[str] | None:
    try:
        from fer_lib import data as data_mod
    except ImportError:
        return None
    for attr in ("DATASETS", "DATASET_NAMES"):
        names = getattr(data_mod, attr, None)
        if names:
            return list(names)
    return None


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


def _resolve_device(config: TrainConfig, local_rank: int) -> torch.device:
    use_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(config: TrainConfig) -> DistContext:
    """Join the torchrun process group when RANK/WORLD_SIZE are set (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(config, local_rank if world > 1 else 0)
    if world <= 1:
        return DistContext(device=device)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=device, owns_group=owns)


def _broadcast_object(ctx: DistContext, obj: Any) -> Any:
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _all_reduce_sum(ctx: DistContext, values: Sequence[float]) -> list[float]:
    if not ctx.distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def _barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


# --------------------------------------------------------------------------- run folder
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(out_dir: Path) -> Iterator[Path]:
    """Exclusive lock file in out_dir; refuses a live holder, takes over a dead one's lock."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = out_dir / ".lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if isinstance(pid, int) and host == me["host"] and not _pid_alive(pid):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            if not holder:  # being written right now, or empty: give it a moment
                time.sleep(0.2)
                try:
                    holder = json.loads(lock.read_text() or "{}")
                except (OSError, ValueError):
                    holder = {}
                if not holder:
                    lock.unlink(missing_ok=True)
                    continue
            raise RunLockedError(
                f"{out_dir} is in use by another run (pid {pid} on {host}); wait for it or choose another "
                f"out_dir (delete {lock} only if that process is really gone)") from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:
        raise RunLockedError(f"could not take the lock {lock}")
    try:
        yield lock
    finally:
        try:
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
        except (OSError, ValueError):
            pass


def _check_run_identity(out_dir: Path, config: TrainConfig) -> None:
    """Refuse an out_dir holding a run with another config; record ours in config.json."""
    path = out_dir / "config.json"
    ours = config.identity()
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except ValueError as exc:
            raise ConfigError(f"{path} is unreadable ({exc}); choose another out_dir") from exc
        theirs = {k: v for k, v in theirs.items() if k not in _IDENTITY_IGNORED}
        if theirs != ours:
            diffs = [f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in sorted(set(theirs) | set(ours))
                     if theirs.get(k) != ours.get(k)]
            raise ConfigError(
                f"{out_dir} holds a run with a different config ({'; '.join(diffs)}); a run never overwrites "
                f"another run's results: choose another out_dir")
    else:
        atomic_write_json(path, config.to_dict())


# --------------------------------------------------------------------------- helpers
def _rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and lists (checkpoints stay plain data: fer_lib.models.checkpoints)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return plain_rng_state(state)


def _set_rng_state(state: dict[str, Any]) -> None:
    state = restore_rng_state(state)
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**31)


def _worker_init(worker_id: int) -> None:
    s = torch.initial_seed() % (2**32)
    np.random.seed(s)
    random.seed(s)


def _unwrap(model: torch.nn.Module) -> TappedModel:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    total = max(1, config.epochs * steps_per_epoch)
    warm = int(round(config.warmup * steps_per_epoch))
    step_every = (config.step_size or max(1, config.epochs // 3)) * steps_per_epoch

    def factor(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if config.schedule == "cosine":
            progress = min(1.0, (step - warm) / max(1, total - warm))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if config.schedule == "step":
            return config.step_gamma ** (step // step_every)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                               weight_decay=config.weight_decay, nesterov=config.momentum > 0)
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, scaler, epoch: int,
                     config: TrainConfig, metrics: dict[str, Any]) -> None:
    core = _unwrap(model)
    ckpt = {
        "model_state": {k: v.detach().cpu() for k, v in core.state_dict().items()},
        "model_config": core.config,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "rng_state": _rng_state(),
        "config": config.to_dict(),
        "run": run_info(config.to_dict()),
        "metrics": metrics,
    }
    with atomic_path(path) as tmp:  # the previous checkpoint stays intact if this write fails
        try:
            torch.save(to_plain(ckpt), tmp)  # plain data: loads with weights_only=True
        except RuntimeError as exc:
            raise checkpoint_write_error(path, exc) from exc


def checkpoint_write_error(path: Path, exc: RuntimeError) -> Exception:
    """torch's zip writer reports a failed write (a full disk) as a RuntimeError ('unexpected pos ...'):
    turn that into an OSError naming the checkpoint (ENOSPC when the disk has under 64 MB left)."""
    text = str(exc)
    if "unexpected pos" not in text and "PytorchStreamWriter" not in text and "write" not in text.lower():
        return exc
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if free is not None and free < 64 * 2**20:
        return OSError(errno.ENOSPC, f"No space left on device ({free // 1024} KiB free) while writing the "
                                     f"checkpoint", str(path))
    first = text.strip().splitlines()[-1] if text.strip() else type(exc).__name__
    return OSError(errno.EIO, f"writing the checkpoint failed ({first[:200]}); check the disk's free space and "
                              f"file size limits", str(path))


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, device: torch.device | str = "cpu",
             batch_size: int = 64, amp: bool = False, ctx: DistContext | None = None,
             desc: str = "eval", num_workers: int = 0, return_predictions: bool = False) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class accuracy, confusion, CE and ATT-COS per tapped layer on a dataset.

    ATT-COS = map_cosine(layer attention, AU map, at="image") averaged over samples with a
    valid AU map. Under DDP each rank evaluates a disjoint shard and the results are gathered.
    """
    ctx = ctx or DistContext(device=torch.device(device))
    core = _unwrap(model)
    device = torch.device(device)
    was_training = core.training
    core.eval()
    indices = list(range(ctx.rank, len(dataset), ctx.world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    preds, labels, ces, valids = [], [], [], []
    cos: list[list[np.ndarray]] = [[] for _ in core.tap_names]
    for images, y, au, has_lm in tqdm(loader, desc=desc, leave=False, disable=not ctx.is_main):
        images = images.to(device, non_blocking=True)
        if device.type == "cuda" and core.config.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        au = au.to(device)
        with _autocast(device, amp):
            logits, feats = core(images)
        ce = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
        valid = valid_map_mask(au, has_lm.to(device))
        for i, f in enumerate(feats):
            cos[i].append(map_cosine(layer_attention(f.float()), au, at="image").cpu().numpy())
        preds.append(logits.argmax(1).cpu().numpy())
        labels.append(y.cpu().numpy())
        ces.append(ce.cpu().numpy())
        valids.append(valid.cpu().numpy())
    core.train(was_training)
    local = {
        "idx": np.asarray(indices, np.int64),
        "pred": np.concatenate(preds) if preds else np.zeros(0, np.int64),
        "label": np.concatenate(labels) if labels else np.zeros(0, np.int64),
        "ce": np.concatenate(ces) if ces else np.zeros(0, np.float32),
        "valid": np.concatenate(valids) if valids else np.zeros(0, bool),
        "cos": [np.concatenate(c) if c else np.zeros(0, np.float32) for c in cos],
    }
    parts = [local]
    if ctx.distributed:
        parts = [None] * ctx.world_size  # type: ignore[list-item]
        dist.all_gather_object(parts, local)
    order = np.argsort(np.concatenate([p["idx"] for p in parts]), kind="stable")
    cat = {k: np.concatenate([p[k] for p in parts])[order] for k in ("pred", "label", "ce", "valid")}
    cat_cos = [np.concatenate([p["cos"][i] for p in parts])[order] for i in range(len(core.tap_names))]
    out = classification_metrics(cat["label"], cat["pred"], core.config["class_names"])
    out["ce"] = float(cat["ce"].mean()) if cat["ce"].size else float("nan")
    n_valid = int(cat["valid"].sum())
    out["att_cos"] = {name: (float(c[cat["valid"]].mean()) if n_valid else None)
                      for name, c in zip(core.tap_names, cat_cos)}
    vals = [v for v in out["att_cos"].values() if v is not None]
    out["att_cos_mean"] = float(np.mean(vals)) if vals else None
    out["n_valid_maps"] = n_valid
    if return_predictions:
        out["predictions"] = {"pred": cat["pred"].tolist(), "label": cat["label"].tolist(),
                              "valid": cat["valid"].tolist(),
                              "att_cos": {n: c.tolist() for n, c in zip(core.tap_names, cat_cos)}}
    return out


# --------------------------------------------------------------------------- training
def _train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, config: TrainConfig,
                     ctx: DistContext, epoch: int, use_amp: bool, tap_names: Sequence[str]) -> dict[str, Any]:
    model.train()
    sums = np.zeros(6)  # n, loss*n, ce*n, au*n, correct, skipped
    cos_sum = np.zeros(len(tap_names))
    cos_n = 0.0
    steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
    bar = tqdm(loader, total=steps, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not ctx.is_main)
    for step, (images, labels, au_maps, has_lm) in enumerate(bar):
        if step >= steps:
            break
        images = images.to(ctx.device, non_blocking=True)
        if ctx.device.type == "cuda" and config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(ctx.device, non_blocking=True)
        au_maps = au_maps.to(ctx.device, non_blocking=True)
        has_lm = has_lm.to(ctx.device, non_blocking=True)
        # BatchNorm statistics move during the forward pass: keep them to undo a skipped batch
        backup = [b.detach().clone() for b in model.buffers()] if config.nan_policy == "skip" else None
        with _autocast(ctx.device, use_amp):
            logits, feats = model(images)
        loss, parts = criterion(logits, feats, labels, au_maps, has_lm)
        finite = torch.isfinite(loss.detach()).float()
        if ctx.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if finite.item() < 1:
            if config.nan_policy == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss at epoch {epoch}, step {step + 1} (total={parts.total}, ce={parts.ce}, "
                    f"au={parts.au}); the last good checkpoint is kept in {Path(config.out_dir) / 'checkpoints'}; "
                    f"lower lr, disable amp, or use nan_policy='skip'")
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for b, saved in zip(model.buffers(), backup or []):
                    b.copy_(saved)
            sums[5] += 1
            with warnings.catch_warnings():  # the schedule advances even though no step was taken
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            continue
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        with torch.no_grad():
            n = labels.shape[0]
            sums[:5] += [n, parts.total * n, parts.ce * n, parts.au * n, float((logits.argmax(1) == labels).sum())]
            valid = valid_map_mask(au_maps, has_lm)
            if valid.any():
                for i, f in enumerate(feats):
                    cos_sum[i] += float(map_cosine(layer_attention(f.detach().float()[valid]), au_maps[valid]).sum())
                cos_n += float(valid.sum())
        if ctx.is_main:
            bar.set_postfix(loss=f"{parts.total:.3f}", ce=f"{parts.ce:.3f}", au=f"{parts.au:.3f}")
    bar.close()
    red = _all_reduce_sum(ctx, list(sums) + list(cos_sum) + [cos_n])
    n = max(red[0], 1.0)
    cos_tot, cos_cnt = red[6:6 + len(tap_names)], red[-1]
    att = {name: (c / cos_cnt if cos_cnt else None) for name, c in zip(tap_names, cos_tot)}
    vals = [v for v in att.values() if v is not None]
    return {"loss": red[1] / n, "ce": red[2] / n, "au": red[3] / n, "accuracy": red[4] / n,
            "skipped_batches": int(red[5] / ctx.world_size), "n": int(red[0]), "att_cos": att,
            "att_cos_mean": float(np.mean(vals)) if vals else None}


def _history_rows(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for h in history:
        for split in ("train", "val"):
            m = h.get(split)
            if not m:
                continue
            row = {"epoch": h["epoch"], "split": split, "lr": h["lr"], "time_s": h["time_s"],
                   "loss": m.get("loss"), "ce": m.get("ce"), "au": m.get("au"),
                   "accuracy": m.get("accuracy"), "macro_f1": m.get("macro_f1"),
                   "att_cos_mean": m.get("att_cos_mean"), "skipped_batches": m.get("skipped_batches")}
            for layer, v in (m.get("att_cos") or {}).items():
                row[f"att_cos/{layer}"] = v
            rows.append(row)
    return rows


def _write_history(out_dir: Path, history: list[dict[str, Any]]) -> None:
    import pandas as pd

    atomic_write_csv(out_dir / "metrics.csv", pd.DataFrame(_history_rows(history)))
    atomic_write_json(out_dir / "history.json", history)


def _build_datasets(config: TrainConfig, ctx: DistContext) -> dict[str, Dataset]:
    from fer_lib.data import build_datasets

    kwargs = dict(root=config.data_root, image_size=config.image_size, seed=config.seed,
                  landmarks=config.landmarks, cache_dir=config.cache_dir, augment=config.augment,
                  **config.dataset_kwargs)
    if config.pretrained == "imagenet":  # inputs normalised as the pretrained weights expect
        mean, std = pretrained_normalisation(config.backbone)
        kwargs.setdefault("mean", tuple(mean))
        kwargs.setdefault("std", tuple(std))
    if ctx.distributed and not ctx.is_main:
        _barrier(ctx)  # rank 0 builds (and caches) first
        return build_datasets(config.dataset, **kwargs)
    out = build_datasets(config.dataset, **kwargs)
    if ctx.distributed:
        _barrier(ctx)
    return out


def _data_summary(datasets: dict[str, Dataset], out_dir: Path, write: bool) -> dict[str, Any]:
    """Per split: images used and items left out; writes skipped_<split>.csv (path, reason) and
    landmarks_missing_<split>.csv (images kept without landmarks: CE only) into out_dir."""
    import pandas as pd

    splits: dict[str, Any] = {}
    unique: set[tuple[str, str]] = set()
    for split, ds in datasets.items():
        if ds is None:
            continue
        entry: dict[str, Any] = {"n": len(ds)}
        if hasattr(ds, "skipped"):
            skipped = [(str(p), str(r)) for p, r in (ds.skipped or [])]
            unique.update(skipped)
            entry["skipped"] = len(skipped)
            if write:
                atomic_write_csv(out_dir / f"skipped_{split}.csv", pd.DataFrame(skipped, columns=["path", "reason"]))
                entry["skipped_list"] = f"skipped_{split}.csv"
        records = getattr(ds, "records", None) or []
        missing = [(str(r.path), str(r.meta.get("landmark_reason", ""))) for r in records
                   if not getattr(r, "has_landmarks", True) and "landmark_reason" in getattr(r, "meta", {})]
        if records:
            entry["without_landmarks"] = sum(not getattr(r, "has_landmarks", True) for r in records)
        if missing and write:
            atomic_write_csv(out_dir / f"landmarks_missing_{split}.csv",
                             pd.DataFrame(missing, columns=["path", "reason"]))
            entry["landmarks_missing_list"] = f"landmarks_missing_{split}.csv"
        splits[split] = entry
    summary: dict[str, Any] = {"splits": splits, "skipped_total": len(unique)}
    stats = getattr(datasets.get("train"), "landmark_stats", None)
    if stats:
        summary["landmark_stats"] = dict(stats)
    return summary


def train(config: TrainConfig, datasets: dict[str, Dataset] | None = None) -> dict[str, Any]:
    """Train (or resume, or return the finished results of) the run described by `config`.

    `datasets` (keys "train" and optionally "val", "test") overrides fer_lib.data.build_datasets,
    e.g. for tests. Returns the content of metrics.json.
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train() needs a TrainConfig, got {type(config).__name__}")
    ctx = init_distributed(config)
    try:
        out_dir = Path(config.out_dir)
        error = None
        lock_cm = None
        if ctx.is_main:
            try:
                lock_cm = run_lock(out_dir)
                lock_cm.__enter__()
                _check_run_identity(out_dir, config)
            except Exception as exc:  # noqa: BLE001 - a full disk here too: the lock must be released
                if lock_cm is not None and not isinstance(exc, RunLockedError):
                    lock_cm.__exit__(None, None, None)
                    lock_cm = None
                error = exc
        error = _broadcast_object(ctx, error)
        if error is not None:
            raise error
        try:
            return _train(config, datasets, ctx, out_dir)
        finally:
            if lock_cm is not None:
                lock_cm.__exit__(None, None, None)
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, datasets: dict[str, Dataset] | None, ctx: DistContext, out_dir: Path) -> dict[str, Any]:
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        if ctx.is_main:
            print(f"[fer_lib.training.train] {out_dir} already holds the finished run; returning its metrics.json")
        return json.loads(metrics_path.read_text())
    ckpt_dir = out_dir / "checkpoints"
    if ctx.is_main:  # half-written temporaries of a run killed mid-write (we hold the lock: nobody else writes)
        for stale in list(ckpt_dir.glob(".*.tmp")) + list(out_dir.glob(".*.tmp")):
            stale.unlink(missing_ok=True)
    seed_everything(config.seed)
    if datasets is None:
        datasets = _build_datasets(config, ctx)
    if "train" not in datasets:
        raise ConfigError(f"datasets need a 'train' split, got {sorted(datasets)}")
    train_set = datasets["train"]
    if len(train_set) == 0:
        raise ConfigError("the train split is empty")
    data_summary = _data_summary(datasets, out_dir, write=ctx.is_main)
    class_names = list(getattr(train_set, "class_names", None) or [])
    if not class_names:
        from fer_lib.faces.au import EXPRESSIONS
        class_names = list(EXPRESSIONS)
    model = build_model(config.backbone, num_classes=len(class_names), layers=config.layers,
                        image_size=config.image_size, pretrained=config.pretrained, weights=config.weights,
                        class_names=class_names, mean=getattr(train_set, "mean", None),
                        std=getattr(train_set, "std", None), output_stride=config.output_stride,
                        trust=config.trust_checkpoint)
    use_cuda = ctx.device.type == "cuda"
    use_amp = bool(config.amp and use_cuda)
    model.config["channels_last"] = bool(config.channels_last and use_cuda)
    model.to(ctx.device)
    if model.config["channels_last"]:
        model.to(memory_format=torch.channels_last)
    criterion = AUGuidedLoss(config.au_weight, config.au_loss, config.label_smoothing, config.attention,
                             config.attention_p, config.au_resize)
    per_rank = math.ceil(len(train_set) / ctx.world_size)
    drop_last = per_rank > config.batch_size
    steps_per_epoch = per_rank // config.batch_size if drop_last else 1
    if config.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
    optimizer = _make_optimizer(model, config)
    scheduler = _make_scheduler(optimizer, config, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    start_epoch, history, best = 1, [], {"epoch": 0, "accuracy": -1.0}
    train_time, train_images = 0.0, 0
    last_path = ckpt_dir / "last.pt"
    if last_path.exists():
        ckpt = load_file(last_path, map_location=ctx.device, trust=config.trust_checkpoint)
        model.load_state_dict(ckpt["model_state"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng_state"])
        start_epoch = int(ckpt["epoch"]) + 1
        history = list(ckpt["metrics"]["history"])
        best = dict(ckpt["metrics"]["best"])
        train_time = float(ckpt["metrics"]["train_time_s"])
        train_images = int(ckpt["metrics"]["train_images"])
        if ctx.is_main:
            print(f"[fer_lib.training.train] resuming {out_dir} after epoch {ckpt['epoch']}")

    if ctx.distributed:
        ddp_kwargs = {"device_ids": [ctx.device.index]} if use_cuda else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    core = _unwrap(model)
    eval_bs = config.eval_batch_size or 2 * config.batch_size
    val_set = datasets.get("val")

    for epoch in range(start_epoch, config.epochs + 1):
        seed_everything(_epoch_seed(config.seed, epoch))
        gen = torch.Generator().manual_seed(_epoch_seed(config.seed, epoch))
        if ctx.distributed:
            sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                                          shuffle=True, seed=config.seed, drop_last=False)
            sampler.set_epoch(epoch)
        else:
            sampler = torch.utils.data.RandomSampler(train_set, generator=gen)
        loader = DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=drop_last,
                            num_workers=config.num_workers, pin_memory=use_cuda, generator=gen,
                            worker_init_fn=_worker_init if config.num_workers else None)
        t0 = time.perf_counter()
        train_m = _train_one_epoch(model, loader, criterion, optimizer, scheduler, scaler, config, ctx,
                                   epoch, use_amp, core.tap_names)
        if use_cuda:
            torch.cuda.synchronize()
        epoch_time = time.perf_counter() - t0
        train_time += epoch_time
        train_images += train_m["n"]
        val_m = evaluate(model, val_set, ctx.device, eval_bs, use_amp, ctx, desc=f"val {epoch}") if val_set else None
        record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "time_s": epoch_time,
                  "train": train_m, "val": val_m}
        history.append(record)
        score = val_m["accuracy"] if val_m else float(epoch)  # no val split: the last epoch is "best"
        improved = score > best["accuracy"]
        if improved:
            best = {"epoch": epoch, "accuracy": score}
        state = {"history": history, "best": best, "train_time_s": train_time, "train_images": train_images}
        if ctx.is_main:
            _write_history(out_dir, history)
            if improved:
                _save_checkpoint(ckpt_dir / "best.pt", model, optimizer, scheduler, scaler, epoch, config, state)
            _save_checkpoint(last_path, model, optimizer, scheduler, scaler, epoch, config, state)
            msg = f"epoch {epoch}: train loss {train_m['loss']:.4f} acc {train_m['accuracy']:.3f}"
            if val_m:
                msg += f" | val acc {val_m['accuracy']:.3f} f1 {val_m['macro_f1']:.3f} att_cos {val_m['att_cos_mean']}"
            print(f"[fer_lib.training.train] {msg}", flush=True)
        _barrier(ctx)

    # final evaluation with the best checkpoint
    best_ckpt = load_file(ckpt_dir / "best.pt", map_location=ctx.device, trust=config.trust_checkpoint)
    core.load_state_dict(best_ckpt["model_state"])
    results: dict[str, Any] = {"run": run_info(config.to_dict()), "config": config.to_dict(),
                               "best_epoch": int(best_ckpt["epoch"]),
                               "selection": "val accuracy" if val_set else "last epoch (no val split)"}
    for split in ("val", "test"):
        if datasets.get(split) is not None:
            m = evaluate(model, datasets[split], ctx.device, eval_bs, use_amp, ctx, desc=f"final {split}")
            results[split] = m
    results["train_time_s"] = train_time
    results["images_per_s"] = train_images / train_time if train_time > 0 else None
    results["world_size"] = ctx.world_size
    if ctx.distributed:  # DDP keeps replicas identical; record it so a divergence would show
        results["rank_param_checksums"] = _gather_checksums(core, ctx)
    results["device"] = str(ctx.device)
    results["protocol"] = protocol_note(config.dataset, "val" if val_set is not None else None)
    skipped = sum(h["train"].get("skipped_batches", 0) for h in history)
    results["skipped_batches"] = skipped
    results["data"] = data_summary
    if ctx.is_main:
        atomic_write_json(metrics_path, results)
    _barrier(ctx)
    return results


def param_checksum(model: torch.nn.Module) -> float:
    """Sum of all parameters in float64 plus their squares: equal replicas give equal checksums."""
    with torch.no_grad():
        return float(sum(p.double().sum() + (p.double() ** 2).sum() for p in model.parameters()))


def _gather_checksums(model: torch.nn.Module, ctx: DistContext) -> list[float]:
    local = param_checksum(model)
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, local)
    return [float(v) for v in out]


# --------------------------------------------------------------------------- command line
def _parse_layers(text: str) -> tuple:
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(int(part))
        except ValueError:
            out.append(part)
    return tuple(out)


def _parse_pretrained(text: str) -> bool | str:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no", "none"):
        return False
    return lowered


def build_parser() -> argparse.ArgumentParser:
    """argparse over every TrainConfig field (--au-weight 9, --layers 4,5, --dataset-kwargs '{...}')."""
    parser = argparse.ArgumentParser(prog="python -m fer_lib.training.train", description=__doc__.split("\n")[0])
    defaults = TrainConfig.__dataclass_fields__
    typed = {"epochs": int, "image_size": int, "batch_size": int, "eval_batch_size": int, "num_workers": int,
             "max_steps_per_epoch": int, "step_size": int, "seed": int, "au_weight": float, "lr": float,
             "momentum": float, "weight_decay": float, "warmup": float, "label_smoothing": float,
             "attention_p": float, "step_gamma": float}
    for name, f in defaults.items():
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if name == "pretrained":
            parser.add_argument(flag, nargs="?", const=True, default=default, type=_parse_pretrained,
                                help="'imagenet' (offline for tf_efficientnet_lite0/1/2), or alone with --weights PATH")
        elif name == "output_stride":
            parser.add_argument(flag, type=int, default=default, help="8 or 16 dilates the last stages")
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif name == "layers":
            parser.add_argument(flag, type=_parse_layers, default=default, help="comma-separated, e.g. 5 or 4,5 or last")
        elif name == "dataset_kwargs":
            parser.add_argument(flag, type=json.loads, default=default, help="JSON object for build_datasets")
        else:
            parser.add_argument(flag, type=typed.get(name, str), default=default)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: parse flags into a TrainConfig, train, print the test summary.

    The project's errors (configuration, dataset layout, labels, a locked run, a NaN loss) and
    OS errors (a full disk: the previous checkpoint is kept and the run lock released) print
    one line and exit 2; --debug adds the traceback.
    """
    parser = build_parser()
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = vars(parser.parse_args(argv))
    debug = args.pop("debug")

    def body() -> int:
        config = TrainConfig(**args)
        results = train(config)
        if int(os.environ.get("RANK", "0")) == 0:
            summary = {k: results.get(split, {}).get(k) for split in ("test",)
                       for k in ("accuracy", "macro_f1", "att_cos_mean")}
            print(json.dumps({"out_dir": config.out_dir, "best_epoch": results["best_epoch"], "test": summary}))
        return 0

    return run_cli(body, debug)


if __name__ == "__main__":
    sys.exit(main())
