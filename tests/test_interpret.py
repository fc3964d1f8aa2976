"""fer_lib.analysis.interpret: layer attention, CAMs, agreement metrics vs AU maps, faithfulness, figures."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fer_lib import interpret as I
from fer_lib.analysis import evaluate as E
from fer_lib.faces.au import EXPRESSIONS, render_heatmaps
from fer_lib.faces.landmarks import ANCHORS
from fer_lib.models import build_model
from fer_lib.utils import ConfigError

SIZE = 32


# ----------------------------------------------------------------------------- fixtures
class ProbeNet(nn.Module):
    """A 'timm-like' net whose last features are the image itself: GAP + Linear head."""

    def __init__(self, num_classes: int = 7, in_chans: int = 3, shuffle: bool = False, size: int = SIZE):
        super().__init__()
        self.feat = nn.Conv2d(in_chans, in_chans, 1, bias=False)
        with torch.no_grad():
            self.feat.weight.copy_(torch.eye(in_chans)[:, :, None, None])
        self.head = nn.Linear(in_chans, num_classes)
        with torch.no_grad():  # every class weighs the features positively: CAM = scaled image
            self.head.weight.copy_(torch.linspace(0.5, 2.0, num_classes)[:, None].expand(-1, in_chans) * 4)
            self.head.bias.copy_(-torch.linspace(0.0, 1.0, num_classes))
        perm = torch.randperm(size * size, generator=torch.Generator().manual_seed(1)) if shuffle else None
        self.register_buffer("perm", perm if perm is not None else torch.arange(size * size))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.feat(x)
        b, c, h, w = f.shape
        return f.flatten(2)[:, :, self.perm].view(b, c, h, w)

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(dim=(2, 3)))


class ProbeModel(nn.Module):
    """Follows the TappedModel contract; its attention is the (optionally pixel-shuffled) image."""

    def __init__(self, shuffle: bool = False):
        super().__init__()
        self.net = ProbeNet(shuffle=shuffle)
        self.tap_names = ["feat"]
        self.config = {"backbone": "probe", "class_names": list(EXPRESSIONS), "mean": [0.0] * 3, "std": [1.0] * 3}

    def tap_modules(self) -> list[nn.Module]:
        return [self.net.feat]

    def to_spatial(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def forward(self, x):
        f = self.net.forward_features(x)
        return self.net.head(f.mean(dim=(2, 3))), [f]

    def classify(self, x):
        return self.net(x)


class MapDataset(torch.utils.data.Dataset):
    """Contract-1 samples whose image is the AU map itself (3 channels)."""

    def __init__(self, n_per_class: int = 2, size: int = SIZE, seed: int = 0):
        rng = np.random.default_rng(seed)
        labels = np.repeat(np.arange(len(EXPRESSIONS)), n_per_class)
        anchors = rng.uniform(0.2, 0.8, (len(labels), len(ANCHORS), 2)).astype(np.float32)  # any layout will do
        anchors[-1] = np.nan  # the last face has no landmarks
        maps, valid = render_heatmaps(torch.from_numpy(anchors), torch.from_numpy(labels), size)
        self.maps, self.valid = maps, valid
        self.labels = torch.from_numpy(labels)
        self.has_landmarks = torch.from_numpy(np.isfinite(anchors).all(axis=(1, 2)))
        self.class_names = list(EXPRESSIONS)
        self.mean, self.std, self.image_size = [0.0] * 3, [1.0] * 3, size
        self.records = [{"label": int(l)} for l in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        m = self.maps[i][None]
        return m.expand(3, -1, -1).clone(), self.labels[i], m.clone(), self.has_landmarks[i]


@pytest.fixture(scope="module")
def map_data() -> MapDataset:
    return MapDataset()


def _loader(ds, bs: int = 5):
    return torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=False)


# ----------------------------------------------------------------------------- metrics by hand
def test_metrics_match_hand_computation():
    pred = torch.tensor([[1.0, 2.0], [0.0, 1.0]])[None, None]
    target = torch.tensor([[0.5, 1.0], [0.0, 0.05]])[None, None]
    p, t = pred.flatten().numpy().astype(float), target.flatten().numpy().astype(float)
    cos = p @ t / (np.linalg.norm(p) * np.linalg.norm(t))
    pc, tc = p - p.mean(), t - t.mean()
    pearson = pc @ tc / (np.linalg.norm(pc) * np.linalg.norm(tc))
    energy = (1.0 + 2.0) / 4.0  # target > 0.1 at (0,0) and (0,1)
    scores = I.map_scores(pred, target, threshold=0.1)
    assert scores["cosine"].item() == pytest.approx(cos, abs=1e-6)
    assert scores["pearson"].item() == pytest.approx(pearson, abs=1e-6)
    assert scores["energy_ratio"].item() == pytest.approx(energy, abs=1e-6)
    assert I.region_fraction(target, 0.1).item() == pytest.approx(0.5)
    # threshold matters, negatives count as zero mass, constant / empty maps give NaN
    assert I.energy_ratio(pred, target, threshold=0.7).item() == pytest.approx(2.0 / 4.0)
    assert I.energy_ratio(pred - 1.0, target).item() == pytest.approx(1.0)
    assert math.isnan(I.map_pearson(torch.ones(1, 1, 2, 2), target).item())
    assert math.isnan(I.energy_ratio(torch.zeros(1, 1, 2, 2), target).item())


def test_metrics_resize_pred_to_target():
    target = torch.zeros(1, 1, 8, 8)
    target[..., :4, :] = 1.0
    pred = torch.tensor([[1.0], [0.0]]).view(1, 1, 2, 1).expand(1, 1, 2, 2)  # top half on at 2x2
    assert I.map_pearson(pred, target).item() > 0.8
    assert I.energy_ratio(pred, target, 0.5).item() > 0.8


def test_minmax_scale_and_valid_mask():
    m = torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]])[:, None]
    s = I.minmax_scale(m)
    assert torch.allclose(s[0].flatten(), torch.tensor([0.0, 1.0]))
    assert torch.all(s[1] == 0)
    au = torch.zeros(3, 1, 2, 2)
    au[0, 0, 0, 0] = 1
    au[2, 0, 1, 1] = 0.5
    valid = I.valid_au_mask(au, torch.tensor([True, True, False]))
    assert valid.tolist() == [True, False, False]


# ----------------------------------------------------------------------------- ATT-COS sanity
def test_attention_equal_to_au_map_scores_one_and_shuffled_lower(map_data):
    cams = I.CAMSettings(cam_methods=["cam"], progress=False)
    good = I.evaluate_interpretability(ProbeModel(), _loader(map_data), cams)
    bad = I.evaluate_interpretability(ProbeModel(shuffle=True), _loader(map_data), cams)
    expected_valid = int(map_data.valid.sum())
    assert expected_valid == len(map_data) - 2 - 1  # 2 neutral faces and 1 face without landmarks
    assert good.summary["n"] == len(map_data) and good.summary["n_valid"] == expected_valid
    assert good.summary["att_cos"]["feat"] == pytest.approx(1.0, abs=1e-5)
    assert good.summary["cam_cos"]["cam"] == pytest.approx(1.0, abs=1e-4)  # own CAM = scaled AU map
    assert good.summary["pearson"]["attention:feat"] == pytest.approx(1.0, abs=1e-4)
    assert bad.summary["att_cos"]["feat"] < 0.7
    assert bad.summary["cam_cos"]["cam"] < 0.7
    # 95% intervals beside the means: each holds its number; the shuffled model's CAM-COS one lies below 1
    for res in (good, bad):
        sm = res.summary
        for value, ci in ((sm["accuracy"], sm["accuracy_ci"]), (sm["macro_f1"], sm["macro_f1_ci"]),
                          (sm["att_cos_mean"], sm["att_cos_ci"]), (sm["cam_cos"]["cam"], sm["cam_cos_ci"]["cam"])):
            assert ci[0] - 1e-9 <= value <= ci[1] + 1e-9
    assert bad.summary["cam_cos_ci"]["cam"][1] < good.summary["cam_cos_ci"]["cam"][0]
    table = I.comparison_table({"good": good, "bad": bad})
    assert table.loc["bad", "CAM-COS low"] <= table.loc["bad", "CAM-COS"] <= table.loc["bad", "CAM-COS high"]
    assert table.loc["good", "CL low"] <= table.loc["good", "CL"] <= table.loc["good", "CL high"] <= 100
    assert {"CAM-COS cam low", "ATT-COS high", "macro_f1 low"} <= set(table.columns)
    # the energy ratio of a perfect map beats the AU regions' share of the image (a uniform map)
    assert good.summary["energy_ratio"]["attention:feat"] > good.summary["au_area"] + 0.2
    assert bad.summary["energy_ratio"]["attention:feat"] < good.summary["energy_ratio"]["attention:feat"]
    # tidy frame: one row per valid sample and map, no invalid sample in it
    s = good.scores
    assert len(s) == 2 * expected_valid and set(s["kind"]) == {"attention", "cam"}
    invalid = set(good.predictions.loc[~good.predictions["valid"], "sample"])
    assert invalid and not invalid & set(s["sample"])


def test_target_label_vs_prediction(map_data):
    model = ProbeModel()
    x = torch.stack([map_data[i][0] for i in range(4)])
    labels = torch.tensor([0, 1, 2, 3])
    assert I.class_ids_for(model, x, labels, "label").tolist() == [0, 1, 2, 3]
    assert torch.equal(I.class_ids_for(model, x, labels, "prediction"), model.classify(x).argmax(1))
    with pytest.raises(ConfigError, match="label, prediction"):
        I.class_ids_for(model, x, labels, "truth")


# ----------------------------------------------------------------------------- CAMs on real backbones
@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    return {"cnn": build_model("resnet18", image_size=64, layers=(4, "last")),
            "vit": build_model("vit_tiny_patch16_224", image_size=64, layers=("last",))}


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_every_cam_method_gives_image_size_maps_in_unit_range(tiny_models, kind):
    model = tiny_models[kind]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    cls = torch.tensor([1, 5])
    for method in I.CAM_METHODS:
        if method == I.OWN_CAM and kind == "vit":
            with pytest.raises(ConfigError, match="gradcam"):
                I.compute_cams(model, x, method, cls)
            continue
        # ScoreCAM runs one forward pass per channel: on the CNN use the 256-channel stage
        layer = "layer3" if (method == "scorecam" and kind == "cnn") else None
        maps = I.compute_cams(model, x, method, cls, layer=layer, score_cam_batch_size=128)
        assert maps.shape == (2, 64, 64), method
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all(), method
        assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0, method
        assert float(maps.max()) > 0.5, f"{method} gave an empty map on {kind}"
    att = I.layer_attention_maps(model, x)
    assert list(att) == model.tap_names and all(a.shape == (2, 1, 64, 64) for a in att.values())


def test_own_cam_equals_gradcam_for_gap_linear_head(tiny_models):
    # for a GAP + Linear head, Grad-CAM's weights are W[c] / (h*w): the two maps coincide
    model = tiny_models["cnn"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    cls = torch.tensor([0, 3])
    assert torch.allclose(I.compute_cams(model, x, "cam", cls), I.compute_cams(model, x, "gradcam", cls), atol=1e-3)


def test_cam_layer_choice_and_vit_target_is_norm1(tiny_models):
    cnn, vit = tiny_models["cnn"], tiny_models["vit"]
    assert I.tapped_layers(cnn) == ["layer3", "layer4"]
    assert I.tapped_layers(cnn, "last") == ["layer4"] and I.tapped_layers(cnn, 4) == ["layer3"]
    assert I.cam_target_layer(vit) is vit.tap_modules()[-1].norm1
    with pytest.raises(ConfigError, match="tapped layers: layer3, layer4"):
        I.tapped_layers(cnn, "layer2")
    x = torch.randn(1, 3, 64, 64)
    coarse = I.compute_cams(cnn, x, "gradcam", torch.tensor([0]), layer="layer3")
    assert coarse.shape == (1, 64, 64)


def test_unknown_cam_method_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        I.check_cam_methods("gradcam,gradcam+++")
    for name in I.CAM_METHODS:
        assert name in str(err.value)
    assert I.check_cam_methods("GradCAM, eigencam") == ["gradcam", "eigencam"]
    assert I.check_cam_methods("all") == list(I.CAM_METHODS)
    with pytest.raises(ConfigError, match="road_morf"):
        I.faithfulness_scores(ProbeModel(), [], metrics=["road"])


# ----------------------------------------------------------------------------- faithfulness
def test_faithfulness_tells_the_evidence_from_a_random_map(map_data):
    # the probe's evidence is the AU region itself (every logit grows with it), so removing it
    # first (MoRF) must hurt more than removing a random smooth region; its own CAM is the AU map
    scores = I.faithfulness_scores(ProbeModel(), _loader(map_data),
                                   I.CAMSettings(cam_methods=["cam"], max_samples=6, progress=False, seed=0),
                                   score="logit", metrics=["road_morf", "road_lerf", "road_combined", "cam_mult"],
                                   percentiles=(50, 80))
    table = I.faithfulness_table(scores)
    assert set(table.index) == {"cam", "au_prior", "random"}
    assert set(table.columns) == set(I.FAITHFULNESS_METRICS)
    assert scores.groupby(["method", "metric"]).size().eq(6).all()
    assert table.loc["au_prior", "road_morf"] < table.loc["random", "road_morf"]
    assert table.loc["au_prior", "road_combined"] > table.loc["random", "road_combined"]
    assert table.loc["cam", "road_morf"] == pytest.approx(table.loc["au_prior", "road_morf"], abs=0.05)


# ----------------------------------------------------------------------------- checkpoints and figures
def test_evaluate_entry_point_on_saved_model(tmp_path, map_data):
    torch.manual_seed(0)
    model = build_model("resnet18", image_size=SIZE, layers=("last",))
    path = tmp_path / "best.pt"
    torch.save({"model_state": model.state_dict(), "model_config": model.config}, path)
    evaluation = E.evaluate(path, map_data, I.CAMSettings(cam_methods="cam,gradcam", max_samples=8, seed=3,
                                                          progress=False))
    result = evaluation.interpretability
    assert len(result.predictions) == 8
    assert set(result.predictions["sample"]) == set(I.subset_indices(len(map_data), 8, 3))
    assert set(result.summary["cam_cos"]) == {"cam", "gradcam"}
    assert 0.0 <= result.summary["accuracy"] <= 1.0
    paths = result.save(tmp_path / "out", prefix="base_")
    assert all(p.is_file() for p in paths.values())
    with pytest.raises(FileNotFoundError):
        E.evaluate(tmp_path / "missing.pt", map_data)


def test_overlay_and_class_grid_figures(tmp_path, map_data):
    import matplotlib

    matplotlib.use("Agg")
    idx = I.select_per_class(map_data, per_class=2, seed=0, classes=[1, 3])
    assert len(idx) == 4 and all(map_data.records[i]["label"] in (1, 3) for i in idx)
    maps = I.collect_sample_maps(ProbeModel(), map_data, idx, I.CAMSettings(cam_methods=["cam", "gradcam"]))
    assert maps.images.shape == (4, SIZE, SIZE, 3) and maps.cams["cam"].shape == (4, SIZE, SIZE)
    assert np.allclose(maps.attention["feat"], maps.au_maps / maps.au_maps.reshape(4, -1).max(1)[:, None, None],
                       atol=1e-4)
    fig = I.overlay_figure(maps, path=tmp_path / "overlay.png")
    assert len(fig.axes) == 4 * (2 + 1 + 2) and (tmp_path / "overlay.png").stat().st_size > 0
    grid = I.class_grid_figure(maps, "gradcam", per_class=3, path=tmp_path / "grid.pdf")
    assert len(grid.axes) == 2 * 3 and (tmp_path / "grid.pdf").is_file()
    with pytest.raises(ConfigError, match="valid: au, feat, cam, gradcam"):
        I.class_grid_figure(maps, "scorecam")


# ----------------------------------------------------------------------------- registry and settings
def test_a_registered_cam_method_is_one_decorated_class(map_data):
    from pytorch_grad_cam import GradCAM

    @I.register_cam("gradcam_flat", default=False)
    class FlatCAM(GradCAM):  # one overridden hook: every channel weighs the same
        def get_cam_weights(self, input_tensor, target_layer, targets, activations, grads):
            return np.ones(activations.shape[:2], dtype=np.float32)

    try:
        assert "gradcam_flat" in I.CAM_METHODS and "gradcam_flat" not in I.DEFAULT_CAM_METHODS
        assert I.CAM_REGISTRY["gradcam_flat"].engine is FlatCAM and "gradcam_flat" in I.GRAD_CAM_METHODS
        maps = I.compute_cams(ProbeModel(), torch.randn(2, 3, SIZE, SIZE), "gradcam_flat", torch.tensor([1, 3]))
        assert maps.shape == (2, SIZE, SIZE) and 0.0 <= float(maps.min()) <= float(maps.max()) <= 1.0
        with pytest.raises(ValueError, match="already registered"):
            I.register_cam("gradcam_flat")(FlatCAM)
    finally:
        I.CAM_REGISTRY.pop("gradcam_flat", None)
    assert "gradcam_flat" not in I.CAM_METHODS
    assert list(I.DEFAULT_CAM_METHODS) == ["cam", "gradcam", "gradcam++", "layercam", "hirescam", "xgradcam",
                                           "eigencam"]


def test_cam_settings_validate_once_and_read_notebook_parameters():
    s = I.CAMSettings(cam_methods="GradCAM, cam", layers=["last"], max_samples=5)
    assert s.cam_methods == ("gradcam", "cam") and s.layers == ("last",) and s.target == "label"
    assert I.CAMSettings(cam_methods="none").cam_methods == () and I.CAMSettings().cam_methods == tuple(
        I.DEFAULT_CAM_METHODS)
    for bad, match in (({"cam_methods": "gradcamz"}, "gradcam\\+\\+"), ({"target": "logits"}, "label, prediction"),
                       ({"threshold": 1.0}, "threshold"), ({"device": "gpu0"}, "unknown device"),
                       ({"max_samples": 0}, "max_samples"), ({"score_cam_batch_size": 1.5}, "score_cam_batch_size")):
        with pytest.raises(ConfigError, match=match):
            I.CAMSettings(**bad)
    params = {"cam_methods": "cam", "seed": 4, "n_samples": 200, "output_dir": "x"}
    assert I.CAMSettings.from_params(params, progress=False) == I.CAMSettings(cam_methods="cam", seed=4, progress=False)
    assert s.replace(target="prediction").target == "prediction"


def test_checkpoint_dataset_reads_faces_with_the_models_normalisation():
    """A model trained on 0.5/0.5-normalised faces (the ImageNet lite0) is evaluated on faces normalised the same way."""
    ckpt = {"config": {"dataset": "synthetic", "seed": 0, "landmarks": "ground_truth",
                       "dataset_kwargs": {"n_per_class": {"train": 1, "val": 1, "test": 2}}},
            "model_config": {"image_size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}}
    ds = I.checkpoint_dataset(ckpt, "test", progress=False)
    assert tuple(ds.mean) == (0.5, 0.5, 0.5) and tuple(ds.std) == (0.5, 0.5, 0.5)
    assert float(ds[0][0].min()) >= -1.0 - 1e-6  # (x - 0.5) / 0.5 of [0, 1] pixels stays in [-1, 1]
    imagenet = I.checkpoint_dataset({**ckpt, "model_config": {"image_size": 32}}, "test", progress=False)
    assert tuple(imagenet.mean) != (0.5, 0.5, 0.5)  # no recorded normalisation: the dataset's default
