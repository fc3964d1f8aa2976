"""fer_lib.training.losses (masked AU alignment) and fer_lib.metrics (map cosine, classification)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fer_lib.faces.au import valid_map_mask
from fer_lib.training.losses import AU_LOSSES, AUGuidedLoss, alignment, resize_map
from fer_lib.metrics import classification_metrics, map_cosine
from fer_lib.utils import ConfigError


def _blob_maps(b: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(b, 2, generator=g) * 0.6 + 0.2
    ys = (torch.arange(size) + 0.5) / size
    gy = torch.exp(-((ys[None] - centres[:, 1:2]) ** 2) / 0.02)
    gx = torch.exp(-((ys[None] - centres[:, 0:1]) ** 2) / 0.02)
    return (gy[:, :, None] * gx[:, None, :])[:, None]


def test_resize_map_is_area_interpolation():
    m = torch.rand(3, 1, 64, 64)
    small = resize_map(m, (8, 8))
    assert small.shape == (3, 1, 8, 8)
    assert torch.allclose(small.mean(dim=(2, 3)), m.mean(dim=(2, 3)), atol=1e-6)
    assert torch.allclose(small[0, 0, 0, 0], m[0, 0, :8, :8].mean())


@pytest.mark.parametrize("kind", [k for k in AU_LOSSES if k != "std_cosine"])  # std_cosine: see below
def test_alignment_is_zero_when_aligned_and_larger_when_not(kind):
    target = _blob_maps(4, 8, seed=1)[:, 0]
    other = _blob_maps(4, 8, seed=2)[:, 0].flip(-1)
    aligned = alignment(3.0 * target[:, None], target[:, None], kind)  # scale must not matter
    misaligned = alignment(other[:, None], target[:, None], kind)
    assert aligned.shape == (4,)
    assert torch.all(aligned.abs() < 1e-3)
    assert torch.all(misaligned > aligned + 1e-3)


def test_loss_is_ce_plus_lambda_times_masked_cosine():
    torch.manual_seed(0)
    b, size = 6, 32
    logits, labels = torch.randn(b, 7), torch.randint(0, 7, (b,))
    feats = [torch.rand(b, 5, 4, 4), torch.rand(b, 3, 8, 8)]
    maps = _blob_maps(b, size)
    has = torch.tensor([True, True, False, True, True, True])
    maps[4] = 0.0  # e.g. neutral: no AU
    loss, parts = AUGuidedLoss(au_weight=9.0)(logits, feats, labels, maps, has)
    valid = torch.tensor([0, 1, 3, 5])
    expected_au = torch.stack([
        (1 - F.cosine_similarity(f.mean(1).flatten(1)[valid],
                                 F.adaptive_avg_pool2d(maps, f.shape[-2:]).flatten(1)[valid], dim=1)).mean()
        for f in feats]).mean()
    ce = F.cross_entropy(logits, labels)
    assert parts.n_valid == 4
    assert parts.au == pytest.approx(float(expected_au), rel=1e-5)
    assert float(loss) == pytest.approx(float(ce + 9.0 * expected_au), rel=1e-5)


def test_invalid_samples_do_not_change_the_au_term():
    torch.manual_seed(0)
    feats = [torch.rand(4, 8, 4, 4, requires_grad=True)]
    maps, labels = _blob_maps(4, 16), torch.tensor([1, 2, 3, 0])
    has = torch.ones(4, dtype=torch.bool)
    crit = AUGuidedLoss(1.0)
    _, base = crit(torch.zeros(4, 7), feats, labels, maps, has)
    garbage = torch.cat([feats[0].detach(), 100 * torch.rand(2, 8, 4, 4)])
    maps2 = torch.cat([maps, torch.zeros(1, 1, 16, 16), _blob_maps(1, 16, seed=5)])
    has2 = torch.cat([has, torch.tensor([True, False])])  # zero map; no landmarks
    _, more = crit(torch.zeros(6, 7), [garbage], torch.cat([labels, torch.tensor([0, 1])]), maps2, has2)
    assert more.au == pytest.approx(base.au, rel=1e-6)
    assert valid_map_mask(maps2, has2).tolist() == [True] * 4 + [False, False]


def test_batch_without_valid_maps_gives_ce_only_and_still_backprops():
    feats = [torch.rand(3, 4, 4, 4, requires_grad=True)]
    logits = torch.randn(3, 7, requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    loss, parts = AUGuidedLoss(9.0)(logits, feats, labels, torch.zeros(3, 1, 16, 16), torch.ones(3, dtype=torch.bool))
    assert parts.au == 0.0 and parts.n_valid == 0
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(logits, labels).detach()))
    loss.backward()
    assert torch.isfinite(feats[0].grad).all() and feats[0].grad.abs().sum() == 0


def test_au_gradient_moves_attention_towards_the_map():
    maps = _blob_maps(2, 16, seed=3)
    feats = torch.rand(2, 4, 8, 8, requires_grad=True)
    opt = torch.optim.SGD([feats], lr=5.0)
    crit = AUGuidedLoss(1.0)
    first = None
    for _ in range(20):
        loss, parts = crit(torch.zeros(2, 7), [feats], torch.tensor([1, 1]), maps, torch.ones(2, dtype=torch.bool))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = parts.au if first is None else first
    assert parts.au < 0.5 * first


def test_label_smoothing_and_bad_parameters():
    logits, labels = torch.randn(5, 7), torch.randint(0, 7, (5,))
    _, parts = AUGuidedLoss(0.0, label_smoothing=0.1)(logits, [], labels, torch.zeros(5, 1, 8, 8), torch.ones(5, dtype=torch.bool))
    assert parts.ce == pytest.approx(float(F.cross_entropy(logits, labels, label_smoothing=0.1)), rel=1e-6)
    with pytest.raises(ConfigError, match=">= 0"):
        AUGuidedLoss(au_weight=-1.0)
    with pytest.raises(ConfigError, match="cosine, l1, l2, kl"):
        AUGuidedLoss(kind="dice")


# --------------------------------------------------------------------------- metrics
def test_map_cosine_image_and_layer_resolution():
    target = _blob_maps(3, 32)
    small = F.adaptive_avg_pool2d(target, (8, 8))
    assert torch.allclose(map_cosine(small, small, at="layer"), torch.ones(3), atol=1e-6)
    assert torch.allclose(map_cosine(small, target, at="layer"), torch.ones(3), atol=1e-6)
    at_image = map_cosine(small, target, at="image")
    assert torch.all(at_image > 0.9) and torch.all(at_image < 1.0)
    assert torch.allclose(at_image, F.cosine_similarity(
        F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False).flatten(1), target.flatten(1)))
    assert map_cosine(torch.zeros(1, 1, 4, 4), target[:1]).item() == 0.0
    with pytest.raises(ValueError, match="image, layer"):
        map_cosine(small, target, at="pixel")


def test_classification_metrics_match_sklearn():
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 6, 200)  # class 6 never occurs in y_true
    y_pred = np.where(rng.random(200) < 0.6, y_true, rng.integers(0, 7, 200))
    names = [f"c{i}" for i in range(7)]
    m = classification_metrics(y_true, y_pred, names)
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["confusion"] == confusion_matrix(y_true, y_pred, labels=range(7)).tolist()
    assert m["per_class_accuracy"]["c0"] == pytest.approx(np.mean(y_pred[y_true == 0] == 0))
    assert m["per_class_accuracy"]["c6"] is None
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 9], [0, 1], names)


def test_std_cosine_ignores_the_attention_offset_and_scale_and_prefers_the_aligned_map():
    target = _blob_maps(4, 8, seed=1)[:, 0][:, None]
    other = _blob_maps(4, 8, seed=2)[:, 0].flip(-1)[:, None]
    base = alignment(target, target, "std_cosine")
    assert torch.allclose(alignment(3.0 * target + 5.0, target, "std_cosine"), base, atol=1e-4)
    assert not torch.allclose(alignment(target + 5.0, target, "cosine"), alignment(target, target, "cosine"))
    assert torch.all(alignment(other, target, "std_cosine") > base + 1e-3)


def test_random_avg_attention_and_the_reference_resize():
    from fer_lib.training.losses import random_channel_attention

    torch.manual_seed(0)
    feat = torch.rand(3, 16, 5, 5)
    assert torch.equal(random_channel_attention(feat, 1.0), feat.mean(dim=1, keepdim=True))
    torch.manual_seed(1)
    half = random_channel_attention(feat, 0.5)
    torch.manual_seed(1)
    keep = torch.bernoulli(torch.full((3, 16), 0.5))
    expected = torch.stack([feat[i, keep[i].bool()].mean(dim=0, keepdim=True) for i in range(3)])
    assert torch.allclose(half, expected) and not torch.allclose(half, feat.mean(dim=1, keepdim=True))
    with pytest.raises(ConfigError, match="attention_p"):
        random_channel_attention(feat, 0.0)
    m = _blob_maps(2, 56, seed=3)
    small = resize_map(m, (7, 7), "bilinear_clamp")
    assert small.shape == (2, 1, 7, 7)
    assert torch.all(small >= m.flatten(1).amin(1)[:, None, None, None] - 1e-7)
    assert torch.all(small <= m.flatten(1).amax(1)[:, None, None, None] + 1e-7)
    assert not torch.allclose(small, resize_map(m, (7, 7), "area"))
    # the loss uses random_avg only while training; evaluation keeps the channel mean
    crit = AUGuidedLoss(9.0, attention="random_avg", attention_p=0.5, au_resize="bilinear_clamp")
    assert torch.equal(crit.eval().layer_attention(feat), feat.mean(dim=1, keepdim=True))
    with pytest.raises(ConfigError, match="valid choices: mean, random_avg"):
        AUGuidedLoss(9.0, attention="max")


def test_reference_readme_preset_sets_the_reference_options():
    from fer_lib.training.presets import preset
    from fer_lib.training.train import TrainConfig, _make_scheduler

    cfg = preset("reference_readme", data_root="/data/RAF-DB")
    assert (cfg.attention, cfg.attention_p, cfg.au_resize, cfg.au_loss) == ("random_avg", 1.0, "bilinear_clamp", "cosine")
    assert (cfg.backbone, cfg.image_size, cfg.layers, cfg.au_weight) == ("resnet50", 224, ("last",), 9.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _make_scheduler(opt, cfg, steps_per_epoch=1)
    for _ in range(4):
        opt.step()
        sched.step()
    assert abs(opt.param_groups[0]["lr"] - 0.9) < 1e-9  # step 4 / gamma 0.9, as the reference
    with pytest.raises(ConfigError, match="step_gamma"):
        TrainConfig(step_gamma=0.0)
