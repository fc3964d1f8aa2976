"""Training recipes: named, ready-made `TrainConfig`s for the datasets the project runs on.

The project has two kinds of named presets, and their names say which is which:

* **recipes** (this module, `RECIPES`): one training run's `TrainConfig`, e.g. `fer2013_lite0`;
  `python -m fer_lib.training.presets --list` lists them (`python -m fer_lib.presets` too).
* **experiments** (`experiments/*.toml`, `fer_lib.workflow.plan.available_experiments`): a whole
  pipeline of notebooks, e.g. `main`, `paper`; `python -m fer_lib pipeline --list-experiments`
  lists them (`--preset NAME` is the pipeline's old spelling of an experiment name).

Both command lines take `--set NAME=VALUE` with ONE syntax, `parse_value`: the value is read as a
TOML value (2, 0.5, true, [1, 2], "x", {a = 1}), else as JSON (null, {"a": 1}), else kept as a string.

    from fer_lib.training.presets import recipe
    config = recipe("fer2013_lite0", au_weight=9, out_dir="runs/fer_lite0")   # the shipped checkpoints' recipe
    fer_lib.training.train.train(config)

or from the command line: `python -m fer_lib.training.presets fer2013 --set epochs=5` prints the
config as JSON (and `--list` lists the recipes). `preset`, `preset_dict`, `PRESETS` and
`list_presets` are the former names of `recipe`, `recipe_dict`, `RECIPES` and `list_recipes`.

Each recipe is a function returning a dict of `TrainConfig` fields; `recipe(name, **overrides)`
merges the overrides on top (unknown fields fail at once, listing the valid ones) and builds
the validated `TrainConfig`. A dataset option override goes through `dataset_kwargs=` (merged
key by key into the recipe's own options).

FER2013 (48x48 grayscale faces, `../shared/data/fer2013` when it exists, see its README):
grayscale images are read as 3 equal channels (fer_lib.faces.landmarks.as_rgb_array), resized to the
model's input size (`image_size`: 48 keeps the native resolution, 96/112 upscales so that a
stride-32 CNN's last stage is 3x3 / 4x4 instead of 2x2), and augmented with what suits small
faces: a random crop of 80-100% of the side, a horizontal flip that swaps the subject's
left/right landmarks (the AU map is re-rendered from the moved landmarks), a rotation of at
most 10 degrees and a light brightness/contrast jitter (fer_lib.data.AugmentConfig).
Landmarks come from MediaPipe FaceMesh with the default detector settings (faces upscaled to
192 px before detection), through the on-disk cache; faces without landmarks train with CE only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tomllib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from fer_lib.data.dataset import DEFAULT_FER2013_ROOT, AugmentConfig
from fer_lib.training.train import TrainConfig
from fer_lib.utils import ConfigError, check_choice, run_cli

#: augmentations for 48 px faces (all geometric ones move the landmarks with the image)
FER2013_AUGMENT = AugmentConfig(crop_scale=(0.8, 1.0), rotation_deg=10.0, flip_p=0.5, color_jitter=0.2)


def fer2013_root(data_root: str | Path | None = None) -> str | None:
    """The FER2013 folder: `data_root` if given, else ../shared/data/fer2013 when it exists, else None."""
    if data_root is not None:
        return str(data_root)
    return str(DEFAULT_FER2013_ROOT) if (DEFAULT_FER2013_ROOT / "train").is_dir() else None


def fer2013_preset(data_root: str | Path | None = None) -> dict[str, Any]:
    """The full FER2013 recipe (GPU scale): ResNet18 at 96 px, all 28,709 Training faces, 40 epochs, lambda 9."""
    return {
        "dataset": "fer2013", "data_root": fer2013_root(data_root), "landmarks": "detect", "augment": True,
        "dataset_kwargs": {"augment_config": dataclasses.asdict(FER2013_AUGMENT)},
        "backbone": "resnet18", "layers": ("last",), "image_size": 96, "au_weight": 9.0,
        "epochs": 40, "batch_size": 64, "optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.05,
        "schedule": "cosine", "warmup": 1.0, "label_smoothing": 0.0, "seed": 0,
        "out_dir": "runs/fer2013",
    }


def fer2013_cpu_preset(data_root: str | Path | None = None) -> dict[str, Any]:
    """The first CPU recipe (from scratch): a small ResNet at native 48 px, 1000 faces/class, 8 epochs (49.6%)."""
    cfg = fer2013_preset(data_root)
    # the former runs (before the official split) used the data module's default augmentation (crop 85-100%, rotation 10 deg,
    # landmark-swapping flip, jitter 0.15), so this preset keeps it to reproduce them exactly; the other CPU
    # runs there override backbone (test_vit, mobilenetv3_small_100), lr, warmup and epochs (see its README)
    cfg["dataset_kwargs"] = {"max_per_class": {"train": 1000, "val": 300}}
    cfg.update(backbone="test_resnet", image_size=48, epochs=8, batch_size=32, lr=2e-3, warmup=0.5,
               device="cpu", out_dir="runs/fer2013_cpu")
    return cfg


def fer2013_lite0_preset(data_root: str | Path | None = None) -> dict[str, Any]:
    """Real faces at the literature's level on a 2-core CPU: ImageNet tf_efficientnet_lite0, 112 px, stage 4 (7x7), all Training, 6 epochs."""
    # official protocol: fit on Training (all 28,709 faces), select and report on PublicTest ("val");
    # blocks.4 (stride 16) gives a 7x7 attention map at 112 px, as the paper's ResNet50 layer 5 at 224 px;
    # inputs normalised as the pretrained weights expect (mean = std = 0.5, set by fer_lib.training.train)
    return {
        "dataset": "fer2013", "data_root": fer2013_root(data_root), "landmarks": "detect", "augment": True,
        "dataset_kwargs": {"augment_config": dataclasses.asdict(FER2013_AUGMENT)},
        "backbone": "tf_efficientnet_lite0", "pretrained": "imagenet", "layers": (4,), "image_size": 112,
        "au_weight": 9.0, "au_loss": "cosine", "label_smoothing": 0.1, "epochs": 6, "batch_size": 64,
        "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05, "schedule": "cosine", "warmup": 0.3, "seed": 0,
        "out_dir": "runs/fer2013_lite0",
    }


def reference_readme_preset(data_root: str | Path | None = None) -> dict[str, Any]:
    """The reference code's README recipe (RAF-DB): ResNet50 ImageNet, 224 px, layer 5, random_avg p=1, cosine, lambda 9, SGD."""
    # sbelharbi/interpretable-fer-aus README: --align_atten_to_heatmap_layers 5 --align_type random_avg --p 1.0
    # --loss cosine --lambda 9.0 --scale_to scale_to_attention (bilinear resize of the map, clamped), SGD lr 0.002
    # momentum 0.9 wd 5e-4, step 4 / gamma 0.9, batch 224, 20 epochs, ImageNet weights, no label smoothing.
    # Its AU maps are ellipses on dlib-68 points; ours stay Gaussian blobs on the same regions.
    return {
        "dataset": "rafdb", "data_root": None if data_root is None else str(data_root), "landmarks": "detect",
        "backbone": "resnet50", "pretrained": "imagenet", "layers": ("last",), "image_size": 224,
        "au_weight": 9.0, "au_loss": "cosine", "attention": "random_avg", "attention_p": 1.0,
        "au_resize": "bilinear_clamp", "label_smoothing": 0.0, "epochs": 20, "batch_size": 224,
        "optimizer": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "schedule": "step",
        "step_size": 4, "step_gamma": 0.9, "seed": 0, "out_dir": "runs/reference_readme",
    }


def synthetic_default_preset(data_root: str | Path | None = None) -> dict[str, Any]:
    """The embedded synthetic faces as the main job uses them (experiments/main.toml): ResNet18, 96 px, lambda 9."""
    return {
        "dataset": "synthetic", "data_root": None if data_root is None else str(data_root), "landmarks": "detect",
        "dataset_kwargs": {"n_per_class": 100}, "backbone": "resnet18", "layers": ("last",), "image_size": 96,
        "au_weight": 9.0, "epochs": 10, "batch_size": 32, "lr": 0.03, "seed": 0, "out_dir": "runs/synthetic",
    }


RECIPES: dict[str, Callable[..., dict[str, Any]]] = {
    "fer2013": fer2013_preset,
    "fer2013_lite0": fer2013_lite0_preset,
    "reference_readme": reference_readme_preset,
    "fer2013_cpu": fer2013_cpu_preset,
    "synthetic_default": synthetic_default_preset,
}
PRESETS = RECIPES   # the former name


def list_recipes() -> dict[str, str]:
    """Recipe name -> its one-line description."""
    return {name: (fn.__doc__ or "").strip().splitlines()[0] for name, fn in RECIPES.items()}


def recipe_dict(name: str, data_root: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """The recipe's TrainConfig fields with `overrides` merged in (dataset_kwargs merged key by key)."""
    check_choice("training recipe", name, tuple(RECIPES))
    cfg = RECIPES[name](data_root)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ConfigError(f"unknown TrainConfig field(s) {unknown} for recipe {name!r}; valid: {', '.join(sorted(fields))}")
    extra = overrides.pop("dataset_kwargs", None)
    if extra is not None:
        if not isinstance(extra, dict):
            raise ConfigError(f"dataset_kwargs must be a dict, got {type(extra).__name__}")
        cfg["dataset_kwargs"] = {**cfg.get("dataset_kwargs", {}), **extra}
    cfg.update(overrides)
    return cfg


def recipe(name: str, data_root: str | Path | None = None, **overrides: Any) -> TrainConfig:
    """A validated TrainConfig from the named recipe, with `overrides` (TrainConfig fields) applied."""
    return TrainConfig(**recipe_dict(name, data_root, **overrides))


# the former names (notebooks, scripts and tests import them)
list_presets, preset_dict, preset = list_recipes, recipe_dict, recipe


# --------------------------------------------------------------------------- --set, for every command line
def parse_value(text: str) -> Any:
    """The project's one `--set` value syntax: a TOML value (2, 0.5, true, [1, 2], "x", {a = 1}),
    else a JSON value (null, {"a": 1}), else the text itself (bare words stay strings)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_assignments(items: Iterable[str], option: str = "--set") -> dict[str, Any]:
    """`NAME=VALUE` strings (repeated --set options) -> {NAME: parse_value(VALUE)}; ConfigError otherwise."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{option} {item!r}: expected NAME=VALUE")
        key, value = item.split("=", 1)
        out[key.strip()] = parse_value(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Print a recipe's TrainConfig as JSON (`--set field=value` overrides, values as `parse_value` reads them)."""
    parser = argparse.ArgumentParser(
        prog="python -m fer_lib.training.presets", description=__doc__.split("\n")[0],
        epilog="Experiments (whole notebook pipelines, experiments/*.toml) are another namespace: "
               "python -m fer_lib pipeline --list-experiments.")
    parser.add_argument("name", nargs="?", help=f"training recipe, one of: {', '.join(RECIPES)}")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TrainConfig field (value: TOML, else JSON, else a string)")
    parser.add_argument("--list", action="store_true", help="list the training recipes")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = parser.parse_args(argv)
    return run_cli(lambda: _main(args), args.debug)


def _main(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        print("training recipes (python -m fer_lib.training.presets NAME; experiments: "
              "python -m fer_lib pipeline --list-experiments):")
        for name, doc in list_recipes().items():
            print(f"  {name:18s} {doc}")
        return 0
    overrides = parse_assignments(args.set)
    data_root = overrides.pop("data_root", args.data_root)   # --set data_root=... is --data-root
    config = recipe(args.name, data_root, **overrides)
    print(json.dumps(config.to_dict(), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
