"""fer_lib.analysis.explain: per-AU evidence tables, summaries, the deletion test, dataset validation and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torch import nn

from fer_lib import explain as X
from fer_lib.faces.au import ALL_AUS, AU_NAMES, EXPRESSIONS
from fer_lib.data import SyntheticConfig, generate_sample
from fer_lib.models import build_model
from fer_lib.utils import ConfigError

SIZE = 64


@pytest.fixture(scope="module")
def face():
    """A synthetic happy face (64 px) with its exact anchors."""
    return generate_sample("happiness", seed=0, split="test", index=0, config=SyntheticConfig(image_size=SIZE))


@pytest.fixture(scope="module")
def masks(face):
    return X.au_region_masks(face.anchors, SIZE)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("resnet18", image_size=SIZE).eval()


# ----------------------------------------------------------------------------- regions and evidence
def test_regions_cover_every_au_and_shared_landmarks_share_a_region(masks):
    assert sorted(masks) == sorted(ALL_AUS)
    assert all(m.dtype == bool and m.shape == (SIZE, SIZE) and m.any() for m in masks.values())
    groups = X.region_groups(masks)
    assert groups[12] == groups[15] == groups[20] == (12, 15, 20)  # all on the mouth corners
    assert groups[23] == (23, 24)
    assert groups[17] == (17,) and groups[6] == (6,)
    assert (masks[1] <= masks[4]).all()  # AU4's brows + glabella contain AU1's inner brows


@pytest.mark.parametrize("au", [17, 6, 9, 1])
def test_all_mass_in_one_region_ranks_that_au_first_with_share_one(masks, au):
    table, outside = X.au_evidence_table(masks[au].astype(float), masks)
    top = table.iloc[0]
    assert int(top["au"]) == au and int(top["rank"]) == 1
    assert top["mass_share"] == pytest.approx(1.0)
    assert top["evidence"] == pytest.approx(1.0 / masks[au].mean())
    assert outside["mass_share"] == pytest.approx(0.0)
    # any other region holding all the mass too is larger, so it ranks lower (area normalisation)
    for row in table.iloc[1:].itertuples():
        assert row.evidence < top["evidence"] or set(map(int, filter(None, row.same_region.split(",")))) >= {au}


def test_area_normalisation(masks):
    uniform = np.ones((SIZE, SIZE))
    table, outside = X.au_evidence_table(uniform, masks)
    np.testing.assert_allclose(table["mass_share"], table["area_share"])
    np.testing.assert_allclose(table["evidence"], 1.0)
    assert outside["evidence"] == pytest.approx(1.0)
    # the same density on a big (AU6: two cheeks + eye corners) and a small (AU17: chin) region:
    # AU6 gets more mass, but the area-normalised evidence is equal
    both = (masks[6] | masks[17]).astype(float)
    table, _ = X.au_evidence_table(both, masks)
    row = table.set_index("au")
    assert row.loc[6, "mass_share"] > 2 * row.loc[17, "mass_share"]
    assert row.loc[6, "evidence"] == pytest.approx(row.loc[17, "evidence"])
    # evidence = mean of the map in the region / mean of the map over the image
    rng = np.random.default_rng(0)
    sal = rng.random((SIZE, SIZE))
    table, _ = X.au_evidence_table(sal, masks)
    for row in table.itertuples():
        assert row.evidence == pytest.approx(sal[masks[row.au]].mean() / sal.mean())


def test_summary_in_the_experts_terms(masks):
    sal = (masks[12] | masks[6]).astype(float)
    table, outside = X.au_evidence_table(sal, masks, class_aus=(6, 12, 25))
    # AU12, AU15 and AU20 tie (one region); the class's own AU12 is ranked before the others
    ranked = list(table["au"])
    assert ranked.index(12) < ranked.index(15) and ranked.index(12) < ranked.index(20)
    text = X.summarise("happiness", 0.91, table, outside)
    assert text.startswith("happiness (p=0.91), mainly from ")
    assert f"AU12 ({AU_NAMES[12]})" in text and f"AU6 ({AU_NAMES[6]})" in text
    assert "AU15" not in text and "AU20" not in text  # one region is named once
    assert "0% of the evidence lies outside" in text


def test_empty_map_and_bad_inputs(face, masks):
    table, outside = X.au_evidence_table(np.zeros((SIZE, SIZE)), masks)
    assert table["evidence"].isna().all() and np.isnan(outside["mass_share"])
    assert "no AU region stands out" in X.summarise("anger", 0.5, table, outside)
    with pytest.raises(ValueError, match="no landmarks"):
        X.au_region_masks(np.full_like(face.anchors, np.nan), SIZE)
    with pytest.raises(ValueError, match="anchors must be"):
        X.au_region_masks(np.zeros((5, 2)), SIZE)
    with pytest.raises(ConfigError, match="threshold"):
        X.au_region_masks(face.anchors, SIZE, threshold=1.5)
    with pytest.raises(ConfigError, match="gradcam"):
        X.check_map("nope")
    with pytest.raises(ValueError, match="shape"):
        X.au_evidence_table(np.ones((SIZE, SIZE + 1)), masks)


def test_explain_batch_and_outputs(tmp_path, face, tiny_model):
    rgb, anchors, x = X.model_input(face.image, face.anchors, tiny_model)
    ev = X.explain_batch(tiny_model, x[None], anchors[None], X.ExplainSettings(map_name="gradcam"), rgb=rgb[None],
                         sources=["face"])[0]
    assert ev.probabilities.shape == (len(EXPRESSIONS),) and ev.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    assert ev.target == ev.predicted and ev.summary.startswith(EXPRESSIONS[ev.predicted])
    assert len(ev.table) == len(ALL_AUS) and list(ev.table["rank"]) == list(range(1, len(ALL_AUS) + 1))
    assert ev.table["evidence"].is_monotonic_decreasing
    forced = X.explain_batch(tiny_model, x[None], anchors[None], X.ExplainSettings(target="anger"))[0]
    assert forced.target_name == "anger" and forced.map_name == "attention:layer4"
    assert set(forced.table.loc[forced.table["in_class"], "au"]) == {4, 5, 7, 10, 17, 23, 24, 25, 26}
    paths = ev.save(tmp_path, "face")
    frame = pd.read_csv(paths["csv"])
    assert list(frame["region"])[-1] == "outside" and len(frame) == len(ALL_AUS) + 1
    data = json.loads(paths["json"].read_text())
    assert data["summary"] == ev.summary and len(data["aus"]) == len(ALL_AUS) and "run" in data
    assert paths["png"].stat().st_size > 5000


# ----------------------------------------------------------------------------- deletion test
def test_deletion_summary_states_the_effect_with_its_interval():
    import pandas as pd

    rng = np.random.default_rng(0)
    top = rng.normal(0.3, 0.1, 60)
    samples = pd.DataFrame({"drop_top": top, "drop_random": top - 0.2 + rng.normal(0, 0.05, 60),
                            "drop_bottom": top - 0.25, "base_score": 0.9})
    d = X.deletion_summary(samples)
    low, high = d["mean_diff_top_vs_random_ci"]
    assert low <= d["mean_diff_top_vs_random"] <= high and 0.17 < low < 0.2 < high < 0.23
    assert d["mean_diff_top_vs_bottom_ci"] == pytest.approx([0.25, 0.25]) and d["wilcoxon_p_top_vs_random"] < 1e-6
    assert X.deletion_summary(samples.iloc[:0])["mean_diff_top_vs_random_ci"] is None


class RegionProbe(nn.Module):
    """TappedModel-like: its features are the image inside one fixed region; class 1's logit is their mean."""

    def __init__(self, region: np.ndarray):
        super().__init__()
        self.register_buffer("region", torch.from_numpy(region.astype(np.float32))[None, None])
        self.feat = nn.Identity()
        self.head = nn.Linear(3, len(EXPRESSIONS))
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.weight[1] = 40.0
            self.head.bias.zero_()
        self.tap_names = ["feat"]
        self.config = {"backbone": "probe", "class_names": list(EXPRESSIONS), "num_classes": len(EXPRESSIONS)}

    def tap_modules(self):
        return [self.feat]

    def to_spatial(self, output):
        return output

    def forward(self, x):
        f = self.feat(x * self.region)
        return self.head(f.mean(dim=(2, 3))), [f]

    def classify(self, x):
        return self.forward(x)[0]


def test_deletion_hurts_most_where_the_model_looks(face, masks):
    model = RegionProbe(masks[12]).eval()
    x = torch.full((3, SIZE, SIZE), 0.2)
    x[:, torch.from_numpy(masks[12])] = 1.0
    ev = X.explain_batch(model, x[None], face.anchors[None])[0]
    assert ev.predicted == 1 and ev.ranked_aus()[0] == 12
    res = X.deletion_test(model, x, ev, fill="mean", seed=0)
    assert res.regions["top"][0] == 12 and res.drops["top"] > 0.1
    assert res.drops["top"] > res.drops["random"] + 0.1 and res.drops["top"] > res.drops["bottom"] + 0.1
    assert 12 not in res.regions["random"] and 12 not in res.regions["bottom"]
    # the random control has an area close to the top region's
    assert abs(np.log(res.areas["random"] / res.areas["top"])) <= np.log(1.5) + 1e-9
    # morf removes the region first: its curve lies below lerf until the end, where all agree
    assert res.curves["morf"][1] < res.curves["lerf"][1]
    assert res.curves["morf"][-1] == pytest.approx(res.curves["lerf"][-1])
    blurred = X.deletion_test(model, x, ev, fill="blur", seed=0)
    assert blurred.drops["top"] > blurred.drops["bottom"]


def test_deletion_is_deterministic_on_a_tiny_model(face, tiny_model):
    rgb, anchors, x = X.model_input(face.image, face.anchors, tiny_model)
    runs = []
    for _ in range(2):
        ev = X.explain_batch(tiny_model, x[None], anchors[None], X.ExplainSettings(map_name="gradcam"))[0]
        runs.append(X.deletion_test(tiny_model, x, ev, seed=3))
    a, b = runs
    assert a.drops == b.drops and a.regions == b.regions and a.order == b.order
    for k in X.CURVE_ORDERS:
        np.testing.assert_array_equal(a.curves[k], b.curves[k])
        assert len(a.curves[k]) == len(a.order) + 1 and a.curves[k][0] == a.base
    other = X.deletion_test(tiny_model, x, ev, seed=4)
    assert other.drops["top"] == a.drops["top"] and other.drops["bottom"] == a.drops["bottom"]
    with pytest.raises(ConfigError, match="fill"):
        X.deletion_test(tiny_model, x, ev, fill="paint")


# ----------------------------------------------------------------------------- dataset validation
def test_spearman_and_codebook_summaries():
    rng = np.random.default_rng(0)
    rows = []
    for s in range(4):
        inten = rng.random(len(ALL_AUS))
        for au, v in zip(ALL_AUS, inten):
            rows.append({"sample": s, "au": au, "evidence": 2 * v + 1, "true_intensity": v, "pred": 1})
    frame = pd.DataFrame(rows)
    sp = X.spearman_summary(frame)
    assert sp["per_image_mean"] == pytest.approx(1.0) and sp["pooled"] == pytest.approx(1.0)
    frame["evidence"] = -frame["true_intensity"]
    assert X.spearman_summary(frame)["per_image_mean"] == pytest.approx(-1.0)
    frame["evidence"] = [3.0 if au in (6, 12, 25) else 1.0 for au in frame["au"]]
    table = X.class_evidence(frame, "pred", EXPRESSIONS)
    agree = X.codebook_evidence_agreement(table)
    assert agree.loc["happiness", "auc"] == pytest.approx(1.0)
    assert set(agree.loc["happiness", "top_aus"].split(",")) == {"6", "12", "25"}


def test_au_evidence_report_on_synthetic_faces(tmp_path, tiny_model):
    from fer_lib.data import build_datasets

    ds = build_datasets("synthetic", image_size=SIZE, landmarks="ground_truth", augment=False, splits=["test"],
                        n_per_class={"train": 0, "val": 0, "test": 1}, progress=False)["test"]
    settings = X.ExplainSettings(map_name="gradcam", progress=False)
    rep = X.au_evidence_report(tiny_model, ds, settings, n_samples=4, seed=0, n_examples=1)
    assert rep.summary["n_explained"] == 4 and len(rep.evidence) == 4 * len(ALL_AUS)
    assert rep.evidence["true_intensity"].notna().all()
    assert rep.summary["spearman"]["available"] and -1 <= rep.summary["spearman"]["pooled"] <= 1
    d = rep.summary["deletion"]
    assert d["n"] == 4 and all(np.isfinite(d[f"mean_drop_{k}"]) for k in X.DELETIONS)
    low, high = d["mean_diff_top_vs_random_ci"]  # effect size with its 95% interval
    assert low <= d["mean_diff_top_vs_random"] <= high
    assert d["mean_diff_top_vs_random"] == pytest.approx(d["mean_drop_top"] - d["mean_drop_random"])
    assert set(rep.curves["order"]) == set(X.CURVE_ORDERS) and len(rep.examples) == 1
    paths = rep.save(tmp_path)
    assert json.loads(paths["summary"].read_text())["n_explained"] == 4
    import matplotlib.pyplot as plt

    for fig in (X.deletion_figure({"m": rep}, tmp_path / "d.png"), X.spearman_figure({"m": rep}, tmp_path / "s.png")):
        plt.close(fig)
    assert (tmp_path / "d.png").stat().st_size > 5000 and (tmp_path / "s.png").stat().st_size > 5000
    again = X.au_evidence_report(tiny_model, ds, settings, n_samples=4, seed=0)
    pd.testing.assert_frame_equal(rep.samples.drop(columns="summary"), again.samples.drop(columns="summary"))
    quick = X.au_evidence_report(tiny_model, ds, settings, None, n_samples=4, seed=0)  # no deletion test
    assert quick.summary["deletion"] == {"available": False} and len(quick.curves) == 0
    pd.testing.assert_frame_equal(quick.evidence, rep.evidence)
    for bad, match in (({"map_name": "nope"}, "attention"), ({"threshold": 1.5}, "threshold"),
                       ({"scale": "log"}, "minmax"), ({"max_faces": 0}, "max_faces"), ({"crop_margin": 3}, "crop_margin")):
        with pytest.raises(ConfigError, match=match):
            X.ExplainSettings(**bad)
    with pytest.raises(ConfigError, match="paint"):
        X.DeletionSettings(fill="paint")


# ----------------------------------------------------------------------------- command line
def test_cli_explains_faces_and_reports_the_rest(tmp_path, tiny_model):
    ckpt = tmp_path / "tiny.pt"
    torch.save({"model_state": tiny_model.state_dict(), "model_config": tiny_model.config}, ckpt)
    face = generate_sample("surprise", seed=0, split="test", index=1, config=SyntheticConfig(image_size=160))
    face_path = tmp_path / "face.png"
    Image.fromarray(face.image).save(face_path)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((96, 96, 3), 128, np.uint8)).save(blank)
    out = tmp_path / "out"
    code = X.main([str(face_path), str(blank), str(tmp_path / "missing.png"), "--checkpoint", str(ckpt),
                   "--cam", "gradcam", "--out", str(out)])
    assert code == 2  # two images could not be explained
    summary = json.loads((out / "explain_summary.json").read_text())
    assert summary["n_explained"] == 1 and summary["n_failed"] == 2
    reasons = {f["source"].split("/")[-1]: f["reason"] for f in summary["failed"]}
    assert "no face" in reasons["blank.png"] and "unreadable" in reasons["missing.png"]
    for name in ("face_evidence.csv", "face_evidence.json", "face_explanation.png"):
        assert (out / name).stat().st_size > 100
    assert X.main([str(face_path), "--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert X.main([str(face_path), "--checkpoint", str(ckpt), "--cam", "nope"]) == 2
