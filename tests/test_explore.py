"""fer_lib.analysis.explore: one call explains an image with a checkpoint (figure panels + numbers)."""
from __future__ import annotations

import sys
import types

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from fer_lib.faces import au
from fer_lib.analysis.explore import (Exploration, ExploreSettings, dataset_sample, explore, explore_sample,
                                     ipywidgets_available, load_model, sample_slider, to_input)
from fer_lib.faces.landmarks import ANCHOR_INDEX
from fer_lib.models import build_model
from fer_lib.utils import ConfigError

SIZE = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny resnet18 checkpoint in load_checkpoint's format, tapping layer3 and layer4."""
    torch.manual_seed(0)
    model = build_model("resnet18", image_size=SIZE, layers=(4, "last"))
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save({"model_state": model.state_dict(), "model_config": model.config}, path)
    return path


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _panel(fig, label):
    axes = [ax for ax in fig.axes if ax.get_label() == label]
    assert len(axes) == 1, f"expected one {label!r} panel, got {[ax.get_label() for ax in fig.axes]}"
    return axes[0]


def test_explore_astronaut_panels_probabilities_and_maps(checkpoint, astronaut, tmp_path):
    out = tmp_path / "explore.png"
    fig, res = explore(checkpoint, astronaut, ExploreSettings(cam="gradcam", target="happiness"), path=out)
    assert isinstance(res, Exploration)
    assert [ax.get_label() for ax in fig.axes] == ["input", "probabilities", "au_map", "attention:layer3",
                                                   "attention:layer4", "cam"]
    assert out.stat().st_size > 5000
    # probabilities: a distribution equal to the softmax of the model on the shown input
    assert res.probabilities.shape == (7,) and res.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    model = load_model(checkpoint)
    cfg = model.config
    x = (torch.from_numpy(res.image.astype(np.float32) / 255).permute(2, 0, 1)
         - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    with torch.no_grad():
        expected = torch.softmax(model.classify(x[None]), 1)[0].numpy()
    np.testing.assert_allclose(res.probabilities, expected, atol=1e-5)
    assert res.predicted == int(expected.argmax()) and res.predicted_name == au.EXPRESSIONS[res.predicted]
    assert res.top(2)[0] == (res.predicted_name, pytest.approx(float(expected.max())))
    # the bar chart shows the same numbers
    bars = sorted(_panel(fig, "probabilities").patches, key=lambda p: p.get_y())
    np.testing.assert_allclose([b.get_width() for b in bars], res.probabilities, atol=1e-6)
    assert f"prediction: {res.predicted_name}" in _panel(fig, "probabilities").get_title()
    # face crop: the model sees S x S, landmarks found, AU map = codebook map of the explained class
    assert res.image.shape == (SIZE, SIZE, 3) and res.anchors is not None
    assert res.explained_name == "happiness"
    np.testing.assert_allclose(res.au_map, au.heatmap(res.anchors, "happiness", SIZE))
    peak = np.array(np.unravel_index(res.au_map.argmax(), res.au_map.shape))[::-1] + 0.5
    centres = res.anchors[[ANCHOR_INDEX[a] for aus in au.CODEBOOK["happiness"] for a in au.AU_REGIONS[aus]]] * SIZE
    assert np.min(np.linalg.norm(centres - peak, axis=1)) < 2.0, "AU map peaks on a happiness AU anchor"
    assert "AU6, AU12, AU25" in _panel(fig, "au_map").get_title()
    # attention and CAM: image-sized maps in [0, 1]; cosines against the AU map in the titles
    for layer in ("layer3", "layer4"):
        att = res.attention[layer]
        assert att.shape == (SIZE, SIZE) and 0 <= att.min() and att.max() <= 1 + 1e-6
        assert -1 <= res.att_cos[layer] <= 1
        assert f"ATT-COS {res.att_cos[layer]:.2f}" in _panel(fig, f"attention:{layer}").get_title()
    assert res.cam.shape == (SIZE, SIZE) and 0 <= res.cam.min() and res.cam.max() <= 1
    assert np.isfinite(res.cam_cos) and "gradcam: happiness" in _panel(fig, "cam").get_title()
    assert res.summary()["explained"] == "happiness"


def test_explore_defaults_to_prediction_and_own_cam_without_crop(checkpoint, astronaut, tmp_path):
    path = tmp_path / "astronaut.png"
    import PIL.Image

    PIL.Image.fromarray(astronaut).save(path)
    fig, res = explore(str(checkpoint), path, ExploreSettings(cam="cam", layers="last"), crop_face=False)
    assert res.explained == res.predicted and res.source == "astronaut.png"
    assert list(res.attention) == ["layer4"] and len(fig.axes) == 5
    if au.has_au_map(res.predicted_name):
        np.testing.assert_allclose(res.au_map, au.heatmap(res.anchors, res.predicted_name, SIZE))
    else:
        assert res.au_map is not None and res.au_map.max() == 0 and np.isnan(res.cam_cos)
    # without the crop the face is a smaller part of the input: the anchors spread less
    _, cropped = explore(checkpoint, path, ExploreSettings(cam="cam", layers="last"))
    spread = lambda a: float(np.ptp(a[:, 0]))  # noqa: E731
    assert spread(res.anchors) < spread(cropped.anchors)


def test_explore_without_a_face_has_no_au_map(checkpoint):
    blank = np.full((80, 80, 3), 127, np.uint8)
    fig, res = explore(checkpoint, blank, ExploreSettings(cam="gradcam"))
    assert res.au_map is None and res.anchors is None
    assert any("no face found" in n for n in res.notes)
    assert all(np.isnan(v) for v in res.att_cos.values()) and np.isnan(res.cam_cos)
    assert "(unavailable)" in _panel(fig, "au_map").get_title()
    assert res.probabilities.sum() == pytest.approx(1.0, abs=1e-5)


def test_bad_arguments_fail_with_the_valid_choices(checkpoint, astronaut):
    with pytest.raises(ConfigError, match="valid choices: .*gradcam"):
        explore(checkpoint, astronaut, ExploreSettings(cam="nocam"), landmarks=False)
    with pytest.raises(ConfigError, match="unknown class 'joy'.*happiness"):
        explore(checkpoint, astronaut, ExploreSettings(target="joy"), landmarks=False)
    with pytest.raises(ConfigError, match="tapped layers: layer3, layer4"):
        explore(checkpoint, astronaut, ExploreSettings(layers=2), landmarks=False)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        explore("/nonexistent/best.pt", astronaut)
    with pytest.raises(ConfigError, match="TappedModel"):
        explore(torch.nn.Linear(2, 2), astronaut)


@pytest.fixture(scope="module")
def synthetic_test(tmp_path_factory):
    from fer_lib.data import build_datasets

    root = tmp_path_factory.mktemp("synthetic")
    return build_datasets("synthetic", root=root, image_size=48, landmarks="ground_truth", n_per_class=2,
                          splits=["test"], progress=False)["test"]


def test_explore_sample_uses_the_dataset_landmarks_and_label(checkpoint, synthetic_test):
    index = next(i for i, r in enumerate(synthetic_test.records) if au.has_au_map(synthetic_test.class_names[r.label]))
    label = synthetic_test.records[index].label
    fig, res = explore_sample(checkpoint, synthetic_test, index, ExploreSettings(target="label"))
    assert res.label == label and res.explained == label and res.image.shape == (SIZE, SIZE, 3)
    np.testing.assert_allclose(res.anchors, synthetic_test.records[index].anchors)
    np.testing.assert_allclose(res.au_map, au.heatmap(res.anchors, synthetic_test.class_names[label], SIZE))
    assert f"label: {synthetic_test.class_names[label]}" in _panel(fig, "input").get_title()
    with pytest.raises(IndexError, match="out of range"):
        explore_sample(checkpoint, synthetic_test, len(synthetic_test))


def test_generic_contract_dataset_is_denormalised():
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from _toy_data import ToyFER

    toy = ToyFER(n=7, size=32)
    rgb, anchors, label = dataset_sample(toy, 3)
    assert anchors is None and label == 3 and rgb.dtype == np.uint8 and rgb.shape == (32, 32, 3)
    expected = ((toy.images[3] * 0.25 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy() * 255).round()
    np.testing.assert_allclose(rgb, expected, atol=1)
    model = build_model("resnet18", image_size=32)
    assert to_input(model, rgb).shape == (1, 3, 32, 32)


def test_sample_slider_needs_ipywidgets_and_redraws(checkpoint, synthetic_test, monkeypatch):
    if not ipywidgets_available():
        with pytest.raises(ConfigError, match="needs ipywidgets"):
            sample_slider(checkpoint, synthetic_test)
    # A stand-in for the ipywidgets API the slider uses, to check its wiring without the package.
    events = []

    class IntSlider:
        def __init__(self, **kw):
            self.value, self.max, self._cb = kw["value"], kw["max"], None

        def observe(self, cb, names):
            assert names == "value"
            self._cb = cb

        def set(self, value):
            self.value = value
            self._cb({"new": value})

    class Output:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def clear_output(self, wait=False):
            events.append("clear")

    fake = types.SimpleNamespace(IntSlider=IntSlider, Output=Output, VBox=lambda children: children)
    monkeypatch.setitem(sys.modules, "ipywidgets", fake)
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda fig: shown.append(fig.axes[0].get_title()))
    slider, _ = sample_slider(checkpoint, synthetic_test, indices=[2, 5], settings=ExploreSettings(cam="gradcam"))
    assert slider.max == 1 and shown[-1].startswith("input (sample 2)")
    slider.set(1)
    assert shown[-1].startswith("input (sample 5)") and events == ["clear", "clear"]


def test_given_landmarks_skip_detection(checkpoint, astronaut, astronaut_landmarks):
    class NoDetector:
        def detect(self, image):
            raise AssertionError("the detector must not run when landmarks are given")

    _, detected = explore(checkpoint, astronaut, ExploreSettings(layers="last"))
    last = ExploreSettings(layers="last")
    _, given = explore(checkpoint, astronaut, last, landmarks=astronaut_landmarks, detector=NoDetector())
    np.testing.assert_allclose(given.anchors, detected.anchors, atol=1e-6)
    np.testing.assert_array_equal(given.image, detected.image)
    _, off = explore(checkpoint, astronaut, last, landmarks=False, detector=NoDetector())
    assert off.au_map is None and off.anchors is None and "landmarks disabled" in off.notes[0]
    # anchors alone (normalised on the photo) also crop: the face fills the input
    _, anchors_only = explore(checkpoint, astronaut, last, landmarks=astronaut_landmarks.anchors(),
                              detector=NoDetector())
    assert np.ptp(anchors_only.anchors[:, 0]) > 0.5 > np.ptp(astronaut_landmarks.anchors()[:, 0])
