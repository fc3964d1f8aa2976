"""The trained interpretable methods of Table 1 (fer_lib.models.wsol): maps, learning, input response."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fer_lib.models import build_model, list_models, model_from_config
from fer_lib.utils import ConfigError

METHODS = ("wildcat", "acol", "prm", "adl", "cutmix", "tscam", "apvit")
TRUNK = {"tscam": "deit_tiny_patch16_224"}


def small(method: str):
    torch.manual_seed(0)
    return build_model(f"{method}:{TRUNK.get(method, 'resnet18')}", num_classes=3, image_size=64, layers=("last",))


def test_the_methods_are_registered_models():
    assert set(METHODS) <= set(list_models())
    with pytest.raises(ConfigError, match="transformer; this method takes a CNN trunk"):
        build_model("wildcat:vit_tiny_patch16_224", image_size=64)
    with pytest.raises(ConfigError, match="unknown build_model option|unknown option"):
        build_model("prm:resnet18", image_size=64, options={"modalities": 3})


@pytest.mark.parametrize("method", METHODS)
def test_maps_shape_range_and_checkpoint_rebuild(method):
    model = small(method).eval()
    x = torch.randn(2, 3, 64, 64)
    logits, feats = model(x)
    maps = model.net.class_maps(x)
    side = 4 if method == "tscam" else 2  # 16 px patches / stride 32
    assert logits.shape == (2, 3) and maps.shape == (2, 3, side, side) and feats[0].shape[-2:] == (side, side)
    assert torch.isfinite(maps).all()
    rebuilt = model_from_config(model.config)
    rebuilt.load_state_dict(model.state_dict())
    assert torch.allclose(rebuilt.eval()(x)[0], logits, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_a_few_training_steps_lower_the_loss(method):
    model = small(method).train()
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 64, 64), torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_now() -> torch.Tensor:
        logits, _ = model(x)
        loss = F.cross_entropy(logits, y)
        aux = model.net.aux_loss(y)
        return loss + aux if aux is not None else loss

    with torch.no_grad():
        model.eval()
        before = float(loss_now())
        model.train()
    for _ in range(8):
        opt.zero_grad()
        loss_now().backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        assert float(loss_now()) < before


@pytest.mark.parametrize("method", METHODS)
def test_the_maps_respond_to_the_input(method):
    model = build_model(f"{method}:{TRUNK.get(method, 'resnet18')}", num_classes=3, image_size=96,
                        layers=("last",)).eval()
    torch.manual_seed(2)
    x = torch.randn(1, 3, 96, 96)
    occluded = x.clone()
    occluded[..., :48, :48] = 0.0  # one quadrant hidden
    a, b = model.net.class_maps(x), model.net.class_maps(occluded)
    h = a.shape[-1]
    assert a.shape[:2] == (1, 3) and not torch.allclose(a, b)
    change = (a - b).abs()
    if method != "apvit":  # APViT re-selects its patches and tokens, so its whole map moves
        assert change[..., : h // 2, : h // 2].mean() > change[..., h - h // 2:, h - h // 2:].mean()  # most where hidden


def test_adl_drops_only_in_training():
    model = small("adl")
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    model.train()
    torch.manual_seed(3)
    assert not torch.allclose(model(x)[0], model.eval()(x)[0])


def test_cutmix_pastes_one_box_into_images_and_au_maps_and_mixes_labels_by_area():
    from fer_lib.models.wsol import cutmix_batch

    torch.manual_seed(4)
    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 64, 64).clone()  # image i is filled with i
    maps = torch.arange(4.0)[:, None, None, None].expand(4, 1, 16, 16).clone()
    has = torch.tensor([True, True, False, True])
    mixed, mixed_maps, mixed_has, perm, lam = cutmix_batch(images, maps, has, generator=torch.Generator().manual_seed(0))
    pasted = mixed[:, 0] != images[:, 0]
    share = pasted.float().mean(dim=(1, 2))
    moved = perm != torch.arange(4)
    assert moved.any()
    assert torch.allclose(share[moved], torch.full_like(share[moved], 1 - lam))  # one box, its area is 1 - lam
    assert torch.equal(mixed[:, 0][pasted], images[perm][:, 0][pasted])  # the box comes from the partner
    assert torch.equal(mixed_has, has & has[perm])
    assert ((mixed_maps != maps).float().mean(dim=(1, 2, 3))[moved] > 0).all()  # the AU maps get the same box


@pytest.mark.parametrize("method", ["acol", "cutmix"])
def test_the_training_step_adds_the_methods_own_objectives(method, monkeypatch):
    from fer_lib.training.losses import AUGuidedLoss
    from fer_lib.training.step import AUGuidedStep

    model = small(method).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    step = AUGuidedStep(model, opt, criterion=AUGuidedLoss(au_weight=0.0))
    torch.manual_seed(5)
    batch = (torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 0]), torch.rand(4, 1, 64, 64), torch.ones(4).bool())
    calls = []
    if method == "cutmix":
        model.net.mixing = (1.0, 1.0)  # mix every batch
        real = AUGuidedStep.compute_loss.__globals__["cutmix_batch"]
        monkeypatch.setitem(AUGuidedStep.compute_loss.__globals__, "cutmix_batch",
                            lambda *a, **k: calls.append(1) or real(*a, **k))
    loss, (logits, _, parts) = step.compute_loss(batch)
    ce = float(F.cross_entropy(logits.detach(), batch[1]))
    if method == "acol":  # CE of branch A + CE of the erased branch B
        assert float(loss.detach()) == pytest.approx(ce + float(model.net.aux_loss(batch[1]).detach()), rel=1e-5)
    else:
        assert calls == [1] and float(loss.detach()) != pytest.approx(ce, rel=1e-6)


@pytest.mark.parametrize("method", ["wildcat", "tscam"])
def test_cam_cos_uses_the_methods_own_maps(method):
    from fer_lib.analysis.interpret import compute_cams, minmax_scale, upsample_maps

    model = small(method).eval()
    x = torch.randn(2, 3, 64, 64)
    cams = compute_cams(model, x, "cam", torch.tensor([1, 2]))
    own = model.net.class_maps(x)[torch.arange(2), torch.tensor([1, 2])].clamp_min(0)
    assert cams.shape == (2, 64, 64) and float(cams.min()) >= 0 and float(cams.max()) <= 1
    assert torch.allclose(cams, minmax_scale(upsample_maps(own[:, None], 64))[:, 0], atol=1e-5)
    other = compute_cams(model, x, "cam", torch.tensor([0, 0]))
    assert not torch.allclose(other, cams)  # another class, another map
