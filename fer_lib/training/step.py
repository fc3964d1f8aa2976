"""One training step and one optimizer + LR-schedule builder, shared by train, continual and ssl.

    optimizer, scheduler = build_optimizer(model.parameters(), OptimSpec("sgd", lr=0.01),
                                           Schedule("cosine", total_steps=epochs * steps_per_epoch))
    step = AUGuidedStep(model, optimizer, scheduler, criterion=AUGuidedLoss(9.0), settings=StepSettings(amp=True))
    out = step(batch, where="epoch 1, step 3")       # None when a non-finite batch was skipped

A step is `compute_loss` (the one hook a method overrides, like pytorch-grad-cam's BaseCAM: the
AU-guided CE here, distillation in fer_lib.methods.continual, BYOL/ContraWarping in
fer_lib.methods.ssl), then the shared part: the non-finite check (all DDP ranks agree), the
policy (`stop` raises NonFiniteLossError; `skip` restores the BatchNorm buffers, drops the
gradients and still advances the schedule), zero_grad, backward through the AMP GradScaler,
an optional gradient-norm clip, the optimizer step, the scaler update and the scheduler step.
"""
from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist

from fer_lib.models.wsol import cutmix_batch
from fer_lib.training.losses import AUGuidedLoss
from fer_lib.utils import UserError, check_choice

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("step", "cosine", "none")
NAN_POLICIES = ("stop", "skip")


class NonFiniteLossError(UserError, RuntimeError, FloatingPointError):
    """The loss became NaN/inf with nan_policy='stop' (train, continual and ssl alike)."""


# --------------------------------------------------------------------------- optimizer and schedule
@dataclass(frozen=True)
class OptimSpec:
    """Which optimizer: SGD (Nesterov when momentum > 0) or AdamW."""

    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass(frozen=True)
class Schedule:
    """The LR factor per optimizer step: linear warm-up over `warmup_steps`, then cosine to 0 at
    `total_steps`, steps of `gamma` every `step_every` steps, or constant ("none")."""

    kind: str = "cosine"
    total_steps: int = 1
    warmup_steps: int = 0
    step_every: int = 1
    gamma: float = 0.1

    def factor(self, step: int) -> float:
        warm = self.warmup_steps
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if self.kind == "cosine":
            progress = min(1.0, (step - warm) / max(1, self.total_steps - warm))
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "step":
            return self.gamma ** (step // self.step_every)
        return 1.0


def build_optimizer(params: Iterable[torch.nn.Parameter], spec: OptimSpec,
                    schedule: Schedule) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer over `params` and its per-step LR schedule (lr = spec.lr * schedule.factor(step))."""
    check_choice("optimizer", spec.optimizer, OPTIMIZERS)
    check_choice("schedule", schedule.kind, SCHEDULES)
    if spec.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay, nesterov=spec.momentum > 0)
    else:
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return optimizer, build_scheduler(optimizer, schedule)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `schedule` (stepped once per optimizer step)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)


def autocast(device: torch.device, enabled: bool):
    """fp16 autocast on CUDA when `enabled`; a no-op elsewhere (CPU runs stay fp32 and deterministic)."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


# --------------------------------------------------------------------------- the step
@dataclass
class StepSettings:
    """How a step treats its loss: AMP autocast (CUDA only), the non-finite policy, an optional
    gradient-norm clip, whether DDP ranks must agree on skipping, and the advice of the error."""

    amp: bool = False
    nan_policy: str = "stop"  # stop | skip
    clip_grad_norm: float | None = None
    distributed: bool = False
    advice: str = "lower lr or disable amp"

    def __post_init__(self) -> None:
        check_choice("nan_policy", self.nan_policy, NAN_POLICIES)


class TrainStep:
    """One optimisation step around `compute_loss` (override it; it returns (loss, outputs))."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None,
                 scaler: torch.amp.GradScaler | None = None, settings: StepSettings | None = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
        self.settings = settings or StepSettings()

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, Any]:
        """The hook: forward pass and loss of one batch -> (scalar loss, whatever the caller logs)."""
        raise NotImplementedError

    def describe(self, outputs: Any) -> str:
        """The loss's parts, for the message of a non-finite loss."""
        return ""

    def __call__(self, batch: Any, where: str = "") -> Any | None:
        """Run one step; returns compute_loss's outputs, or None when the batch was skipped."""
        skip = self.settings.nan_policy == "skip"
        # BatchNorm statistics move during the forward pass: keep them to undo a skipped batch
        backup = [b.detach().clone() for b in self.model.buffers()] if skip else None
        loss, outputs = self.compute_loss(batch)
        if not self.all_finite(loss):
            if not skip:
                details = self.describe(outputs)
                raise NonFiniteLossError(f"non-finite loss at {where}{f' ({details})' if details else ''}; "
                                         f"{self.settings.advice}")
            self.skip_batch(backup or [])
            return None
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.settings.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.settings.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scheduler is not None:
            self.scheduler.step()
        return outputs

    def all_finite(self, loss: torch.Tensor) -> bool:
        """True when the loss is finite on every rank (ranks skip or stop together)."""
        finite = torch.isfinite(loss.detach()).float()
        if self.settings.distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return finite.item() >= 1

    def skip_batch(self, backup: list[torch.Tensor]) -> None:
        """Drop the batch: no gradient, the buffers as before its forward pass, the schedule advanced."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, saved in zip(self.model.buffers(), backup):
                b.copy_(saved)
        if self.scheduler is not None:
            with warnings.catch_warnings():  # the schedule advances even though no step was taken
                warnings.simplefilter("ignore", UserWarning)
                self.scheduler.step()


class AUGuidedStep(TrainStep):
    """The core method's step: CE + lambda * AU alignment (fer_lib.training.losses.AUGuidedLoss).

    A batch is (images, labels, au_maps, has_landmarks) on the model's device; outputs are
    (logits, tapped features, LossParts).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any = None, *,
                 criterion: AUGuidedLoss, scaler: torch.amp.GradScaler | None = None,
                 settings: StepSettings | None = None) -> None:
        super().__init__(model, optimizer, scheduler, scaler, settings)
        self.criterion = criterion

    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, Any]:
        images, labels, au_maps, has_lm = batch
        net = getattr(getattr(self.model, "module", self.model), "net", None)
        mixing = getattr(net, "mixing", None) if self.model.training else None
        mixed = None
        if mixing is not None and float(torch.rand(())) < mixing[1]:  # CutMix (fer_lib.models.wsol)
            images, au_maps, has_lm, perm, lam = cutmix_batch(images, au_maps, has_lm, alpha=mixing[0])
            mixed = (perm, lam)
        with autocast(self.device(), self.settings.amp):
            logits, feats = self.model(images)
        loss, parts = self.criterion(logits, feats, labels, au_maps, has_lm)
        if mixed is not None:  # labels mixed by area; the AU term is the same in both
            perm, lam = mixed
            loss = lam * loss + (1.0 - lam) * self.criterion(logits, feats, labels[perm], au_maps, has_lm)[0]
        aux = net.aux_loss(labels) if hasattr(net, "aux_loss") else None  # a method's second objective (ACoL)
        if aux is not None:
            loss = loss + aux
        return loss, (logits, feats, parts)

    def describe(self, outputs: Any) -> str:
        parts = outputs[2]
        return f"total={parts.total}, ce={parts.ce}, au={parts.au}"


__all__ = ["NonFiniteLossError", "OptimSpec", "Schedule", "build_optimizer", "build_scheduler", "autocast",
           "StepSettings", "TrainStep", "AUGuidedStep", "OPTIMIZERS", "SCHEDULES", "NAN_POLICIES"]
