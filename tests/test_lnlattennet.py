"""fer_lib.models.lnlattennet: shapes, region weights, the TappedModel contract, training, blanked regions."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fer_lib.models.lnlattennet import (LNL_BACKBONES, LNLAttenNet, build_lnlattennet, lnl_from_config, lnl_layers,
                                 split_regions)
from fer_lib.training.losses import AUGuidedLoss
from fer_lib.metrics import map_cosine
from fer_lib.utils import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parent))
SMALL = dict(dim=32, trunk_channels=32, local_channels=(8, 16, 16))


@pytest.mark.parametrize("backbone", ["lnlattennet", "lnlattennet_shared"])
@pytest.mark.parametrize("size", [64, 96, 112, 128])
def test_output_shapes_and_weights_sum_to_one(backbone, size):
    torch.manual_seed(0)
    model = build_lnlattennet(num_classes=7, image_size=size, backbone=backbone, layers=("last", "trunk"),
                              **SMALL).eval()
    x = torch.randn(3, 3, size, size)
    with torch.no_grad():
        logits, maps = model(x)
        weights = model.region_weights(x)
    assert logits.shape == (3, 7)
    assert maps[0].shape == (3, 1, 4, 4)
    assert maps[1].shape == (3, 32, size // 8, size // 8)
    assert weights.shape == (3, 16)
    assert torch.allclose(weights.sum(1), torch.ones(3), atol=1e-5)
    assert (weights > 0).all()
    assert torch.allclose(model.classify(x), logits, atol=1e-5)
    assert torch.equal(maps[0].flatten(1), weights)


def test_contract_taps_hooks_and_config():
    model = build_lnlattennet(image_size=64, layers=("trunk",), **SMALL).eval()
    assert model.tap_names == ["region_attention", "trunk"]  # the region map always comes first
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
             for n, m in zip(model.tap_names, model.tap_modules())]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _, maps = model(x)
    for h in hooks:
        h.remove()
    for name, feat in zip(model.tap_names, maps):
        assert torch.equal(model.to_spatial(seen[name]), feat)
    assert model.to_spatial(torch.rand(2, 16)).shape == (2, 1, 4, 4)
    for key in ("backbone", "num_classes", "layers", "tap_names", "image_size", "class_names", "mean", "std",
                "in_chans"):
        assert key in model.config
    assert model.config["class_names"][1] == "happiness"
    assert lnl_layers(("last",)) == ["region_attention"] and lnl_layers((1,)) == ["region_attention", "trunk"]


def test_rebuild_from_config_restores_the_model(tmp_path):
    model = build_lnlattennet(backbone="lnlattennet_shared", image_size=64, num_classes=5, **SMALL).eval()
    path = tmp_path / "m.pt"
    torch.save({"model_state": model.state_dict(), "model_config": model.config}, path)
    rebuilt = lnl_from_config(model.config)
    rebuilt.load_state_dict(torch.load(path)["model_state"])
    loaded = build_lnlattennet(backbone="lnlattennet_shared", image_size=64, num_classes=5, weights=path,
                               pretrained=True, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval().classify(x), model.classify(x))
        assert torch.allclose(loaded.classify(x), model.classify(x))


@pytest.mark.parametrize("kwargs,match", [
    (dict(backbone="lnl"), "valid choices: lnlattennet"),
    (dict(trunk="vgg"), "valid choices: conv, unet, resnet18, tf_efficientnet_lite0"),
    (dict(pretrained="imagenet"), "needs a timm trunk"),
    (dict(backbone="lnlattennet_shared_lite0", trunk_stage=9), "trunk_stage must be"),
    (dict(local="both"), "valid choices: separate, shared"),
    (dict(layers=("layer4",)), "valid choices"),
    (dict(image_size=16), "image_size must be"),
    (dict(pretrained=True), "never downloads"),
    (dict(heads=3), "valid options"),
])
def test_bad_parameters_fail_at_once(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        build_lnlattennet(**kwargs)


def test_split_regions_is_row_major():
    x = torch.arange(16.0).view(1, 1, 4, 4).repeat(1, 1, 1, 1)
    cells = split_regions(x, 4)  # 1x1 cells: the cell order is the pixel order
    assert cells.shape == (1, 16, 1, 1) and torch.equal(cells.flatten(), torch.arange(16.0))
    assert split_regions(torch.randn(2, 3, 30, 30), 4).shape == (2, 48, 8, 8)  # resized up to 32


def test_training_step_changes_parameters_and_lowers_the_loss():
    torch.manual_seed(0)
    model = build_lnlattennet(num_classes=3, image_size=32, **SMALL)
    x, y = torch.randn(12, 3, 32, 32), torch.arange(12) % 3
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(5):
        logits, _ = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = [k for k, v in model.state_dict().items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert any(k.startswith("region_attention.score") for k in changed)
    assert any(k.startswith("local_nets") for k in changed) and any(k.startswith("trunk") for k in changed)


def test_pretrained_lite0_trunk_loads_imagenet_and_learns(tmp_path):
    """lnlattennet_shared_lite0 with pretrained="imagenet": the trunk holds the packaged ImageNet tensors
    (cut at stage 4, 7x7 at 112 px), normalisation is lite0's, a checkpoint rebuilds it, and training
    steps lower the loss."""
    from fer_lib.models import build_model, load_checkpoint
    from fer_lib.models.checkpoints import load_file
    from fer_lib.models.timm_backbones import offline_weights_file

    torch.manual_seed(0)
    model = build_model("lnlattennet_shared_lite0", num_classes=3, image_size=64, layers=("last", "trunk"),
                        pretrained="imagenet")
    source = load_file(offline_weights_file("tf_efficientnet_lite0"))
    stem = next(iter(source.values()))  # the file's first tensor: the stem convolution
    assert torch.equal(model.trunk.body.conv_stem.weight, stem)
    assert isinstance(model.trunk.body.conv_head, torch.nn.Identity) and len(model.trunk.body.blocks) == 5  # cut
    assert model.config["mean"] == [0.5, 0.5, 0.5] and model.config["pretrained"] == "imagenet"
    fresh = build_model("lnlattennet_shared_lite0", num_classes=3, image_size=64)
    assert not torch.equal(fresh.trunk.body.conv_stem.weight, stem)
    x, y = torch.randn(12, 3, 64, 64), torch.arange(12) % 3
    assert model(x)[1][1].shape == (12, 112, 4, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = F.cross_entropy(model(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    path = tmp_path / "lnl.pt"
    torch.save({"model_state": model.state_dict(), "model_config": model.config}, path)
    rebuilt = lnl_from_config(model.config)
    rebuilt.load_state_dict(torch.load(path)["model_state"])
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval().classify(x), model.eval().classify(x), atol=1e-5)


def _blanked_data(n: int = 48, size: int = 32, blank: int = 5, seed: int = 0):
    """Label k puts a bright square in region INFORMATIVE[k]; region `blank` is zero in every image."""
    g = torch.Generator().manual_seed(seed)
    informative = (0, 7, 10, 15)
    y = torch.arange(n) % len(informative)
    x = 0.5 * torch.randn(n, 3, size, size, generator=g)
    c = size // 4
    for i in range(n):
        r = informative[int(y[i])]
        x[i, :, (r // 4) * c:(r // 4 + 1) * c, (r % 4) * c:(r % 4 + 1) * c] += 2.0
    x[:, :, (blank // 4) * c:(blank // 4 + 1) * c, (blank % 4) * c:(blank % 4 + 1) * c] = 0.0
    return x, y


def test_blanked_region_weight_falls():
    blank = 5
    torch.manual_seed(0)
    x, y = _blanked_data(blank=blank)
    model = build_lnlattennet(num_classes=4, image_size=32, backbone="lnlattennet", **SMALL)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()
    with torch.no_grad():
        start = model.region_weights(x).mean(0)
    trace = [float(start[blank])]
    model.train()
    for step in range(24):
        logits, _ = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 8 == 7:
            model.eval()
            with torch.no_grad():
                trace.append(float(model.region_weights(x).mean(0)[blank]))
            model.train()
    assert abs(trace[0] - 1 / 16) < 1e-6  # uniform at the start
    assert all(b < a for a, b in zip(trace, trace[1:])), trace  # falls at every check
    assert trace[-1] < 0.5 / 16, trace


def test_au_guidance_moves_region_weights_onto_the_au_map():
    torch.manual_seed(0)
    model = build_lnlattennet(num_classes=2, image_size=32, **SMALL)
    x, y = torch.randn(8, 3, 32, 32), torch.arange(8) % 2
    au = torch.zeros(8, 1, 32, 32)
    au[:, :, 16:, 16:] = 1.0  # AU evidence in the bottom-right 2x2 regions
    has = torch.ones(8, dtype=torch.bool)
    crit = AUGuidedLoss(au_weight=5.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    cos = []
    for _ in range(10):
        logits, maps = model(x)
        cos.append(float(map_cosine(maps[0].detach(), au, at="layer").mean()))
        loss, _ = crit(logits, maps, y, au, has)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert cos[0] == pytest.approx(0.5, abs=1e-4)  # uniform weights vs a quarter of the grid
    assert cos[-1] > cos[0] + 0.1


def test_trains_with_fer_lib_train_unchanged(tmp_path):
    """fer_lib.training.train's loop, loss, evaluation and checkpoints run the model by name, as a timm one."""
    import fer_lib.training.train as train_mod
    from _toy_data import toy_splits
    from fer_lib.models import build_model, load_checkpoint

    assert isinstance(build_model("lnlattennet", image_size=32), LNLAttenNet)
    cfg = train_mod.TrainConfig(backbone="lnlattennet", epochs=1, batch_size=16, image_size=32, lr=0.01,
                                au_weight=1.0, device="cpu", out_dir=str(tmp_path / "run"))
    result = train_mod.train(cfg, datasets=toy_splits(size=32, n_train=32, n_eval=14))
    assert set(result["test"]["att_cos"]) == {"region_attention"}
    assert 0 <= result["test"]["att_cos"]["region_attention"] <= 1
    model, ckpt = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert isinstance(model, LNLAttenNet) and LNL_BACKBONES[0] == "lnlattennet"
    torch.testing.assert_close(model.state_dict(), ckpt["model_state"])


def test_codebook_agreement_scores_perfect_and_uniform_weights():
    from fer_lib.models.lnlattennet import codebook_agreement

    g = torch.Generator().manual_seed(0)
    au = torch.rand(12, 16, generator=g) ** 4
    au = au / au.sum(1, keepdim=True)
    au[:3] = 0.0  # three samples without AUs (neutral): no map scores
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2])
    valid = au.amax(1) > 0
    perfect = {"weights": (au / au.sum(1, keepdim=True).clamp_min(1e-8)).numpy(), "au_grid": au.numpy(),
               "labels": labels.numpy(), "valid": valid.numpy(), "grid": 4}
    table = codebook_agreement(perfect, ["neutral", "a", "b"])
    assert table.loc["a", "pearson_class_mean"] == pytest.approx(1.0)
    assert table.loc["all", "att_cos_layer"] == pytest.approx(1.0)
    assert table.loc["all", "top_cell_hit"] == 1.0 and table.loc["all", "n_valid"] == 9
    assert table["att_cos_layer"].isna()["neutral"]
    uniform = dict(perfect, weights=torch.full((12, 16), 1 / 16).numpy())
    t2 = codebook_agreement(uniform, ["neutral", "a", "b"])
    assert t2.loc["all", "att_cos_layer"] == pytest.approx(t2.loc["all", "uniform_cos"])
    assert t2.loc["all", "att_cos_layer"] < 0.9
