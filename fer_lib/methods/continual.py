"""Continual and few-shot learning of compound expressions on top of basic ones.

Reproduces the system of Maiden & Nakisa (2023), "Complex Facial Expression Recognition
Using Deep Knowledge Distillation of Basic Features", inside this toolkit, with the
baselines it should be compared against, all in one harness:

    protocol = make_protocol(EXPRESSIONS, RAFDB_COMPOUNDS[:6], increment=3)   # task 0 = basic
    config = ContinualConfig(new_classes=RAFDB_COMPOUNDS[:6], increment=3, methods=("finetune", "psmr"))
    data = load_continual_data(config)                 # synthetic compound set as tensors
    results = run_continual(config, data)              # per method, per task: old/new/overall accuracy
    summary_table(results); few_shot(results.base_model(), data, k_shots=(1, 5))

Class-incremental protocol: task 0 learns the basic classes; each later task adds new
(compound) classes; the classifier head grows (old rows kept) and, after each task, the
model is tested on every class seen so far (no task identity at test time).

Methods (`METHODS`; "+au" after a name adds the AU-alignment loss of fer_lib.training.losses with
`au_weight` in every task, base model included; neither paper has it):
  finetune   new-task data only, CE (lower bound)
  lwf        new-task data, CE + distillation of the previous model's old-class logits
  replay     new-task data + random class-balanced exemplars of old classes, CE
  replay_kd  replay + distillation: isolates PSMR's exemplar choice from its distillation
  psmr       Predictive Sorting Memory Replay + distillation (Maiden & Nakisa)
  joint      all training data of every class seen so far, CE (upper bound)

Our reading of Predictive Sorting Memory Replay (paper and its public code; the paper
calls the memory "representative memory"):
  * Right after a class is learned (task 0 for the basic classes, the task that adds a
    compound class for it), the model scores every training sample of that class by its
    output for the sample's own class, and the samples are SORTED by that score,
    highest first: the exemplars the model recognises most confidently, i.e. the most
    prototypical ones in the model's own view. Old classes are not re-scored later.
  * The memory keeps the top m of each class in that order. With a fixed total budget M
    (`memory_size`, the reference code's "limit" mode) m = M // (number of classes seen),
    so when classes are added each class's list is cut from its tail: the least
    confidently predicted exemplars are dropped first. The memory never exceeds M.
  * Replay: the new classes' training samples plus the memory are shuffled together.
    The ordering matters for selection and reduction, not for batch order (the reference
    code shuffles its whole training set too).
  * Score: the reference code sorts by the class's raw output (logit); `psmr_score="prob"`
    sorts by its softmax probability instead.
  * Distillation (both papers' "knowledge distillation of basic features"): KL between the
    teacher's and the student's temperature-softened distributions over the teacher's
    classes, times T^2 (Hinton et al.), added to CE with weight `kd_weight`. The teacher
    is the model before the current task (`teacher="previous"`, LwF/iCaRL) or, as in the
    reference code, always the basic model (`teacher="basic"`). The reference code mixes
    (1 - g) CE + g KD with a small decaying g and pads the teacher with zero logits for
    new classes; we keep the standard old-class form, which is exactly zero when the
    student equals the teacher. Optional feature distillation (`feature_kd_weight`):
    1 - cosine between student and teacher tapped features.

Few-shot (`few_shot`): N-way k-shot episodes over the new (compound) classes on top of the
basic model's frozen penultimate features: support from the train split, queries from the
test split (disjoint by construction, and checked), classified by nearest class mean
(prototypes, cosine) or a linear head fitted on the support; mean and 95% confidence
interval (Student t) over episodes. The reference code's "100% one-shot" is measured on a
test set holding only the one new class; our episodes discriminate between all new
classes (and, with `include_base=True`, the basic classes too), a harder protocol.

Metrics per task t: accuracy on old classes (tasks < t), new classes (task t), overall
(all seen), basic and compound classes, and the accuracy matrix a[t][j] on each task's
classes; per method: average incremental accuracy (mean overall accuracy over all steps,
task 0 included; Rebuffi et al. 2017) and forgetting (mean over tasks j < T of
max_{l<T} a[l][j] - a[T][j]; Chaudhry et al. 2018). Their spread over test faces
(`summary`): a 95% Wilson interval for each final accuracy (k of n test faces) and a 95%
bootstrap interval (test faces resampled within each task's classes, `n_boot` times) for
forgetting and average incremental accuracy: what another draw of test faces could give.

A base checkpoint fixes the model side: the image size (`image_size=None` takes the checkpoint's;
a different value is refused), the backbone (`backbone=None` takes it) and the normalisation the
faces get (the checkpoint's mean/std, e.g. 0.5/0.5 for tf_efficientnet_lite0), so a lite0 baseline
at 112 px from the main job is used as it was trained.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fer_lib.analysis.interpret import compute_cams
from fer_lib.data import build_datasets
from fer_lib.faces.au import EXPRESSIONS
from fer_lib.faces.compound import ALL_COMPOUNDS, COMPOUND_PARTS, RAFDB_COMPOUNDS, is_compound
from fer_lib.metrics import classification_metrics, map_cosine
from fer_lib.metrics import wilson_interval
from fer_lib.models import TappedModel, build_model, load_checkpoint, pretrained_normalisation, resolve_layers
from fer_lib.models.checkpoints import read_checkpoint
from fer_lib.plots import save_figure
from fer_lib.training.losses import AUGuidedLoss
from fer_lib.training.step import (OPTIMIZERS, AUGuidedStep, OptimSpec, Schedule, StepSettings, autocast,
                                   build_optimizer)
from fer_lib.training.train import evaluate
from fer_lib.utils import (ConfigError, check_choice, check_number, config_hash, progress_bar, resolve_device,
                           seed_everything)

#: method name -> (memory selection, distillation)
METHODS: dict[str, tuple[str, bool]] = {
    "finetune": ("none", False),
    "lwf": ("none", True),
    "replay": ("random", False),
    "replay_kd": ("random", True),
    "psmr": ("psmr", True),
    "joint": ("all", False),
}
AU_SUFFIX = "+au"
MEMORY_SELECTIONS = ("random", "psmr")
PSMR_SCORES = ("logit", "prob")
TEACHERS = ("previous", "basic")
DEVICES = ("auto", "cpu", "cuda")
FEW_SHOT_CLASSIFIERS = ("prototype", "linear")
#: the default incremental classes: six RAF-DB compound classes, two tasks of three
DEFAULT_NEW_CLASSES: tuple[str, ...] = ("happily_surprised", "sadly_angry", "fearfully_surprised",
                                        "happily_disgusted", "sadly_fearful", "angrily_disgusted")


# =========================================================================== protocol
@dataclass(frozen=True)
class ContinualProtocol:
    """A class-incremental protocol: task 0 (the basic classes), then tasks of new classes."""

    tasks: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("a protocol needs at least one task (task 0 = the basic classes)")
        flat = [c for task in self.tasks for c in task]
        if any(len(task) == 0 for task in self.tasks):
            raise ConfigError(f"every task needs at least one class, got {[list(t) for t in self.tasks]}")
        dup = sorted({c for c in flat if flat.count(c) > 1})
        if dup:
            raise ConfigError(f"classes {dup} appear in more than one task (or twice in one)")

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def class_order(self) -> tuple[str, ...]:
        """Every class in the order the model's outputs take them (task 0 first)."""
        return tuple(c for task in self.tasks for c in task)

    @property
    def base_classes(self) -> tuple[str, ...]:
        return self.tasks[0]

    def seen(self, t: int) -> tuple[str, ...]:
        """Classes of tasks 0..t."""
        return tuple(c for task in self.tasks[: t + 1] for c in task)

    def old(self, t: int) -> tuple[str, ...]:
        """Classes of tasks before t."""
        return self.seen(t - 1) if t > 0 else ()

    def new(self, t: int) -> tuple[str, ...]:
        return self.tasks[t]

    def task_of(self, name: str) -> int:
        """The task that introduces class `name`."""
        for t, task in enumerate(self.tasks):
            if name in task:
                return t
        raise ValueError(f"class {name!r} is in no task of this protocol; classes: {', '.join(self.class_order)}")

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": [list(t) for t in self.tasks], "class_order": list(self.class_order)}


def make_protocol(base_classes: Sequence[str] = EXPRESSIONS, new_classes: Sequence[str] = DEFAULT_NEW_CLASSES,
                  increment: int = 3, task_sizes: Sequence[int] | None = None,
                  order_seed: int | None = None) -> ContinualProtocol:
    """Task 0 = `base_classes`; then `new_classes` in tasks of `increment` (or explicit `task_sizes`).

    `order_seed` shuffles the new classes first (a reproducible random class order); None
    keeps the given order.
    """
    base = tuple(base_classes)
    new = list(new_classes)
    if order_seed is not None:
        new = [new[i] for i in np.random.default_rng(order_seed).permutation(len(new))]
    if task_sizes is not None:
        sizes = [int(s) for s in task_sizes]
        if any(s < 1 for s in sizes) or sum(sizes) != len(new):
            raise ConfigError(f"task_sizes {list(task_sizes)} must be positive and sum to the {len(new)} new classes")
    else:
        check_number("increment", increment, integer=True, minimum=1)
        sizes = [min(int(increment), len(new) - i) for i in range(0, len(new), int(increment))]
    tasks, start = [base], 0
    for s in sizes:
        tasks.append(tuple(new[start:start + s]))
        start += s
    return ContinualProtocol(tuple(tasks))


# =========================================================================== data as tensors
@dataclass
class TensorSplit:
    """One split held in memory: images, labels (ids into `class_names`), AU maps, landmark flags.

    Indexing returns the project's 4-tuple, so it works as a Dataset (e.g. fer_lib.training.train.evaluate).
    """

    images: torch.Tensor  # (N, 3, S, S) normalised
    labels: torch.Tensor  # (N,) long
    au_maps: torch.Tensor  # (N, 1, S, S)
    has_landmarks: torch.Tensor  # (N,) bool
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], self.au_maps[i], self.has_landmarks[i]

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> "TensorSplit":
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return TensorSplit(self.images[idx], self.labels[idx], self.au_maps[idx], self.has_landmarks[idx],
                           self.class_names)

    def relabel(self, class_order: Sequence[str]) -> "TensorSplit":
        """Keep the samples of classes in `class_order` and renumber labels by it."""
        order = tuple(class_order)
        missing = [c for c in order if c not in self.class_names]
        if missing:
            raise ConfigError(f"classes {missing} are not in the data (it has {', '.join(self.class_names)})")
        lut = torch.full((len(self.class_names),), -1, dtype=torch.long)
        for i, c in enumerate(self.class_names):
            if c in order:
                lut[i] = order.index(c)
        new = lut[self.labels]
        keep = torch.nonzero(new >= 0).flatten()
        out = self.subset(keep)
        out.labels = new[keep]
        out.class_names = order
        return out

    def indices_of(self, class_ids: Iterable[int]) -> np.ndarray:
        """Indices of the samples whose label is in `class_ids`."""
        ids = torch.as_tensor(list(class_ids), dtype=torch.long)
        return torch.nonzero(torch.isin(self.labels, ids)).flatten().numpy()


def tensor_split(dataset: Any, progress: bool = True, desc: str = "tensors") -> TensorSplit:
    """Load every item of a FERDataset (without augmentation) into a TensorSplit."""
    was = getattr(dataset, "augment", False)
    if hasattr(dataset, "augment"):
        dataset.augment = False
    try:
        items = [dataset[i] for i in progress_bar(range(len(dataset)), desc=desc, disable=not progress, leave=False)]
    finally:
        if hasattr(dataset, "augment"):
            dataset.augment = was
    if not items:
        raise ConfigError(f"dataset {dataset!r} is empty")
    images, labels, maps, has = zip(*items)
    return TensorSplit(torch.stack(images), torch.stack(labels).long(), torch.stack(maps), torch.stack(has).bool(),
                       tuple(dataset.class_names))


def merge_splits(parts: Sequence[TensorSplit]) -> TensorSplit:
    """Concatenate splits with different class lists (e.g. RAF-DB basic + RAF-DB compound) by class name."""
    names: list[str] = []
    for p in parts:
        names += [c for c in p.class_names if c not in names]
    labels = [torch.as_tensor([names.index(p.class_names[int(y)]) for y in p.labels], dtype=torch.long)
              for p in parts]
    return TensorSplit(torch.cat([p.images for p in parts]), torch.cat(labels), torch.cat([p.au_maps for p in parts]),
                       torch.cat([p.has_landmarks for p in parts]), tuple(names))


# =========================================================================== configuration
@dataclass
class ContinualConfig:
    """Everything a continual-learning comparison depends on; validated at construction."""

    # protocol
    base_classes: tuple = EXPRESSIONS
    new_classes: tuple = DEFAULT_NEW_CLASSES
    increment: int = 3
    task_sizes: tuple | None = None
    class_order_seed: int | None = None
    # methods
    methods: tuple = ("finetune", "lwf", "replay", "psmr", "joint")
    memory_size: int = 104  # total exemplars, all classes together (never exceeded)
    psmr_score: str = "logit"
    kd_weight: float = 1.0
    temperature: float = 2.0
    feature_kd_weight: float = 0.0
    teacher: str = "previous"
    au_weight: float = 1.0  # used by "+au" methods only
    au_loss: str = "cosine"
    new_class_samples: int | None = None  # training samples per new class (None = all): few-sample CL
    base_checkpoint: str | None = None  # a trained basic model (fer_lib checkpoint) as task 0 of CE-only methods
    base_checkpoint_au: str | None = None  # the same for "+au" methods (else trained here)
    # model and optimisation (backbone / image_size None: the base checkpoint's, else resnet18 / 64)
    backbone: str | None = None
    layers: tuple = ("last",)
    image_size: int | None = None
    epochs_base: int = 8
    epochs: int = 4  # per incremental task
    batch_size: int = 32
    lr_base: float = 0.02
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True  # random flip + shift of image and AU map together
    # data
    dataset: str = "synthetic"
    n_per_class: dict = field(default_factory=lambda: {"train": 60, "test": 20})
    landmarks: str = "ground_truth"
    data_root: str | None = None
    # run
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    n_boot: int = 1000  # bootstrap resamples of the test faces for the intervals of forgetting (0: none)

    def __post_init__(self) -> None:
        for name in ("base_checkpoint", "base_checkpoint_au"):
            path = getattr(self, name)
            if path in ("", None):
                setattr(self, name, None)
            elif not Path(path).is_file():
                raise ConfigError(f"{name} not found: {path}")
        self._adopt_checkpoint()
        for name in ("base_classes", "new_classes", "methods", "layers"):
            value = getattr(self, name)
            setattr(self, name, (value,) if isinstance(value, (str, int)) else tuple(value))
        if self.task_sizes is not None:
            self.task_sizes = tuple(int(s) for s in self.task_sizes)
        self.protocol()  # validates classes, increment and task sizes
        if not self.methods:
            raise ConfigError(f"methods is empty; choose among {', '.join(METHODS)} (optionally with '{AU_SUFFIX}')")
        for m in self.methods:
            base, au = split_method(m)
            if au and self.au_weight <= 0:
                raise ConfigError(f"method {m!r} needs au_weight > 0 (got {self.au_weight})")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods has duplicates: {list(self.methods)}")
        check_choice("psmr_score", self.psmr_score, PSMR_SCORES)
        check_choice("teacher", self.teacher, TEACHERS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("device", self.device, DEVICES)
        for name in ("epochs_base", "epochs", "batch_size", "image_size"):
            check_number(name, getattr(self, name), integer=True, minimum=1)
        check_number("memory_size", self.memory_size, integer=True, minimum=0)
        check_number("n_boot", self.n_boot, integer=True, minimum=0)
        for name in ("kd_weight", "feature_kd_weight", "au_weight", "momentum", "weight_decay"):
            check_number(name, getattr(self, name), minimum=0)
        for name in ("lr", "lr_base", "temperature"):
            check_number(name, getattr(self, name), above=0)
        if self.new_class_samples is not None:
            check_number("new_class_samples (or None)", self.new_class_samples, integer=True, minimum=1)
        uses_memory = any(METHODS[split_method(m)[0]][0] in MEMORY_SELECTIONS for m in self.methods)
        n_classes = len(self.protocol().class_order)
        if uses_memory and self.memory_size < n_classes:
            raise ConfigError(f"memory_size={self.memory_size} is smaller than the {n_classes} classes: a memory "
                              f"method could not keep one exemplar per class; use memory_size >= {n_classes}")
        resolve_layers(self.backbone, self.layers)
        resolve_device(self.device)  # CUDA asked for without a GPU -> ConfigError now

    def _adopt_checkpoint(self) -> None:
        """Fill backbone / image_size from the base checkpoint(s) and refuse values that disagree with them."""
        self._normalisation: tuple[list[float], list[float]] | None = None
        for name in ("base_checkpoint", "base_checkpoint_au"):
            path = getattr(self, name)
            if path is None:
                continue
            mc = checkpoint_model_config(path)
            size, backbone = int(mc["image_size"]), str(mc["backbone"])
            if self.image_size is None:
                self.image_size = size
            elif self.image_size != size:
                raise ConfigError(f"{name} {path} was trained at {size} px, but image_size={self.image_size}: leave "
                                  f"image_size unset (None) to take the checkpoint's, or give {size}")
            if self.backbone is None:
                self.backbone = backbone
            elif name == "base_checkpoint" and self.backbone != backbone:
                raise ConfigError(f"{name} {path} is a {backbone}, but backbone={self.backbone!r}: leave backbone "
                                  f"unset (None) to take the checkpoint's")
            norm = (list(mc.get("mean") or ()), list(mc.get("std") or ()))
            if self._normalisation is not None and norm != self._normalisation:
                raise ConfigError(f"base_checkpoint and base_checkpoint_au normalise images differently: "
                                  f"{self._normalisation} vs {norm}")
            self._normalisation = norm if norm[0] and norm[1] else None
        self.backbone = self.backbone or "resnet18"
        self.image_size = self.image_size or 64

    def normalisation(self) -> tuple[list[float], list[float]]:
        """(mean, std) the faces get: the base checkpoint's, else the backbone's pretrained normalisation."""
        return self._normalisation or pretrained_normalisation(self.backbone)

    def protocol(self) -> ContinualProtocol:
        return make_protocol(self.base_classes, self.new_classes, self.increment, self.task_sizes,
                             self.class_order_seed)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def checkpoint_model_config(path: str | Path) -> dict[str, Any]:
    """The `model_config` a fer_lib checkpoint records (backbone, image_size, class_names, mean, std, ...)."""
    return dict(read_checkpoint(path)["model_config"])


def split_method(name: str) -> tuple[str, bool]:
    """'psmr+au' -> ('psmr', True); validates the base name against METHODS."""
    au = str(name).endswith(AU_SUFFIX)
    base = str(name)[: -len(AU_SUFFIX)] if au else str(name)
    check_choice("method", base, METHODS)
    return base, au


def load_continual_data(config: ContinualConfig, progress: bool = True, cache_dir: str | None = None
                        ) -> dict[str, TensorSplit]:
    """Build the dataset of every class of the protocol and hold it as TensorSplits (train, test[, val]).

    "synthetic" generates basic and compound faces (fer_lib.data.synthetic); for real data
    (e.g. RAF-DB basic + RAF-DB compound) build each with fer_lib.data.build_datasets, turn
    them into TensorSplits with `tensor_split` and join them with `merge_splits`.
    """
    if config.dataset != "synthetic":
        raise ConfigError(f"load_continual_data builds the synthetic set only (got dataset={config.dataset!r}); for "
                          f"real data use build_datasets(...) per source, tensor_split() and merge_splits()")
    classes = config.protocol().class_order
    mean, std = config.normalisation()  # as the base model was trained (the checkpoint's mean/std)
    datasets = build_datasets("synthetic", root=config.data_root, image_size=config.image_size, seed=config.seed,
                              landmarks=config.landmarks, cache_dir=cache_dir, augment=False,
                              expressions=tuple(classes), n_per_class=dict(config.n_per_class), progress=progress,
                              mean=mean, std=std)
    return {split: tensor_split(ds, progress, desc=f"{split} tensors") for split, ds in datasets.items()}


# =========================================================================== model surgery
def clone_model(model: TappedModel) -> TappedModel:
    """An independent copy (rebuilt, so its hooks fill its own taps; deepcopy would share them)."""
    c = model.config
    copy = build_model(c["backbone"], num_classes=c["num_classes"], layers=c["tap_names"], image_size=c["image_size"],
                       in_chans=c.get("in_chans", 3), class_names=c["class_names"], mean=c.get("mean"),
                       std=c.get("std"))
    copy.config["layers"] = list(c.get("layers", copy.config["layers"]))
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).device)


def expand_head(model: TappedModel, class_names: Sequence[str]) -> TappedModel:
    """Grow the classifier to `class_names` (the old ones first), keeping the old rows' weights."""
    old_names = list(model.config["class_names"])
    class_names = list(class_names)
    if class_names[: len(old_names)] != old_names:
        raise ConfigError(f"new class list must start with the old one {old_names}, got {class_names}")
    if len(class_names) == len(old_names):
        return model
    net = model.net
    head = net.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ConfigError(f"expand_head needs a Linear classifier; {model.config['backbone']!r} has "
                          f"{type(head).__name__}")
    device = head.weight.device
    weight, bias = head.weight.detach().clone(), (head.bias.detach().clone() if head.bias is not None else None)
    net.reset_classifier(len(class_names))
    new = net.get_classifier().to(device)
    with torch.no_grad():
        new.weight[: len(old_names)] = weight
        if bias is not None and new.bias is not None:
            new.bias[: len(old_names)] = bias
    model.config["num_classes"] = len(class_names)
    model.config["class_names"] = class_names
    return model.to(device)


@torch.no_grad()
def embed(model: TappedModel, images: torch.Tensor) -> torch.Tensor:
    """Penultimate (pre-logits) features of a timm model, (B, D)."""
    net = model.net
    if hasattr(net, "forward_features") and hasattr(net, "forward_head"):
        out = net.forward_head(net.forward_features(images), pre_logits=True)
        model._taps = {}
        return out.flatten(1)
    _, feats = model(images)
    return feats[-1].mean(dim=(2, 3))


# =========================================================================== losses
def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 2.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)) over the teacher's classes (the student's first ones)."""
    n_old = teacher_logits.shape[1]
    if student_logits.shape[1] < n_old:
        raise ValueError(f"student has {student_logits.shape[1]} outputs, fewer than the teacher's {n_old}")
    t = float(temperature)
    log_s = F.log_softmax(student_logits[:, :n_old].float() / t, dim=1)
    log_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * (t * t)


def feature_distillation_loss(student_feats: Sequence[torch.Tensor], teacher_feats: Sequence[torch.Tensor]
                              ) -> torch.Tensor:
    """Mean over layers and samples of 1 - cosine(student feature map, teacher feature map)."""
    if len(student_feats) != len(teacher_feats) or not student_feats:
        raise ValueError(f"need the same non-zero number of layers, got {len(student_feats)} and {len(teacher_feats)}")
    terms = [1.0 - F.cosine_similarity(s.float().flatten(1), t.float().flatten(1), dim=1, eps=1e-8).mean()
             for s, t in zip(student_feats, teacher_feats)]
    return torch.stack(terms).mean()


# =========================================================================== memory
class ExemplarMemory:
    """A fixed-budget, class-balanced exemplar memory (indices into the training split).

    Each class keeps an ordered list; `m = budget // n_classes` of each are kept, from the
    head of the list. "psmr" orders by the model's score (highest first), "random" by a
    seeded permutation. Adding classes shrinks every class to the new m. `len(memory)`
    never exceeds `budget`.
    """

    def __init__(self, budget: int, selection: str = "psmr", seed: int = 0) -> None:
        check_number("memory budget", budget, integer=True, minimum=0)
        self.budget = int(budget)
        self.selection = check_choice("memory selection", selection, MEMORY_SELECTIONS)
        self.rng = np.random.default_rng(seed)
        self.exemplars: dict[int, np.ndarray] = {}
        self.scores: dict[int, np.ndarray] = {}

    def per_class(self, n_classes: int | None = None) -> int:
        n = len(self.exemplars) if n_classes is None else n_classes
        return self.budget // n if n else 0

    def add(self, candidates: Mapping[int, np.ndarray], scores: Mapping[int, np.ndarray] | None = None) -> None:
        """Add classes: {class_id: candidate indices}; `scores` {class_id: per-candidate score} for "psmr"."""
        clash = sorted(set(candidates) & set(self.exemplars))
        if clash:
            raise ValueError(f"classes {clash} are already in the memory")
        m = self.per_class(len(self.exemplars) + len(candidates))
        for c, idx in candidates.items():
            idx = np.asarray(idx, dtype=np.int64)
            if self.selection == "psmr":
                if scores is None or c not in scores or len(scores[c]) != len(idx):
                    raise ValueError(f"psmr memory needs one score per candidate for class {c}")
                s = np.asarray(scores[c], dtype=np.float64)
                order = np.lexsort((idx, -s))  # highest score first, ties by index (deterministic)
                self.scores[c] = s[order]
            else:
                order = self.rng.permutation(len(idx))
            self.exemplars[c] = idx[order]
        self.reduce(m)

    def reduce(self, m: int) -> None:
        """Keep the first `m` exemplars of every class."""
        for c in self.exemplars:
            self.exemplars[c] = self.exemplars[c][:m]
            if c in self.scores:
                self.scores[c] = self.scores[c][:m]

    def indices(self) -> np.ndarray:
        """All stored indices (class by class, each in its kept order)."""
        parts = [self.exemplars[c] for c in sorted(self.exemplars)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def counts(self) -> dict[int, int]:
        return {c: int(len(v)) for c, v in sorted(self.exemplars.items())}

    def __len__(self) -> int:
        return int(sum(len(v) for v in self.exemplars.values()))


@torch.no_grad()
def predictive_scores(model: TappedModel, split: TensorSplit, indices: np.ndarray, device: torch.device,
                      score: str = "logit", batch_size: int = 128) -> np.ndarray:
    """The model's output for each sample's own class (logit or softmax probability)."""
    check_choice("psmr_score", score, PSMR_SCORES)
    was = model.training
    model.eval()
    out = []
    for s in range(0, len(indices), batch_size):
        idx = torch.as_tensor(indices[s:s + batch_size])
        logits = model.classify(split.images[idx].to(device)).float()
        if score == "prob":
            logits = logits.softmax(dim=1)
        out.append(logits.gather(1, split.labels[idx].to(device)[:, None])[:, 0].cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros(0)


# =========================================================================== training
def augment_batch(images: torch.Tensor, maps: torch.Tensor, generator: torch.Generator,
                  max_shift: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flip and shift, applied identically to images and their AU maps."""
    b, _, h, w = images.shape
    flip = torch.rand(b, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None].to(images.device), images.flip(-1), images)
    maps = torch.where(flip[:, None, None, None].to(maps.device), maps.flip(-1), maps)
    pad = int(round(max_shift * h))
    if pad > 0:
        dy, dx = (torch.randint(-pad, pad + 1, (2,), generator=generator)).tolist()
        images = torch.roll(F.pad(images, (pad, pad, pad, pad), mode="replicate"), (dy, dx), (2, 3))[..., pad:pad + h,
                                                                                                   pad:pad + w]
        maps = torch.roll(F.pad(maps, (pad, pad, pad, pad)), (dy, dx), (2, 3))[..., pad:pad + h, pad:pad + w]
    return images, maps


@dataclass
class TaskRun:
    """One task's training run: epochs and lr, the distillation teacher (None: none), the AU term, the
    seed of its batches and augmentation, and its progress label."""

    epochs: int
    lr: float
    teacher: TappedModel | None = None
    au: bool = False
    seed: int = 0
    desc: str = "task"
    progress: bool = True


class DistillationStep(AUGuidedStep):
    """The continual step: CE (+ lambda * AU alignment) + kd_weight * logit distillation from the teacher
    + feature_kd_weight * feature distillation (fer_lib.training.step does the rest).

    Outputs: (logits, LossParts, kd, feature kd, total loss), all but logits detached or floats.
    """

    def __init__(self, model: TappedModel, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 criterion: AUGuidedLoss, teacher: TappedModel | None, config: ContinualConfig,
                 scaler: torch.amp.GradScaler, settings: StepSettings) -> None:
        super().__init__(model, optimizer, scheduler, criterion=criterion, scaler=scaler, settings=settings)
        self.teacher, self.config = teacher, config

    def compute_loss(self, batch: Any) -> tuple[torch.Tensor, Any]:
        x, y, maps, has = batch
        teacher, cfg = self.teacher, self.config
        with autocast(self.device(), self.settings.amp):
            logits, feats = self.model(x)
            if teacher is not None:
                with torch.no_grad():
                    t_logits, t_feats = teacher(x)
        loss, parts = self.criterion(logits, feats, y, maps, has)
        kd = fkd = logits.new_zeros(())
        if teacher is not None and cfg.kd_weight > 0:
            kd = distillation_loss(logits, t_logits, cfg.temperature)
            loss = loss + cfg.kd_weight * kd
        if teacher is not None and cfg.feature_kd_weight > 0:
            fkd = feature_distillation_loss(feats, t_feats)
            loss = loss + cfg.feature_kd_weight * fkd
        return loss, (logits, parts, kd, fkd, loss)

    def describe(self, outputs: Any) -> str:
        _, parts, kd, _, _ = outputs
        return f"ce={parts.ce}, au={parts.au}, kd={float(kd)}"


def train_task(model: TappedModel, split: TensorSplit, indices: np.ndarray, config: ContinualConfig,
               device: torch.device, task: TaskRun) -> dict[str, float]:
    """Train `model` on split[indices] for `task.epochs`: CE (+AU alignment) (+distillation from `task.teacher`).

    Optimisation is fer_lib.training.train's (fer_lib.training.step): SGD (Nesterov momentum) or
    AdamW, cosine schedule per step, AMP + GradScaler on CUDA. Batches and augmentation come from a
    generator seeded by `task.seed`, so a run is repeatable on CPU.
    """
    criterion = AUGuidedLoss(au_weight=config.au_weight if task.au else 0.0, kind=config.au_loss)
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(indices)
    if n == 0:
        raise ConfigError(f"{task.desc}: no training samples")
    total = task.epochs * max(1, math.ceil(n / config.batch_size))
    optimizer, scheduler = build_optimizer(params, OptimSpec(config.optimizer, task.lr, config.momentum,
                                                             config.weight_decay), Schedule("cosine", total))
    use_amp = bool(config.amp and device.type == "cuda")
    step = DistillationStep(model, optimizer, scheduler, criterion=criterion, teacher=task.teacher, config=config,
                            scaler=torch.amp.GradScaler("cuda", enabled=use_amp), settings=StepSettings(amp=use_amp))
    gen = torch.Generator().manual_seed(int(task.seed))
    if task.teacher is not None:
        task.teacher.eval()
        for p in task.teacher.parameters():
            p.requires_grad_(False)
    model.train()
    sums = {"loss": 0.0, "ce": 0.0, "au": 0.0, "kd": 0.0, "fkd": 0.0, "correct": 0.0, "n": 0.0}
    bar = progress_bar(total=total, desc=task.desc, leave=False, disable=not task.progress)
    idx_all = torch.as_tensor(np.asarray(indices, dtype=np.int64))
    for epoch in range(task.epochs):
        perm = idx_all[torch.randperm(n, generator=gen)]
        for s in range(0, n, config.batch_size):
            b = perm[s:s + config.batch_size]
            x, y, maps, has = split.images[b], split.labels[b], split.au_maps[b], split.has_landmarks[b]
            if config.augment:
                x, maps = augment_batch(x, maps, gen)
            x, y, maps, has = x.to(device), y.to(device), maps.to(device), has.to(device)
            out = step((x, y, maps, has), where=f"{task.desc}, epoch {epoch + 1}, batch {s // config.batch_size + 1}")
            _add_batch(sums, out, y)
            bar.update(1)
            bar.set_postfix(loss=f"{float(out[4].detach()):.3f}")
    bar.close()
    total_n = max(sums.pop("n"), 1.0)
    out = {k: v / total_n for k, v in sums.items()}
    out["accuracy"] = out.pop("correct")
    out["n_samples"] = int(n)
    return out


def _add_batch(sums: dict[str, float], outputs: tuple, y: torch.Tensor) -> None:
    logits, parts, kd, fkd, loss = outputs
    k = float(len(y))
    sums["loss"] += float(loss.detach()) * k
    sums["ce"] += parts.ce * k
    sums["au"] += parts.au * k
    sums["kd"] += float(kd.detach()) * k
    sums["fkd"] += float(fkd.detach()) * k
    sums["correct"] += float((logits.argmax(1) == y).sum())
    sums["n"] += k


@torch.no_grad()
def predict(model: TappedModel, split: TensorSplit, indices: np.ndarray, device: torch.device,
            batch_size: int = 128) -> np.ndarray:
    """Predicted class ids (model order) for split[indices]."""
    was = model.training
    model.eval()
    preds = []
    for s in range(0, len(indices), batch_size):
        idx = torch.as_tensor(np.asarray(indices[s:s + batch_size], dtype=np.int64))
        preds.append(model.classify(split.images[idx].to(device)).argmax(1).cpu().numpy())
    model.train(was)
    return np.concatenate(preds) if preds else np.zeros(0, np.int64)


def evaluate_step(model: TappedModel, test: TensorSplit, protocol: ContinualProtocol, t: int,
                  device: torch.device, amp: bool = False) -> dict[str, Any]:
    """Accuracy after task t on every class seen so far: old, new, overall, basic, compound, per task.

    Predictions and ATT-COS come from fer_lib.training.train.evaluate on the test samples of the seen classes.
    """
    order = protocol.class_order
    seen = protocol.seen(t)
    idx = test.indices_of(range(len(seen)))
    ev = evaluate(model, test.subset(idx), device=device, batch_size=128, amp=amp, desc=f"eval task {t}",
                  return_predictions=True)
    y = np.asarray(ev["predictions"]["label"], dtype=np.int64)
    pred = np.asarray(ev["predictions"]["pred"], dtype=np.int64)
    task_of = np.array([protocol.task_of(order[c]) for c in y])

    def acc(mask: np.ndarray) -> float | None:
        return float((pred[mask] == y[mask]).mean()) if mask.any() else None

    metrics = classification_metrics(y, pred, list(seen))
    is_compound_class = np.array([is_compound(order[c]) for c in y])
    return {
        "task": t, "n_classes": len(seen), "n_test": int(len(y)),
        "acc_overall": acc(np.ones_like(y, bool)), "acc_old": acc(task_of < t), "acc_new": acc(task_of == t),
        "acc_basic": acc(task_of == 0), "acc_compound": acc(is_compound_class),
        "macro_f1": metrics["macro_f1"], "per_class_accuracy": metrics["per_class_accuracy"],
        "acc_task": {int(j): acc(task_of == j) for j in range(t + 1)},
        "att_cos_mean": ev.get("att_cos_mean"),
        "confusion": metrics["confusion"],
        "faces": {"index": np.asarray(idx, dtype=np.int64), "correct": pred == y, "task": task_of},  # in memory
    }


def forgetting(acc_matrix: Sequence[Mapping[int, float | None]]) -> float | None:
    """Mean over tasks j < T of max_{l<T} a[l][j] - a[T][j] (Chaudhry et al. 2018); None before task 1."""
    T = len(acc_matrix) - 1
    if T < 1:
        return None
    drops = []
    for j in range(T):
        past = [acc_matrix[l][j] for l in range(j, T) if acc_matrix[l].get(j) is not None]
        last = acc_matrix[T].get(j)
        if past and last is not None:
            drops.append(max(past) - last)
    return float(np.mean(drops)) if drops else None


# =========================================================================== the harness
@dataclass
class ContinualResults:
    """Per-method step metrics, summaries, and the trained models (kept in memory)."""

    config: ContinualConfig
    protocol: ContinualProtocol
    steps: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    train_logs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    memory_counts: dict[str, list[dict[int, int]]] = field(default_factory=dict)
    models: dict[str, TappedModel] = field(default_factory=dict)
    base_models: dict[bool, TappedModel] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    def base_model(self, au: bool = False) -> TappedModel:
        """The task-0 (basic) model, CE-only or AU-guided."""
        if au not in self.base_models:
            raise KeyError(f"no base model with au={au}; trained: {sorted(self.base_models)}")
        return self.base_models[au]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per method: final old/new/overall/basic/compound accuracy, average incremental accuracy, forgetting,
        with 95% intervals over test faces (`<metric>_ci_low` / `_ci_high`; see the module docstring)."""
        out = {}
        for method, steps in self.steps.items():
            last = steps[-1]
            matrix = [s["acc_task"] for s in steps]
            out[method] = {
                "acc_old": last["acc_old"], "acc_new": last["acc_new"], "acc_overall": last["acc_overall"],
                "acc_basic": last["acc_basic"], "acc_compound": last["acc_compound"],
                "avg_incremental_acc": float(np.mean([s["acc_overall"] for s in steps])),
                "forgetting": forgetting(matrix),
                "att_cos_final": last.get("att_cos_mean"),
                "memory_final": int(sum(self.memory_counts.get(method, [{}])[-1].values())),
                "train_s": self.timings.get(method),
            }
            out[method].update(face_intervals(steps, self.config.n_boot, self.config.seed))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "protocol": self.protocol.to_dict(), "summary": self.summary(),
                "steps": {m: [{k: v for k, v in s.items() if k not in ("confusion", "faces")} for s in steps]
                          for m, steps in self.steps.items()},
                "confusion_final": {m: steps[-1]["confusion"] for m, steps in self.steps.items()},
                "train_logs": self.train_logs,
                "memory_counts": {m: [{str(k): v for k, v in c.items()} for c in cs]
                                  for m, cs in self.memory_counts.items()},
                "timings_s": self.timings}


def face_intervals(steps: Sequence[Mapping[str, Any]], n_boot: int = 1000, seed: int = 0,
                   level: float = 0.95) -> dict[str, float | None]:
    """95% intervals over test faces of a method's final accuracies (Wilson) and of its forgetting and
    average incremental accuracy (bootstrap: the test faces of each task's classes resampled with
    replacement, the same draw for every step, percentiles of the recomputed values)."""
    out: dict[str, float | None] = {}
    last = steps[-1]
    if "faces" not in last:
        return out
    t_last = int(last["task"])
    correct, task = np.asarray(last["faces"]["correct"], bool), np.asarray(last["faces"]["task"])
    groups = {"acc_overall": np.ones_like(correct), "acc_old": task < t_last, "acc_new": task == t_last,
              "acc_basic": task == 0}
    for name, mask in groups.items():
        n = int(mask.sum())
        low, high = wilson_interval(int(correct[mask].sum()), n, level) if n else (None, None)
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = low, high
    if n_boot < 1 or len(steps) < 2:
        return out
    rng = np.random.default_rng(seed)
    index, last_task = np.asarray(last["faces"]["index"]), task
    size = int(index.max()) + 1
    forget, avg = [], []
    for _ in range(n_boot):
        counts = np.zeros(size)
        for j in np.unique(last_task):  # resample within each task's faces: every task keeps its size
            members = index[last_task == j]
            np.add.at(counts, rng.choice(members, size=len(members), replace=True), 1.0)
        matrix, overall = [], []
        for s in steps:
            f = s["faces"]
            w = counts[np.asarray(f["index"])]
            c, tk = np.asarray(f["correct"], float), np.asarray(f["task"])
            matrix.append({int(j): (float((w * c)[tk == j].sum() / w[tk == j].sum()) if w[tk == j].sum() else None)
                           for j in range(int(s["task"]) + 1)})
            overall.append(float((w * c).sum() / max(w.sum(), 1e-12)))
        value = forgetting(matrix)
        if value is not None:
            forget.append(value)
        avg.append(float(np.mean(overall)))
    q = [50 * (1 - level), 50 * (1 + level)]
    if forget:
        out["forgetting_ci_low"], out["forgetting_ci_high"] = (float(v) for v in np.percentile(forget, q))
    out["avg_incremental_acc_ci_low"], out["avg_incremental_acc_ci_high"] = (float(v) for v in np.percentile(avg, q))
    return out


def _task_seed(seed: int, t: int) -> int:
    return int(config_hash({"seed": seed, "task": t}, length=8), 16) % (2**31)


def train_base_model(config: ContinualConfig, train: TensorSplit, test: TensorSplit, protocol: ContinualProtocol,
                     device: torch.device, au: bool = False, progress: bool = True
                     ) -> tuple[TappedModel, dict[str, Any], dict[str, Any]]:
    """Task 0: a fresh model trained on the basic classes; returns (model, train log, step metrics).

    With `config.base_checkpoint` (or `base_checkpoint_au` for AU-guided methods) the basic
    model is loaded instead (e.g. the baseline of notebook 02); it must have the base classes
    in the protocol's order and the config's image size.
    """
    seed_everything(config.seed)
    base = protocol.base_classes
    path = config.base_checkpoint_au if au else config.base_checkpoint
    if path:
        model, ckpt = load_checkpoint(path)
        names = list(model.config["class_names"])
        if names != list(base) or model.config["image_size"] != config.image_size:
            raise ConfigError(f"{path}: classes {names} at {model.config['image_size']} px; the protocol needs "
                              f"{list(base)} at image_size={config.image_size}")
        model = model.to(device)
        return model, {"task": 0, "checkpoint": str(path)}, evaluate_step(model, test, protocol, 0, device, config.amp)
    model = build_model(config.backbone, num_classes=len(base), layers=config.layers, image_size=config.image_size,
                        class_names=list(base)).to(device)
    idx = train.indices_of(range(len(base)))
    log = train_task(model, train, idx, config, device,
                     TaskRun(config.epochs_base, config.lr_base, au=au, seed=_task_seed(config.seed, 0),
                             desc=f"task 0 (basic{', AU' if au else ''})", progress=progress))
    return model, log, evaluate_step(model, test, protocol, 0, device, config.amp)


def _new_class_indices(train: TensorSplit, class_ids: Sequence[int], limit: int | None, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = []
    for c in class_ids:
        idx = train.indices_of([c])
        if limit is not None and len(idx) > limit:
            idx = np.sort(rng.choice(idx, size=int(limit), replace=False))
        out.append(idx)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def run_method(method: str, config: ContinualConfig, train: TensorSplit, test: TensorSplit,
               protocol: ContinualProtocol, base: tuple[TappedModel, dict[str, Any], dict[str, Any]],
               device: torch.device, progress: bool = True
               ) -> tuple[TappedModel, list[dict[str, Any]], list[dict[str, Any]], list[dict[int, int]]]:
    """Run one method through tasks 1..T from a copy of the base model; returns (model, steps, logs, memory)."""
    name, au = split_method(method)
    selection, use_kd = METHODS[name]
    base_model, base_log, base_step = base
    model = clone_model(base_model)
    basic_teacher = clone_model(base_model) if (use_kd and config.teacher == "basic") else None
    steps, logs = [dict(base_step)], [dict(base_log, task=0)]
    memory = ExemplarMemory(config.memory_size, selection, seed=config.seed) if selection in MEMORY_SELECTIONS else None
    order = protocol.class_order

    def remember(t: int) -> None:
        if memory is None:
            return
        ids = [order.index(c) for c in protocol.new(t)]
        cands = {c: train.indices_of([c]) for c in ids}
        scores = ({c: predictive_scores(model, train, cands[c], device, config.psmr_score) for c in ids}
                  if selection == "psmr" else None)
        memory.add(cands, scores)

    remember(0)
    mem_counts = [memory.counts() if memory is not None else {}]
    for t in range(1, protocol.n_tasks):
        seen = protocol.seen(t)
        new_ids = [order.index(c) for c in protocol.new(t)]
        teacher = None
        if use_kd:
            teacher = basic_teacher if config.teacher == "basic" else clone_model(model)
        expand_head(model, seen)
        if selection == "all":
            idx = train.indices_of(range(len(seen)))
        else:
            idx = _new_class_indices(train, new_ids, config.new_class_samples, _task_seed(config.seed, 100 + t))
            if memory is not None:
                idx = np.concatenate([idx, memory.indices()])
        log = train_task(model, train, idx, config, device,
                         TaskRun(config.epochs, config.lr, teacher=teacher, au=au, seed=_task_seed(config.seed, t),
                                 desc=f"{method}: task {t}", progress=progress))
        logs.append(dict(log, task=t))
        steps.append(evaluate_step(model, test, protocol, t, device, config.amp))
        remember(t)
        mem_counts.append(memory.counts() if memory is not None else {})
        del teacher
    return model, steps, logs, mem_counts


def run_continual(config: ContinualConfig, data: Mapping[str, TensorSplit] | None = None,
                  progress: bool = True) -> ContinualResults:
    """Train the base model(s) once and every method of `config.methods` through the protocol."""
    protocol = config.protocol()
    data = load_continual_data(config, progress=progress) if data is None else data
    for split in ("train", "test"):
        if split not in data:
            raise ConfigError(f"data needs a {split!r} split, has {sorted(data)}")
    train = data["train"].relabel(protocol.class_order)
    test = data["test"].relabel(protocol.class_order)
    empty = [c for i, c in enumerate(protocol.class_order) if not len(train.indices_of([i]))]
    if empty:
        raise ConfigError(f"classes without training samples: {empty}")
    device = resolve_device(config.device)
    results = ContinualResults(config=config, protocol=protocol)
    bases: dict[bool, tuple] = {}
    for method in config.methods:
        _, au = split_method(method)
        if au not in bases:
            t0 = time.perf_counter()
            bases[au] = train_base_model(config, train, test, protocol, device, au=au, progress=progress)
            results.timings[f"base{'+au' if au else ''}"] = time.perf_counter() - t0
            results.base_models[au] = bases[au][0]
        t0 = time.perf_counter()
        model, steps, logs, mem = run_method(method, config, train, test, protocol, bases[au], device, progress)
        results.timings[method] = time.perf_counter() - t0
        results.models[method] = model
        results.steps[method] = steps
        results.train_logs[method] = logs
        results.memory_counts[method] = mem
    return results


def summary_table(results: ContinualResults):
    """pandas DataFrame: one row per method, final accuracies, average incremental accuracy, forgetting."""
    import pandas as pd

    frame = pd.DataFrame.from_dict(results.summary(), orient="index")
    frame.index.name = "method"
    return frame


def steps_table(results: ContinualResults):
    """pandas DataFrame: one row per (method, task) with old/new/overall/basic/compound accuracy."""
    import pandas as pd

    rows = []
    for method, steps in results.steps.items():
        for s in steps:
            rows.append({"method": method, "task": s["task"], "n_classes": s["n_classes"],
                         **{k: s[k] for k in ("acc_overall", "acc_old", "acc_new", "acc_basic", "acc_compound",
                                              "macro_f1", "att_cos_mean")}})
    return pd.DataFrame(rows)


# =========================================================================== few-shot
def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the `confidence` interval) with Student's t over the values."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    if v.size == 1:
        return float(v[0]), float("nan")
    half = stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
    return float(v.mean()), float(half)


def sample_episode(support_labels: np.ndarray, query_labels: np.ndarray, classes: Sequence[int], k_shot: int,
                   n_query: int, rng: np.random.Generator, same_pool: bool = False
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(support indices, query indices) of one episode: k per class from the support pool, up to n_query from the query pool.

    With `same_pool=True` both index the same array and queries are drawn only among the
    samples not picked as support, so no query sample can leak into the support.
    """
    support, query = [], []
    for c in classes:
        pool_s = np.flatnonzero(support_labels == c)
        if len(pool_s) < k_shot:
            raise ConfigError(f"class {c} has {len(pool_s)} support samples, fewer than k_shot={k_shot}")
        s = rng.choice(pool_s, size=k_shot, replace=False)
        pool_q = np.flatnonzero(query_labels == c)
        if same_pool:
            pool_q = np.setdiff1d(pool_q, s)
        if len(pool_q) == 0:
            raise ConfigError(f"class {c} has no query samples left")
        q = rng.choice(pool_q, size=min(n_query, len(pool_q)), replace=False)
        support.append(s)
        query.append(q)
    return np.concatenate(support), np.concatenate(query)


def prototype_predict(support: np.ndarray, support_y: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Nearest class mean by cosine on L2-normalised features; returns the query's predicted labels."""
    def norm(a: np.ndarray) -> np.ndarray:
        return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)

    classes = np.unique(support_y)
    protos = norm(np.stack([norm(support[support_y == c]).mean(0) for c in classes]))
    return classes[np.argmax(norm(query) @ protos.T, axis=1)]


def linear_predict(support: np.ndarray, support_y: np.ndarray, query: np.ndarray, steps: int = 100,
                   lr: float = 0.5, weight_decay: float = 1e-3, seed: int = 0) -> np.ndarray:
    """A new linear head (class-balanced softmax regression) fitted on the normalised support features."""
    classes = np.unique(support_y)
    g = torch.Generator().manual_seed(seed)
    xs = F.normalize(torch.as_tensor(support, dtype=torch.float32), dim=1)
    xq = F.normalize(torch.as_tensor(query, dtype=torch.float32), dim=1)
    ys = torch.as_tensor(np.searchsorted(classes, support_y), dtype=torch.long)
    counts = torch.bincount(ys, minlength=len(classes)).float()
    class_weight = counts.sum() / (len(classes) * counts.clamp_min(1.0))
    w = (torch.randn(xs.shape[1], len(classes), generator=g) * 0.01).requires_grad_(True)
    b = torch.zeros(len(classes), requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=0.9, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(10.0 * xs @ w + b, ys, weight=class_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return classes[(10.0 * xq @ w + b).argmax(1).numpy()]


@torch.no_grad()
def split_features(model: TappedModel, split: TensorSplit, device: torch.device | str = "cpu",
                   batch_size: int = 128, progress: bool = False) -> np.ndarray:
    """Penultimate features of every sample of a split, (N, D) float32."""
    device = torch.device(device)
    was = model.training
    model.eval()
    out = []
    for s in progress_bar(range(0, len(split), batch_size), desc="features", leave=False, disable=not progress):
        out.append(embed(model, split.images[s:s + batch_size].to(device)).float().cpu().numpy())
    model.train(was)
    return np.concatenate(out)


@dataclass
class FewShotSettings:
    """The episodes of `few_shot`: k per class, how many episodes and queries, the classifiers, whether
    the basic classes join the episodes (generalised few-shot), and the seed."""

    k_shots: Sequence[int] = (1, 5)
    n_episodes: int = 100
    n_query: int = 15
    classifiers: Sequence[str] = FEW_SHOT_CLASSIFIERS
    include_base: bool = False
    base_classes: Sequence[str] = ()
    seed: int = 0


def few_shot(model: TappedModel, data: Mapping[str, TensorSplit], new_classes: Sequence[str],
             settings: FewShotSettings | None = None, device: str = "auto", progress: bool = True,
             **fields: Any) -> dict[str, Any]:
    """k-shot episodes of the new classes on the frozen features of `model` (mean +- 95% CI over episodes).

    `settings` (or its fields as keywords: k_shots=(1, 5), n_episodes=100, ...) choose the episodes.
    Support comes from data["train"], queries from data["test"]. With `include_base`, each
    episode also classifies test samples of `base_classes`, whose prototypes (or head
    training data) are all their training samples: generalised few-shot; accuracies are
    then reported on new-class queries, base-class queries and both.
    """
    fs = dataclasses.replace(settings or FewShotSettings(), **fields)
    k_shots, n_episodes, n_query, classifiers = fs.k_shots, fs.n_episodes, fs.n_query, fs.classifiers
    include_base, base_classes, seed = fs.include_base, fs.base_classes, fs.seed
    for c in classifiers:
        check_choice("few-shot classifier", c, FEW_SHOT_CLASSIFIERS)
    classes = tuple(new_classes) + (tuple(base_classes) if include_base else ())
    train = data["train"].relabel(classes)
    test = data["test"].relabel(classes)
    dev = resolve_device(device)
    ftr, fte = split_features(model, train, dev, progress=progress), split_features(model, test, dev, progress=progress)
    ytr, yte = train.labels.numpy(), test.labels.numpy()
    new_ids = list(range(len(new_classes)))
    base_ids = list(range(len(new_classes), len(classes)))
    base_sup = np.flatnonzero(np.isin(ytr, base_ids))
    base_q = np.flatnonzero(np.isin(yte, base_ids))
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"classes": list(classes), "n_way": len(classes), "n_query": n_query,
                           "n_episodes": n_episodes, "include_base": include_base, "results": {}}
    for k in k_shots:
        accs: dict[str, dict[str, list[float]]] = {c: {"new": [], "base": [], "all": []} for c in classifiers}
        for e in progress_bar(range(n_episodes), desc=f"{k}-shot episodes", leave=False, disable=not progress):
            s_idx, q_idx = sample_episode(ytr, yte, new_ids, k, n_query, rng)
            sup_x, sup_y = ftr[s_idx], ytr[s_idx]
            q_x, q_y = fte[q_idx], yte[q_idx]
            if include_base:
                sup_x, sup_y = np.concatenate([sup_x, ftr[base_sup]]), np.concatenate([sup_y, ytr[base_sup]])
                q_x, q_y = np.concatenate([q_x, fte[base_q]]), np.concatenate([q_y, yte[base_q]])
            is_new = np.isin(q_y, new_ids)
            for clf in classifiers:
                pred = (prototype_predict(sup_x, sup_y, q_x) if clf == "prototype"
                        else linear_predict(sup_x, sup_y, q_x, seed=seed + e))
                accs[clf]["new"].append(float((pred[is_new] == q_y[is_new]).mean()))
                if include_base:
                    accs[clf]["base"].append(float((pred[~is_new] == q_y[~is_new]).mean()))
                    accs[clf]["all"].append(float((pred == q_y).mean()))
        res = {}
        for clf, parts in accs.items():
            res[clf] = {}
            for part, values in parts.items():
                if values:
                    m, h = mean_ci(values)
                    res[clf][part] = {"mean": m, "ci95": h, "std": float(np.std(values, ddof=1)) if len(values) > 1
                                      else float("nan")}
        out["results"][str(k)] = res
    return out


def few_shot_table(results: Mapping[str, Mapping[str, Any]]):
    """pandas DataFrame from {label: few_shot(...) output}: one row per (features, k, classifier, part)."""
    import pandas as pd

    rows = []
    for label, fs in results.items():
        for k, per_clf in fs["results"].items():
            for clf, parts in per_clf.items():
                for part, v in parts.items():
                    rows.append({"features": label, "k_shot": int(k), "classifier": clf, "queries": part,
                                 "n_way": fs["n_way"], "accuracy": v["mean"], "ci95": v["ci95"]})
    return pd.DataFrame(rows)


# =========================================================================== GradCAM views
def compound_cam_views(model: TappedModel, test: TensorSplit, compounds: Sequence[str], per_class: int = 1,
                       method: str = "gradcam", seed: int = 0) -> list[dict[str, Any]]:
    """CAMs of compound test images for the compound class and for each of its basic parts.

    One dict per image: image index, compound, parts, and maps (H, W) numpy for the keys
    "au" (the compound's AU map), "cam:<class>" for the compound and each part present in
    the model's classes. Uses fer_lib.analysis.interpret.compute_cams (pytorch-grad-cam).
    """
    names = list(model.config["class_names"])
    data = test.relabel(names)
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    views = []
    was = model.training
    model.eval()
    for comp in compounds:
        if comp not in names:
            continue
        idx = data.indices_of([names.index(comp)])
        if len(idx) == 0:
            continue
        pick = np.sort(rng.choice(idx, size=min(per_class, len(idx)), replace=False))
        targets = [comp] + [p for p in COMPOUND_PARTS[comp] if p in names]
        images = data.images[torch.as_tensor(pick)].to(device)
        cams = {c: compute_cams(model, images, method, torch.full((len(pick),), names.index(c))) for c in targets}
        pred = model.classify(images).argmax(1).cpu().numpy()
        for j, i in enumerate(pick):
            views.append({"index": int(i), "compound": comp, "parts": list(COMPOUND_PARTS[comp]),
                          "predicted": names[int(pred[j])], "au": data.au_maps[i, 0].numpy(),
                          "image": data.images[i].numpy(),
                          **{f"cam:{c}": cams[c][j].numpy() for c in targets}})
    model.train(was)
    return views


def cam_part_similarity(model: TappedModel, test: TensorSplit, compounds: Sequence[str], method: str = "gradcam",
                        max_per_class: int = 16, seed: int = 0):
    """pandas DataFrame, one row per compound: cosine of its CAM with each part's CAM, and CAM-COS with AU maps.

    cos_part_a / cos_part_b: mean cosine between the compound-class CAM and the part-class CAM
    on the same images; cam_cos_compound: compound CAM vs the compound's AU map;
    cam_cos_parts_au: compound CAM vs the max of its parts' AU maps (CAM-COS, fer_lib.metrics.map_cosine).
    """
    import pandas as pd

    names = list(model.config["class_names"])
    data = test.relabel(names)
    device = next(model.parameters()).device
    rng = np.random.default_rng(seed)
    rows = []
    for comp in compounds:
        parts = [p for p in COMPOUND_PARTS.get(comp, ()) if p in names]
        if comp not in names:
            continue
        idx = data.indices_of([names.index(comp)])
        if len(idx) == 0:
            continue
        pick = np.sort(rng.choice(idx, size=min(max_per_class, len(idx)), replace=False))
        images = data.images[torch.as_tensor(pick)].to(device)
        maps = data.au_maps[torch.as_tensor(pick)]
        valid = (data.has_landmarks[torch.as_tensor(pick)] & (maps.flatten(1).amax(1) > 0)).numpy()
        cam_c = compute_cams(model, images, method, torch.full((len(pick),), names.index(comp)))[:, None]
        row: dict[str, Any] = {"compound": comp, "n": int(len(pick)), "parts": "+".join(COMPOUND_PARTS[comp])}
        row["cam_cos_compound"] = float(map_cosine(cam_c, maps)[torch.as_tensor(valid)].mean()) if valid.any() else None
        for k, p in enumerate(parts):
            cam_p = compute_cams(model, images, method, torch.full((len(pick),), names.index(p)))[:, None]
            row[f"cos_part_{'ab'[k]}"] = float(map_cosine(cam_c, cam_p).mean())
            row[f"part_{'ab'[k]}"] = p
        rows.append(row)
    return pd.DataFrame(rows)


def plot_compound_cams(views: Sequence[Mapping[str, Any]], mean: Sequence[float], std: Sequence[float],
                       path: str | Path | None = None, title: str = ""):
    """Figure: per view, the face, its compound AU map, and CAMs for the compound and its parts."""
    import matplotlib.pyplot as plt

    if not views:
        raise ValueError("no views to plot (no compound class of the model had test images)")
    ncols = 1 + max(len([k for k in v if k.startswith("cam:")]) for v in views) + 1
    fig, axes = plt.subplots(len(views), ncols, figsize=(ncols * 1.7, len(views) * 1.8), squeeze=False)
    for r, v in enumerate(views):
        img = np.clip(v["image"].transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean), 0, 1)
        gray = img.mean(axis=2)
        axes[r, 0].imshow(img)
        axes[r, 0].set_title(f"{v['compound']}\npred: {v['predicted']}", fontsize=6)
        axes[r, 1].imshow(gray, cmap="gray")
        axes[r, 1].imshow(v["au"], cmap="jet", alpha=0.5, vmin=0, vmax=1)
        axes[r, 1].set_title("compound AU map", fontsize=6)
        for c, key in enumerate([k for k in v if k.startswith("cam:")]):
            ax = axes[r, 2 + c]
            ax.imshow(gray, cmap="gray")
            ax.imshow(v[key], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            ax.set_title(f"CAM {key[4:]}", fontsize=6)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        if not ax.images:
            ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    if path is not None:
        save_figure(fig, path)
    return fig


__all__ = [
    "METHODS", "DEFAULT_NEW_CLASSES", "ContinualProtocol", "make_protocol", "TensorSplit", "tensor_split",
    "merge_splits", "ContinualConfig", "split_method", "load_continual_data", "clone_model", "expand_head", "embed",
    "distillation_loss", "feature_distillation_loss", "ExemplarMemory", "predictive_scores", "augment_batch",
    "TaskRun", "DistillationStep", "train_task", "predict", "evaluate_step", "forgetting", "ContinualResults", "train_base_model", "run_method",
    "run_continual", "summary_table", "steps_table", "mean_ci", "sample_episode", "prototype_predict",
    "linear_predict", "split_features", "FewShotSettings", "few_shot", "few_shot_table", "compound_cam_views", "cam_part_similarity",
    "plot_compound_cams", "ALL_COMPOUNDS", "RAFDB_COMPOUNDS",
]
