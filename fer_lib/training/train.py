"""AU-guided training: a plain loop, readable top to bottom, for any timm backbone.

    config = TrainConfig(dataset="synthetic", backbone="resnet18", au_weight=9.0, out_dir="runs/r18")
    results = train(config)        # or: python -m fer_lib.training.train --backbone resnet18 --au-weight 9
                                   # or: torchrun --nproc_per_node 2 -m fer_lib.training.train ...

What one run does (only rank 0 writes files), in the order of this file:
1. config: validates the config (bad values fail at once, listing the choices), takes the run lock
   of `out_dir` (fer_lib.training.runs: a second run on the same folder is refused; the folder of
   a killed run is taken over), refuses a folder that holds a run with another config;
2. data: builds the datasets (fer_lib.data.build_datasets);
3. model: the tapped model (fer_lib.models), the loss (fer_lib.training.losses), the optimizer,
   schedule and step (fer_lib.training.step); resumes from `checkpoints/last.pt` if this run was
   interrupted (model, optimizer, scheduler, AMP scaler, epoch, RNG states);
4. loop: every epoch re-seeds from (seed, epoch) so a resumed run ends with the same metrics as
   an uninterrupted one; trains with CE + lambda * AU alignment, evaluates val (accuracy,
   macro-F1, per-class accuracy, confusion, ATT-COS per tapped layer), writes `metrics.csv` /
   `history.json` and the `last` / `best` (by val accuracy; last epoch when there is no val
   split) checkpoints, all atomically;
5. final evaluation: reloads the best checkpoint, evaluates val and test and writes `metrics.json`.

On CUDA it uses AMP (fp16 + GradScaler) and channels_last; on CPU it is deterministic for a
given seed. Under torchrun (RANK / WORLD_SIZE set) it runs DistributedDataParallel with NCCL
on GPU or gloo on CPU; resuming under DDP expects `out_dir` on a filesystem all ranks see.
A non-finite loss stops the run (nan_policy="stop"; the last good checkpoint is kept) or
skips the batch on every rank (nan_policy="skip").
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import shutil
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from fer_lib import data as data_mod
from fer_lib.faces.au import EXPRESSIONS, valid_map_mask
from fer_lib.metrics import (as_interval, bootstrap_interval, classification_intervals, classification_metrics,
                              map_cosine, protocol_note, write_metrics)
from fer_lib.models import (TappedModel, build_model, check_image_size, check_pretrained, layer_attention,
                            pretrained_normalisation, resolve_layers)
from fer_lib.models.checkpoints import load_file, to_plain
from fer_lib.training.losses import ATTENTIONS, AU_LOSSES, AU_RESIZES, AUGuidedLoss
from fer_lib.training.runs import (DistContext, RunLockedError, all_reduce_sum, barrier, broadcast_object,
                                   check_run_identity, epoch_seed, gather_checksums, init_distributed,
                                   param_checksum, rng_state, run_lock, set_rng_state, unwrap, worker_init)
from fer_lib.training.step import (NAN_POLICIES, OPTIMIZERS, SCHEDULES, AUGuidedStep, NonFiniteLossError, OptimSpec,
                                   Schedule, StepSettings, autocast, build_optimizer, build_scheduler)
from fer_lib.utils import (ConfigError, atomic_path, atomic_write_csv, atomic_write_json, check_choice, check_number,
                           portable_path, progress_bar, resolve_device, run_cli, run_info, seed_everything)

DEVICES = ("auto", "cpu", "cuda")
LANDMARK_MODES = ("detect", "ground_truth", "none")
#: config fields that do not change results: a run restarted with other values still resumes
_IDENTITY_IGNORED = ("out_dir", "num_workers", "trust_checkpoint")
_unwrap = unwrap  # the model inside DDP (name kept for callers of fer_lib.training.train)
__all__ = ["TrainConfig", "train", "evaluate", "main", "build_parser", "NonFiniteLossError", "RunLockedError",
           "DistContext", "init_distributed", "run_lock", "param_checksum", "checkpoint_write_error"]


# =========================================================================== 1. config
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
        check_number("attention_p", self.attention_p, above=0.0, maximum=1.0)
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)
        for name in ("epochs", "image_size", "batch_size"):
            check_number(name, getattr(self, name), integer=True, minimum=1)
        for name in ("eval_batch_size", "max_steps_per_epoch", "step_size"):
            if getattr(self, name) is not None:
                check_number(f"{name} (or None)", getattr(self, name), integer=True, minimum=1)
        check_number("num_workers", self.num_workers, integer=True, minimum=0)
        check_number("step_gamma", self.step_gamma, above=0.0, maximum=1.0)
        for name in ("lr", "momentum", "weight_decay", "warmup", "au_weight"):
            check_number(name, getattr(self, name), minimum=0)
        check_number("lr", self.lr, above=0)
        check_number("label_smoothing", self.label_smoothing, minimum=0.0)
        if self.label_smoothing >= 1.0:
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
        resolve_device(self.device)  # CUDA asked for without a GPU -> ConfigError now
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
        `layers="a,b"` split into a tuple, `weights=""` and `pretrained=""` meaning none (and `pretrained` = bool(weights)
        unless given); `n_per_class` and `spurious_p` become the synthetic set's dataset_kwargs (merged with
        `dataset_kwargs` where given, which wins). The known notebook-only parameters `output_dir`, `preset` and
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
        if kwargs.get("pretrained") == "":
            del kwargs["pretrained"]  # the notebooks' "no ImageNet weights"
        if isinstance(kwargs.get("layers"), str):
            kwargs["layers"] = tuple(s.strip() for s in kwargs["layers"].split(","))
        if "weights" in kwargs:
            kwargs["weights"] = kwargs["weights"] or None
            kwargs.setdefault("pretrained", bool(kwargs["weights"]))
        synthetic = kwargs.get("dataset", cls.dataset) == "synthetic"
        kwargs["dataset_kwargs"] = {**{k: (float(params[k]) if k == "spurious_p" else params[k])
                                       for k in dataset_keys if k in params and synthetic},
                                    **dict(kwargs.get("dataset_kwargs") or {})}
        return cls(**kwargs)


def _dataset_names() -> Sequence[str] | None:
    for attr in ("DATASETS", "DATASET_NAMES"):
        names = getattr(data_mod, attr, None)
        if names:
            return list(names)
    return None


def _optim_spec(config: TrainConfig) -> OptimSpec:
    return OptimSpec(config.optimizer, config.lr, config.momentum, config.weight_decay)


def _schedule(config: TrainConfig, steps_per_epoch: int) -> Schedule:
    """The LR schedule of `config` in optimizer steps (warm-up epochs rounded to whole steps)."""
    return Schedule(config.schedule, total_steps=max(1, config.epochs * steps_per_epoch),
                    warmup_steps=int(round(config.warmup * steps_per_epoch)),
                    step_every=(config.step_size or max(1, config.epochs // 3)) * steps_per_epoch,
                    gamma=config.step_gamma)


def _make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int):
    """The schedule of `config` on an existing optimizer (fer_lib.training.step.build_scheduler)."""
    return build_scheduler(optimizer, _schedule(config, steps_per_epoch))


def train(config: TrainConfig, datasets: dict[str, Dataset] | None = None) -> dict[str, Any]:
    """Train (or resume, or return the finished results of) the run described by `config`.

    `datasets` (keys "train" and optionally "val", "test") overrides fer_lib.data.build_datasets,
    e.g. for tests. Returns the content of metrics.json.
    """
    if not isinstance(config, TrainConfig):
        raise ConfigError(f"train() needs a TrainConfig, got {type(config).__name__}")
    ctx = init_distributed(config.device)
    try:
        out_dir = Path(config.out_dir)
        with ExitStack() as held:
            error = None
            if ctx.is_main:
                try:
                    held.enter_context(run_lock(out_dir))
                    check_run_identity(out_dir, config, _IDENTITY_IGNORED)
                except Exception as exc:  # noqa: BLE001 - a full disk here too: the lock is released
                    held.close()
                    error = exc
            error = broadcast_object(ctx, error)
            if error is not None:
                raise error
            return _train(config, datasets, ctx, out_dir)
    finally:
        if ctx.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(config: TrainConfig, datasets: dict[str, Dataset] | None, ctx: DistContext, out_dir: Path) -> dict[str, Any]:
    """config -> data -> model -> loop -> final evaluation."""
    metrics_path = out_dir / "metrics.json"
    if metrics_path.exists():
        if ctx.is_main:
            print(f"[fer_lib.training.train] {out_dir} already holds the finished run; returning its metrics.json")
        return json.loads(metrics_path.read_text())
    if ctx.is_main:  # half-written temporaries of a run killed mid-write (we hold the lock: nobody else writes)
        for stale in list((out_dir / "checkpoints").glob(".*.tmp")) + list(out_dir.glob(".*.tmp")):
            stale.unlink(missing_ok=True)
    seed_everything(config.seed)
    datasets, data_summary = _prepare_data(config, datasets, ctx, out_dir)
    run = _prepare_run(config, ctx, out_dir, datasets["train"])
    progress = _resume(run)
    if ctx.distributed:
        ddp_kwargs = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
        run.model = torch.nn.parallel.DistributedDataParallel(run.model, **ddp_kwargs)
        run.step.model = run.model
    for epoch in range(progress.next_epoch, config.epochs + 1):
        _run_epoch(run, datasets, epoch, progress)
    return _final_evaluation(run, datasets, progress, data_summary)


# =========================================================================== 2. data
def _prepare_data(config: TrainConfig, datasets: dict[str, Dataset] | None, ctx: DistContext,
                  out_dir: Path) -> tuple[dict[str, Dataset], dict[str, Any]]:
    """The datasets (built from the config unless given), checked, and their summary (data_summary)."""
    if datasets is None:
        datasets = _build_datasets(config, ctx)
    if "train" not in datasets:
        raise ConfigError(f"datasets need a 'train' split, got {sorted(datasets)}")
    if len(datasets["train"]) == 0:
        raise ConfigError("the train split is empty")
    return datasets, _data_summary(datasets, out_dir, write=ctx.is_main)


def _build_datasets(config: TrainConfig, ctx: DistContext) -> dict[str, Dataset]:
    kwargs = dict(root=config.data_root, image_size=config.image_size, seed=config.seed,
                  landmarks=config.landmarks, cache_dir=config.cache_dir, augment=config.augment,
                  **config.dataset_kwargs)
    if config.pretrained == "imagenet":  # inputs normalised as the pretrained weights expect
        mean, std = pretrained_normalisation(config.backbone)
        kwargs.setdefault("mean", tuple(mean))
        kwargs.setdefault("std", tuple(std))
    if ctx.distributed and not ctx.is_main:
        barrier(ctx)  # rank 0 builds (and caches) first
        return data_mod.build_datasets(config.dataset, **kwargs)
    out = data_mod.build_datasets(config.dataset, **kwargs)
    if ctx.distributed:
        barrier(ctx)
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
    ceiling = data_mod.dataset_ceiling(datasets.get("train"))
    if ceiling:
        summary["ceiling"] = ceiling
    return summary


# =========================================================================== 3. model, loss, optimizer, step
@dataclass
class _Run:
    """What the loop needs, built once (under torchrun `model` becomes the DDP wrapper)."""

    config: TrainConfig
    ctx: DistContext
    out_dir: Path
    model: torch.nn.Module
    step: AUGuidedStep
    drop_last: bool
    use_amp: bool

    @property
    def core(self) -> TappedModel:
        return unwrap(self.model)  # type: ignore[return-value]

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def eval_batch_size(self) -> int:
        return self.config.eval_batch_size or 2 * self.config.batch_size


@dataclass
class _Progress:
    """The loop's state, checkpointed each epoch (restored on resume)."""

    next_epoch: int = 1
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"epoch": 0, "accuracy": -1.0})
    train_time_s: float = 0.0
    train_images: int = 0

    def state(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best, "train_time_s": self.train_time_s,
                "train_images": self.train_images}


def _prepare_run(config: TrainConfig, ctx: DistContext, out_dir: Path, train_set: Dataset) -> _Run:
    """The tapped model on its device, the AU-guided loss, the optimizer + schedule and the step."""
    class_names = list(getattr(train_set, "class_names", None) or []) or list(EXPRESSIONS)
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
    optimizer, scheduler = build_optimizer(model.parameters(), _optim_spec(config), _schedule(config, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    settings = StepSettings(amp=use_amp, nan_policy=config.nan_policy, distributed=ctx.distributed,
                            advice=f"the last good checkpoint is kept in {Path(config.out_dir) / 'checkpoints'}; "
                                   f"lower lr, disable amp, or use nan_policy='skip'")
    step = AUGuidedStep(model, optimizer, scheduler, criterion=criterion, scaler=scaler, settings=settings)
    return _Run(config, ctx, out_dir, model, step, drop_last, use_amp)


def _resume(run: _Run) -> _Progress:
    """The progress of an interrupted run from checkpoints/last.pt (model, optimizer, RNG, ...), else a fresh one."""
    last_path = run.ckpt_dir / "last.pt"
    if not last_path.exists():
        return _Progress()
    ckpt = load_file(last_path, map_location=run.ctx.device, trust=run.config.trust_checkpoint)
    run.model.load_state_dict(ckpt["model_state"])
    run.step.optimizer.load_state_dict(ckpt["optimizer"])
    run.step.scheduler.load_state_dict(ckpt["scheduler"])
    run.step.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng_state"])
    m = ckpt["metrics"]
    progress = _Progress(int(ckpt["epoch"]) + 1, list(m["history"]), dict(m["best"]), float(m["train_time_s"]),
                         int(m["train_images"]))
    if run.ctx.is_main:
        print(f"[fer_lib.training.train] resuming {run.out_dir} after epoch {ckpt['epoch']}")
    return progress


# =========================================================================== 4. the loop
def _run_epoch(run: _Run, datasets: dict[str, Dataset], epoch: int, progress: _Progress) -> None:
    """Train one epoch, evaluate val, record history and checkpoints (rank 0)."""
    ctx = run.ctx
    loader = _epoch_loader(run, datasets["train"], epoch)
    t0 = time.perf_counter()
    train_m = _train_one_epoch(run, loader, epoch)
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    epoch_time = time.perf_counter() - t0
    progress.train_time_s += epoch_time
    progress.train_images += train_m["n"]
    val_set = datasets.get("val")
    val_m = evaluate(run.model, val_set, ctx.device, run.eval_batch_size, run.use_amp, ctx,
                     desc=f"val {epoch}") if val_set else None
    record = {"epoch": epoch, "lr": run.step.optimizer.param_groups[0]["lr"], "time_s": epoch_time,
              "train": train_m, "val": val_m}
    progress.history.append(record)
    score = val_m["accuracy"] if val_m else float(epoch)  # no val split: the last epoch is "best"
    improved = score > progress.best["accuracy"]
    if improved:
        progress.best = {"epoch": epoch, "accuracy": score}
    if ctx.is_main:
        _write_history(run.out_dir, progress.history)
        step = run.step
        if improved:
            _save_checkpoint(run.ckpt_dir / "best.pt", run.model, step.optimizer, step.scheduler, step.scaler, epoch,
                             run.config, progress.state())
        _save_checkpoint(run.ckpt_dir / "last.pt", run.model, step.optimizer, step.scheduler, step.scaler, epoch,
                         run.config, progress.state())
        msg = f"epoch {epoch}: train loss {train_m['loss']:.4f} acc {train_m['accuracy']:.3f}"
        if val_m:
            msg += f" | val acc {val_m['accuracy']:.3f} f1 {val_m['macro_f1']:.3f} att_cos {val_m['att_cos_mean']}"
        print(f"[fer_lib.training.train] {msg}", flush=True)
    barrier(ctx)


def _epoch_loader(run: _Run, train_set: Dataset, epoch: int) -> DataLoader:
    """The epoch's batches, re-seeded from (seed, epoch): a resumed run draws what an uninterrupted one would."""
    config, ctx = run.config, run.ctx
    seed_everything(epoch_seed(config.seed, epoch))
    gen = torch.Generator().manual_seed(epoch_seed(config.seed, epoch))
    if ctx.distributed:
        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                                      shuffle=True, seed=config.seed, drop_last=False)
        sampler.set_epoch(epoch)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, generator=gen)
    return DataLoader(train_set, batch_size=config.batch_size, sampler=sampler, drop_last=run.drop_last,
                      num_workers=config.num_workers, pin_memory=ctx.device.type == "cuda", generator=gen,
                      worker_init_fn=worker_init if config.num_workers else None)


def _train_one_epoch(run: _Run, loader: DataLoader, epoch: int) -> dict[str, Any]:
    """One pass of `run.step` over the loader; the epoch's train metrics (summed over ranks)."""
    config, ctx = run.config, run.ctx
    tap_names = run.core.tap_names
    run.model.train()
    sums = np.zeros(6)  # n, loss*n, ce*n, au*n, correct, skipped
    cos = np.zeros(len(tap_names) + 1)  # per layer: sum of ATT-COS over valid maps; last: their count
    steps = len(loader) if config.max_steps_per_epoch is None else min(len(loader), config.max_steps_per_epoch)
    bar = progress_bar(loader, total=steps, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=not ctx.is_main)
    for i, (images, labels, au_maps, has_lm) in enumerate(bar):
        if i >= steps:
            break
        images = images.to(ctx.device, non_blocking=True)
        if ctx.device.type == "cuda" and config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = labels.to(ctx.device, non_blocking=True)
        au_maps = au_maps.to(ctx.device, non_blocking=True)
        has_lm = has_lm.to(ctx.device, non_blocking=True)
        out = run.step((images, labels, au_maps, has_lm), where=f"epoch {epoch}, step {i + 1}")
        if out is None:  # a skipped non-finite batch (nan_policy="skip")
            sums[5] += 1
            continue
        _accumulate(sums, cos, out, labels, au_maps, has_lm)
        if ctx.is_main:
            parts = out[2]
            bar.set_postfix(loss=f"{parts.total:.3f}", ce=f"{parts.ce:.3f}", au=f"{parts.au:.3f}")
    bar.close()
    red = all_reduce_sum(ctx, list(sums) + list(cos))
    n = max(red[0], 1.0)
    cos_tot, cos_cnt = red[6:6 + len(tap_names)], red[-1]
    att = {name: (c / cos_cnt if cos_cnt else None) for name, c in zip(tap_names, cos_tot)}
    vals = [v for v in att.values() if v is not None]
    return {"loss": red[1] / n, "ce": red[2] / n, "au": red[3] / n, "accuracy": red[4] / n,
            "skipped_batches": int(red[5] / ctx.world_size), "n": int(red[0]), "att_cos": att,
            "att_cos_mean": float(np.mean(vals)) if vals else None}


@torch.no_grad()
def _accumulate(sums: np.ndarray, cos: np.ndarray, out: tuple, labels: torch.Tensor, au_maps: torch.Tensor,
                has_lm: torch.Tensor) -> None:
    """Add one batch to the epoch sums: n, loss, ce, au, correct; ATT-COS per layer over valid maps."""
    logits, feats, parts = out
    n = labels.shape[0]
    sums[:5] += [n, parts.total * n, parts.ce * n, parts.au * n, float((logits.argmax(1) == labels).sum())]
    valid = valid_map_mask(au_maps, has_lm)
    if valid.any():
        for i, f in enumerate(feats):
            cos[i] += float(map_cosine(layer_attention(f.detach().float()[valid]), au_maps[valid]).sum())
        cos[-1] += float(valid.sum())


# =========================================================================== 5. final evaluation
def _final_evaluation(run: _Run, datasets: dict[str, Dataset], progress: _Progress,
                      data_summary: dict[str, Any]) -> dict[str, Any]:
    """Reload the best checkpoint, evaluate val and test, write metrics.json (rank 0)."""
    config, ctx = run.config, run.ctx
    val_set = datasets.get("val")
    best_ckpt = load_file(run.ckpt_dir / "best.pt", map_location=ctx.device, trust=config.trust_checkpoint)
    run.core.load_state_dict(best_ckpt["model_state"])
    recorded = {**config.to_dict(), "out_dir": portable_path(config.out_dir)}   # "results/...", from any folder
    results: dict[str, Any] = {"run": run_info(recorded), "config": recorded,
                               "best_epoch": int(best_ckpt["epoch"]),
                               "selection": "val accuracy" if val_set else "last epoch (no val split)"}
    # the best epoch evaluated val with these very weights: its record is reused instead of a second pass
    best_val = next((h["val"] for h in progress.history if h["epoch"] == results["best_epoch"] and h.get("val")), None)
    for split in ("val", "test"):
        if split == "val" and best_val is not None:
            results["val"] = best_val
        elif datasets.get(split) is not None:
            results[split] = evaluate(run.model, datasets[split], ctx.device, run.eval_batch_size, run.use_amp, ctx,
                                      desc=f"final {split}")
    train_time = progress.train_time_s
    results["train_time_s"] = train_time
    results["images_per_s"] = progress.train_images / train_time if train_time > 0 else None
    results["world_size"] = ctx.world_size
    if ctx.distributed:  # DDP keeps replicas identical; record it so a divergence would show
        results["rank_param_checksums"] = gather_checksums(run.core, ctx)
    results["device"] = str(ctx.device)
    results["protocol"] = protocol_note(config.dataset, "val" if val_set is not None else None)
    results["skipped_batches"] = sum(h["train"].get("skipped_batches", 0) for h in progress.history)
    results["data"] = data_summary
    if ctx.is_main:
        write_metrics(run.out_dir, results, kind="training")
    barrier(ctx)
    return results


# =========================================================================== checkpoints and history
def _save_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, scaler, epoch: int,
                     config: TrainConfig, metrics: dict[str, Any]) -> None:
    core = unwrap(model)
    ckpt = {
        "model_state": {k: v.detach().cpu() for k, v in core.state_dict().items()},
        "model_config": core.config,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "rng_state": rng_state(),
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


# =========================================================================== evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: Dataset, device: torch.device | str = "cpu",
             batch_size: int = 64, amp: bool = False, ctx: DistContext | None = None,
             desc: str = "eval", num_workers: int = 0, return_predictions: bool = False) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class accuracy, confusion, CE and ATT-COS per tapped layer on a dataset.

    ATT-COS = map_cosine(layer attention, AU map, at="image") averaged over samples with a
    valid AU map. Under DDP each rank evaluates a disjoint shard and the results are gathered.
    95% intervals as [low, high] (None without samples): accuracy_ci (Wilson), macro_f1_ci and
    att_cos_ci (percentile bootstrap over samples, seed 0; fer_lib.metrics).
    """
    ctx = ctx or DistContext(device=torch.device(device))
    core = unwrap(model)
    device = torch.device(device)
    was_training = core.training
    core.eval()
    indices = list(range(ctx.rank, len(dataset), ctx.world_size))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers)
    preds, labels, ces, valids = [], [], [], []
    cos: list[list[np.ndarray]] = [[] for _ in core.tap_names]
    for images, y, au, has_lm in progress_bar(loader, desc=desc, leave=False, disable=not ctx.is_main):
        images = images.to(device, non_blocking=True)
        if device.type == "cuda" and core.config.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        y = y.to(device)
        au = au.to(device)
        with autocast(device, amp):
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
    out.update(classification_intervals(cat["label"], cat["pred"], len(core.config["class_names"])))
    # att_cos_mean = the mean over valid samples of each sample's mean over layers: bootstrap those samples
    per_sample = np.mean(np.stack(cat_cos), axis=0)[cat["valid"]] if n_valid and cat_cos else np.zeros(0)
    out["att_cos_ci"] = as_interval(bootstrap_interval(per_sample)) if per_sample.size else None
    if return_predictions:
        out["predictions"] = {"pred": cat["pred"].tolist(), "label": cat["label"].tolist(),
                              "valid": cat["valid"].tolist(),
                              "att_cos": {n: c.tolist() for n, c in zip(core.tap_names, cat_cos)}}
    return out


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
