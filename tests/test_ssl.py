"""ContraWarping (fer_lib.methods.ssl, fer_lib.methods.warps): warps, views, EMA, loss, pretraining, checkpoints, metrics."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fer_lib.methods.ssl import (ContraWarping, SSLConfig, UnlabelledImages, backbone_with_fresh_head, ema_momentum,
                         knn_predict, load_backbone, make_views, pretrain, retrieval_metrics)
from fer_lib.utils import ConfigError
from fer_lib.methods.warps import (GlobalAugConfig, WarpConfig, apply_view, au_anchor_points, au_field_maps,
                           displacement_at, field_gradient, identity_params, random_displacement,
                           sample_global_params, warp_images)


@pytest.fixture(scope="module")
def faces() -> UnlabelledImages:
    """12 synthetic faces (32 px) with their ground-truth anchors, generated in memory."""
    from fer_lib.faces.au import EXPRESSIONS
    from fer_lib.data.synthetic import SyntheticConfig, generate_sample

    cfg = SyntheticConfig(image_size=32, seed=3)
    samples = [generate_sample(EXPRESSIONS[i % 7], seed=3, split="train", index=i, config=cfg) for i in range(12)]
    images = torch.stack([torch.from_numpy(s.image.copy()).permute(2, 0, 1) for s in samples])
    return UnlabelledImages(images, np.stack([s.anchors for s in samples]), np.array([s.label for s in samples]))


def test_zero_displacement_is_the_identity():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 24, 24, generator=g)
    assert torch.equal(warp_images(images, torch.zeros(3, 2, 8, 8)), images)
    params = sample_global_params(3, GlobalAugConfig(), g)
    assert torch.equal(apply_view(images, params, torch.zeros(3, 2, 8, 8)), apply_view(images, params))
    # the identity global transformation with no warp reproduces the image (bilinear at pixel centres)
    torch.testing.assert_close(apply_view(images, identity_params(3)), images, atol=1e-5, rtol=0)
    # a zero magnitude samples zero fields
    assert random_displacement(4, WarpConfig(magnitude=0.0), g).abs().max() == 0


def test_a_nonzero_warp_moves_content_by_the_displacement():
    x = torch.linspace(0, 1, 40)
    ramp = x[None, None, None, :].expand(1, 3, 40, 40).contiguous()  # intensity = x coordinate
    d = torch.zeros(1, 2, 4, 4)
    d[:, 0] = 0.05  # backward field: out(p) = image(p + d)
    out = warp_images(ramp, d)
    inner = out[..., 5:-5] - ramp[..., 5:-5]
    torch.testing.assert_close(inner, torch.full_like(inner, 0.05 * 40 / 39), atol=2e-3, rtol=0)


@pytest.mark.parametrize("au_aware", [False, True])
@pytest.mark.parametrize("magnitude", [0.03, 0.08])
def test_warps_are_bounded_and_smooth(faces, au_aware, magnitude):
    cfg = WarpConfig(magnitude=magnitude, au_aware=au_aware)
    weight, points = faces.au_fields(cfg.field_size, cfg.au_sigma)
    g = torch.Generator().manual_seed(1)
    d = random_displacement(len(faces), cfg, g, weight, points)
    norm = d.norm(dim=1).flatten(1).amax(dim=1)
    assert d.shape == (len(faces), 2, cfg.field_size, cfg.field_size)
    assert (norm <= magnitude + 1e-6).all() and (norm >= cfg.min_strength * magnitude - 1e-6).all()
    up = displacement_at(d, 64)  # bilinear upsampling keeps the bound
    assert up.norm(dim=1).max() <= magnitude + 1e-6
    grad = field_gradient(d)
    assert (grad < 1.0).all(), "gradient >= 1 would fold the image"
    assert (grad <= 2.5 * magnitude / min(cfg.sigma, cfg.au_sigma)).all()


def test_au_aware_warps_concentrate_on_au_regions(faces):
    uniform, aware = WarpConfig(), WarpConfig(au_aware=True)
    weight, points = faces.au_fields(32, 0.05)  # narrow AU regions to measure against
    energy = {}
    for name, cfg in (("uniform", uniform), ("aware", aware)):
        w, p = faces.au_fields(cfg.field_size, cfg.au_sigma)
        d = random_displacement(len(faces), cfg, torch.Generator().manual_seed(2), w, p)
        m2 = (d ** 2).sum(dim=1)
        energy[name] = float(((m2 * weight).flatten(1).sum(1) / m2.flatten(1).sum(1)).mean())
    assert energy["aware"] > energy["uniform"] + 0.05, energy
    # faces without landmarks fall back to uniform warps (ones weight, finite field)
    maps, valid = au_field_maps(np.full((2, faces.anchors.shape[1], 2), np.nan, np.float32), 16)
    assert not valid.any() and (maps == 1).all()
    pts = torch.from_numpy(au_anchor_points(np.full((2, faces.anchors.shape[1], 2), np.nan, np.float32)))
    d = random_displacement(2, aware, torch.Generator().manual_seed(0), torch.from_numpy(maps), pts)
    assert torch.isfinite(d).all() and d.abs().max() > 0


def test_positives_and_negatives_come_from_the_same_source(faces):
    x = faces.images.float() / 255
    w, p = faces.au_fields(32, 0.10)
    same = make_views(x, WarpConfig(magnitude=0.0), GlobalAugConfig(), torch.Generator().manual_seed(5), w, p)
    assert torch.equal(same["n1"], same["v1"]) and torch.equal(same["n2"], same["v2"])
    views = make_views(x, WarpConfig(), GlobalAugConfig(), torch.Generator().manual_seed(5), w, p)
    assert not torch.equal(views["n1"], views["v1"])
    flat = {k: views[k].flatten(1) for k in ("v1", "n1")}
    a = flat["n1"] - flat["n1"].mean(1, keepdim=True)
    b = flat["v1"] - flat["v1"].mean(1, keepdim=True)
    corr = (a / a.norm(dim=1, keepdim=True)) @ (b / b.norm(dim=1, keepdim=True)).T
    # each negative correlates best with the positive of its own source face
    assert (corr.argmax(dim=1) == torch.arange(len(x))).all()
    # and differs from it only where the warp displaces pixels
    diff = (views["n1"] - views["v1"]).abs().amax(dim=1)
    assert diff.mean() < 0.2 * (views["v1"] - views["v1"].roll(1, dims=0)).abs().amax(dim=1).mean()


def test_ema_moves_the_target_toward_the_online_network():
    torch.manual_seed(0)
    model = ContraWarping("resnet18", 32, proj_dim=16, hidden_dim=32)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))

    @torch.no_grad()
    def distance() -> float:
        return float(sum(((t - o) ** 2).sum() for t, o in zip(model.target_encoder.parameters(),
                                                                model.encoder.parameters())).sqrt())

    before = distance()
    assert before > 0
    model.update_target(0.9)
    assert distance() == pytest.approx(0.9 * before, rel=1e-4)
    model.update_target(1.0)
    assert distance() == pytest.approx(0.9 * before, rel=1e-4)
    model.update_target(0.0)
    assert distance() == 0.0
    assert not any(p.requires_grad for p in model.target_parameters())
    assert ema_momentum(0.99, 0, 100) == pytest.approx(0.99) and ema_momentum(0.99, 100, 100) == 1.0


def test_loss_pushes_the_warped_negative_away():
    torch.manual_seed(0)
    model = ContraWarping("resnet18", 32, proj_dim=16, hidden_dim=32)
    v = torch.randn(4, 3, 32, 32)
    loss_b, stats_b = model.loss(v, v, v, v, objective="byol")
    loss_n, stats_n = model.loss(v, v, v, v, objective="infonce", temperature=0.2)
    assert "s_neg" not in stats_b and stats_n["s_neg"] == pytest.approx(stats_n["s_pos"], abs=1e-5)
    # identical negative and positive: the InfoNCE term is log 2 on top of the BYOL term
    assert float((loss_n - loss_b).detach()) == pytest.approx(np.log(2), abs=1e-3)
    with pytest.raises(ConfigError, match="valid choices"):
        model.loss(v, v, v, v, objective="simclr")


def test_tiny_pretraining_lowers_its_loss_and_saves_a_loadable_backbone(faces, tmp_path):
    from fer_lib.models import build_model

    cfg = SSLConfig(backbone="resnet18", epochs=3, batch_size=6, lr=2e-3, proj_dim=32, hidden_dim=64,
                    au_aware=True, symmetric=False, device="cpu", out_dir=str(tmp_path / "run"))
    summary = pretrain(cfg, faces, progress=False)
    losses = [h["loss"] for h in summary["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0], losses
    assert summary["n_with_anchors"] == len(faces)
    path = tmp_path / "run" / "checkpoints" / "backbone.pt"
    state = torch.load(path, weights_only=True)
    assert not any(k.startswith("fc.") for k in state), "the classifier is not saved"
    assert json.loads(path.with_suffix(".json").read_text())["backbone"] == "resnet18"
    net = load_backbone(path, "resnet18", 32)
    assert torch.equal(net.state_dict()["conv1.weight"], state["conv1.weight"])
    full = backbone_with_fresh_head(path, "resnet18", tmp_path / "full.pt", num_classes=7, image_size=32)
    model = build_model("resnet18", pretrained=True, weights=str(full), image_size=32)
    assert torch.equal(model.net.state_dict()["layer4.1.conv2.weight"], state["layer4.1.conv2.weight"])
    # the same configuration returns the finished run; another one is refused
    assert pretrain(cfg, faces, progress=False)["history"] == summary["history"]
    with pytest.raises(ConfigError, match="another configuration"):
        pretrain(SSLConfig(**{**cfg.__dict__, "epochs": 5}), faces, progress=False)


def test_classifier_free_backbone_loads_into_build_model(tmp_path):
    """The contract with fer_lib.training.train: backbone.pt -> build_model(backbone, pretrained=True, weights=PATH)."""
    from fer_lib.models import build_model
    from fer_lib.methods.ssl import create_backbone, save_backbone

    torch.manual_seed(1)
    path = save_backbone(create_backbone("resnet18", 32), tmp_path / "backbone.pt", {"backbone": "resnet18"})
    state = torch.load(path, weights_only=True)
    assert state and not any(k.startswith("fc.") for k in state)
    direct = build_model("resnet18", pretrained=True, weights=str(path), image_size=32)
    assert torch.equal(direct.net.state_dict()["conv1.weight"], state["conv1.weight"])


def test_unlabelled_images_from_a_tuple_dataset_undo_the_normalisation():
    from _toy_data import ToyFER

    ds = ToyFER(n=5, size=16)
    images = UnlabelledImages.from_dataset(ds, progress=False)
    expect = (ds.images[2] * 0.25 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images.images[2].float() / 255, expect, atol=1 / 255, rtol=0)
    assert images.labels.tolist() == ds.labels.tolist() and not images.has_anchors.any()


def test_retrieval_and_knn_on_known_features():
    x = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], np.float32)
    y = np.array([0, 0, 1, 1])
    r = retrieval_metrics(x, y, x, y, ks=(1, 2), exclude_self=True)
    assert r["precision@1"] == 1.0 and r["mAP"] == 1.0 and r["precision@2"] == 0.5
    # one query, gallery ranked [wrong, right, right]: AP = (1/2 + 2/3) / 2
    q = np.array([[1.0, 0.0]])
    g = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8]])
    r = retrieval_metrics(q, np.array([1]), g, np.array([0, 1, 1]), ks=(1,))
    assert r["precision@1"] == 0.0 and r["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert knn_predict(x, y, np.array([[1.0, 0.05], [0.05, 1.0]]), k=3, n_classes=2).tolist() == [0, 1]


def test_invalid_parameters_fail_at_once_listing_the_choices():
    with pytest.raises(ConfigError, match="infonce"):
        SSLConfig(objective="simclr")
    with pytest.raises(ConfigError, match="magnitude"):
        WarpConfig(magnitude=-0.1)
    with pytest.raises(ConfigError, match="unknown backbone"):
        SSLConfig(backbone="resnet_nope")
    with pytest.raises(ConfigError, match="batch_size"):
        SSLConfig(batch_size=1)


@pytest.mark.slow
def test_notebook07_smoke(tmp_path):
    from test_notebooks import run_notebook

    out_dir = tmp_path / "out"
    nb = run_notebook("07_contrawarping.ipynb", tmp_path, image_size=32, epochs=1, batch_size=8,
                      dataset_kwargs={"n_per_class": {"train": 3, "val": 1, "test": 2}, "progress": False},
                      ablation=False, supervised_epochs=1, max_steps_per_epoch=1, symmetric=False, device="cpu",
                      output_dir=str(out_dir))
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert {row["backbone"] for row in metrics["table"]} == {"random_init", "contrawarping", "supervised"}
    assert metrics["run"]["config"]["image_size"] == 32
    for figure in metrics["figures"]:
        assert (out_dir / figure).stat().st_size > 1000
    assert (out_dir / "runs" / "contrawarping" / "checkpoints" / "backbone.pt").is_file()


def test_encoder_can_start_from_imagenet_and_probes_report_intervals():
    """pretrained="imagenet": the encoder (and its EMA target) hold lite0's packaged ImageNet tensors; the probe
    accuracies come with 95% Wilson intervals over the test items."""
    from fer_lib.methods.ssl import ExperimentConfig, create_backbone, evaluate_representation
    from fer_lib.models.checkpoints import load_file
    from fer_lib.models.timm_backbones import offline_weights_file

    stem = next(iter(load_file(offline_weights_file("tf_efficientnet_lite0")).values()))
    model = ContraWarping("tf_efficientnet_lite0", 32, proj_dim=16, hidden_dim=32, pretrained="imagenet")
    assert torch.equal(model.encoder.conv_stem.weight, stem) and torch.equal(model.target_encoder.conv_stem.weight, stem)
    assert not torch.equal(create_backbone("tf_efficientnet_lite0", 32).conv_stem.weight, stem)
    assert SSLConfig(backbone="tf_efficientnet_lite0", pretrained="ImageNet").pretrained == "imagenet"
    assert ExperimentConfig(backbone="tf_efficientnet_lite0", pretrained="imagenet").ssl_config("main").pretrained == "imagenet"
    with pytest.raises(ConfigError, match="pretrained"):
        SSLConfig(pretrained="imagenet21k")
    g = torch.Generator().manual_seed(0)
    items = [(torch.randn(3, 32, 32, generator=g) + 2.0 * (i % 2), i % 2) for i in range(24)]
    r = evaluate_representation(create_backbone("resnet18", 32), items[:16], items[16:], ["a", "b"], progress=False)
    for key in ("linear_probe", "knn"):
        low, high = r[key]["accuracy_ci"]
        assert 0.0 <= low <= r[key]["accuracy"] <= high <= 1.0 and high - low > 0.1  # 8 test items: wide
