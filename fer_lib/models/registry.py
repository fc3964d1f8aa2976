"""The model registry: a family registers itself by name, the factory (fer_lib.models.factory) only
looks names up (the pattern of timm's `register_model` / `create_model`).

A family is a `ModelFamily`: how to build a `TappedModel` from a `ModelSpec`, its stage (tappable
module) names, its smallest input side and its pretrained normalisation. To add one, write a module
with a builder and call `register_family(ModelFamily(...))` at its end, then import that module in
fer_lib/models/__init__.py (as lnlattennet.py and peer.py do). Exact names are looked up first; the
timm family is the fallback that takes any timm model name.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from fer_lib.utils import ConfigError

LayerSpec = int | str

#: timm's ImageNet normalisation, used where a backbone's pretrained_cfg names none
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelSpec:
    """What `build_model` is asked for; a family's builder reads it (validated by the factory first).

    pretrained: False; "imagenet"; True with weights=<local file>. output_stride (8, 16, 32) dilates the
    last stages (timm). trust: see fer_lib.models.checkpoints. options: family-specific keywords
    (e.g. LNLAttenNet's grid). tap_names: the resolved module names of `layers` (set by the factory).
    """

    backbone: str
    num_classes: int = 7
    layers: Sequence[LayerSpec] = ("last",)
    image_size: int = 112
    pretrained: bool | str = False
    weights: Any = None
    in_chans: int = 3
    class_names: Sequence[str] | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    output_stride: int | None = None
    allow_download: bool = False
    trust: bool = False
    options: dict[str, Any] = field(default_factory=dict)
    tap_names: list[str] = field(default_factory=list)

    @classmethod
    def from_kwargs(cls, backbone: str, **kwargs: Any) -> "ModelSpec":
        """A spec from build_model's keywords; an unknown keyword is an error naming the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)} - {"backbone", "tap_names"}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise ConfigError(f"unknown build_model option(s) {unknown}; valid: {', '.join(sorted(names))}")
        return cls(backbone=backbone, **kwargs)


def _imagenet_normalisation(backbone: str) -> tuple[list[float], list[float]]:
    return list(IMAGENET_MEAN), list(IMAGENET_STD)


@dataclass(frozen=True)
class ModelFamily:
    """A family of models: names (or `accepts` for an open-ended family) and its hooks.

    build(spec) -> TappedModel; stages(backbone) -> tappable module names (stage 1 first);
    min_image_size(backbone) -> smallest input side; normalisation(backbone) -> (mean, std) of its
    pretrained weights; from_config(model_config) -> untrained model a checkpoint records (default:
    build from the recorded fields); checks_own_size: the builder validates image_size itself.
    """

    name: str
    build: Callable[[ModelSpec], Any]
    stages: Callable[[str], Sequence[str]]
    min_image_size: Callable[[str], int]
    names: tuple[str, ...] = ()
    accepts: Callable[[str], bool] | None = None
    normalisation: Callable[[str], tuple[list[float], list[float]]] = _imagenet_normalisation
    from_config: Callable[[dict[str, Any]], Any] | None = None
    checks_own_size: bool = False
    suggestions: Callable[[], Sequence[str]] = lambda: ()


_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Register (or replace) a family under its name; its `names` become valid backbones."""
    taken = {n: f.name for f in _FAMILIES.values() if f.name != family.name for n in f.names}
    clash = [n for n in family.names if n in taken]
    if clash:
        raise ValueError(f"backbone names {clash} are already registered by family {taken[clash[0]]!r}")
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, ModelFamily]:
    """The registered families by name."""
    return dict(_FAMILIES)


def family_of(backbone: str) -> ModelFamily:
    """The family that builds `backbone`: exact names first, then the open-ended families."""
    if isinstance(backbone, str):
        for fam in _FAMILIES.values():
            if backbone in fam.names:
                return fam
        for fam in _FAMILIES.values():
            if fam.accepts is not None and fam.accepts(backbone):
                return fam
    named = [n for fam in _FAMILIES.values() for n in fam.names]
    pool = list(dict.fromkeys(named + [n for fam in _FAMILIES.values() for n in fam.suggestions()]))
    close = difflib.get_close_matches(str(backbone), pool, n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ConfigError(f"unknown backbone {backbone!r}.{hint} Valid choices: any timm model name "
                      f"(timm.list_models()) or a registered family's model: {', '.join(list_models())}")


def list_models() -> list[str]:
    """The named models of every registered family (timm's own names: timm.list_models())."""
    return [n for fam in _FAMILIES.values() for n in fam.names]
