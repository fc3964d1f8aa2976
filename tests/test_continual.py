"""Continual and few-shot compound-expression learning (fer_lib.methods.continual, fer_lib.faces.compound) on tiny data."""
from __future__ import annotations

import json
import numpy as np
import pytest
import torch
from scipy import stats

from fer_lib.faces import au
from fer_lib.faces.compound import (ALL_COMPOUNDS, COMPOUND_AUS, COMPOUND_PARTS, EXTRA_COMPOUNDS, compound_heatmap,
                              compound_parts, part_heatmaps, parts_aus, region_anchors)
from fer_lib.methods.continual import (METHODS, ContinualConfig, ExemplarMemory, TensorSplit, clone_model,
                               distillation_loss, evaluate_step, expand_head, feature_distillation_loss, few_shot,
                               forgetting, make_protocol, mean_ci, predictive_scores, run_continual, sample_episode,
                               split_method, summary_table, TaskRun, train_task)
from fer_lib.data import COMPOUND_EXPRESSIONS
from fer_lib.data.synthetic import SYNTHETIC_EXPRESSIONS, SyntheticConfig, generate_sample, sample_aus
from fer_lib.models import build_model
from fer_lib.training.step import NonFiniteLossError
from fer_lib.utils import ConfigError

torch.set_num_threads(1)


# --------------------------------------------------------------------------- compound AUs
def test_compound_names_match_data_and_are_registered():
    assert set(COMPOUND_EXPRESSIONS) <= set(ALL_COMPOUNDS)
    assert set(EXTRA_COMPOUNDS) <= set(ALL_COMPOUNDS) and "fearfully_disgusted" in ALL_COMPOUNDS
    assert len(ALL_COMPOUNDS) == 15
    for name, aus in COMPOUND_AUS.items():
        assert au.CODEBOOK[name] == aus and au.has_au_map(name)
    assert COMPOUND_AUS["happily_surprised"] == (1, 2, 12, 25) and COMPOUND_AUS["hatred"] == (4, 7, 10)


def test_compound_aus_combine_their_parts():
    anchors = generate_sample("neutral", seed=1, split="test", index=0).anchors
    for name in ALL_COMPOUNDS:
        a, b = compound_parts(name)
        union = set(au.CODEBOOK[a]) | set(au.CODEBOOK[b])
        assert set(parts_aus(name)) == union
        outside = set(COMPOUND_AUS[name]) - union
        assert outside <= ({25} if name == "sadly_surprised" else set()), (name, outside)
        # spatially the compound map lies inside its parts' regions
        assert region_anchors(COMPOUND_AUS[name]) <= region_anchors(union), name
        comp = compound_heatmap(anchors, name, 48)
        parts = np.maximum(*part_heatmaps(anchors, name, 48).values())
        hot = comp > 0.5
        assert hot.any() and (parts[hot] > 0.2).all(), name
    # the map is the max of its AUs' maps, i.e. it combines them
    m = compound_heatmap(anchors, "sadly_angry", 48)
    np.testing.assert_allclose(m, au.combine_aus(anchors, (4, 15), 48))


def test_synthetic_compound_faces_show_their_aus_and_basic_ids_unchanged():
    assert SYNTHETIC_EXPRESSIONS[:7] == au.EXPRESSIONS
    rng = np.random.default_rng(0)
    for name in ("happily_surprised", "sadly_angry", "awed"):
        for _ in range(5):
            aus = sample_aus(name, rng)
            assert all(aus[a] >= 0.25 for a in COMPOUND_AUS[name]), name
    s = generate_sample("sadly_angry", seed=0, split="train", index=0,
                        config=SyntheticConfig(image_size=32, expressions=("sadly_angry",)))
    assert s.label == SYNTHETIC_EXPRESSIONS.index("sadly_angry") and s.image.shape == (32, 32, 3)
    # the default synthetic set is the basic one (its on-disk cache stays valid); compound classes get their own key
    assert tuple(SyntheticConfig().expressions) == au.EXPRESSIONS
    assert SyntheticConfig(expressions=au.EXPRESSIONS + ("sadly_angry",)).key() != SyntheticConfig().key()
    with pytest.raises(ConfigError, match="valid"):
        SyntheticConfig(expressions=("not_an_expression",))


# --------------------------------------------------------------------------- protocol
def test_protocol_order_and_task_splits_as_configured():
    p = make_protocol(("neutral", "happiness"), ("a", "b", "c", "d", "e"), increment=2)
    assert p.tasks == (("neutral", "happiness"), ("a", "b"), ("c", "d"), ("e",))
    assert p.class_order == ("neutral", "happiness", "a", "b", "c", "d", "e")
    assert p.old(2) == ("neutral", "happiness", "a", "b") and p.new(2) == ("c", "d") and p.task_of("e") == 3
    q = make_protocol(("x",), ("a", "b", "c", "d"), task_sizes=(1, 3))
    assert q.tasks == (("x",), ("a",), ("b", "c", "d"))
    r1 = make_protocol(("x",), tuple("abcdef"), increment=3, order_seed=5)
    r2 = make_protocol(("x",), tuple("abcdef"), increment=3, order_seed=5)
    assert r1 == r2 and sorted(r1.class_order[1:]) == list("abcdef")
    with pytest.raises(ConfigError, match="sum"):
        make_protocol(("x",), ("a", "b"), task_sizes=(1, 2))
    with pytest.raises(ConfigError, match="more than one task"):
        make_protocol(("x", "a"), ("a",))
    with pytest.raises(ConfigError, match="valid choices|method"):
        ContinualConfig(methods=("psmr", "ewc"))
    with pytest.raises(ConfigError, match="memory_size"):
        ContinualConfig(memory_size=3)
    assert split_method("psmr+au") == ("psmr", True) and set(METHODS) >= {"finetune", "lwf", "replay", "psmr", "joint"}


# --------------------------------------------------------------------------- memory and losses
def test_memory_never_exceeds_budget_and_keeps_highest_scores():
    rng = np.random.default_rng(0)
    for selection in ("psmr", "random"):
        mem = ExemplarMemory(budget=10, selection=selection, seed=1)
        start = 0
        for n_new in (3, 2, 4, 1):
            cands = {c: np.arange(start + 100 * c, start + 100 * c + 7) for c in range(len(mem.exemplars),
                                                                                  len(mem.exemplars) + n_new)}
            scores = {c: rng.normal(size=7) for c in cands}
            mem.add(cands, scores if selection == "psmr" else None)
            assert len(mem) <= 10
            assert set(mem.counts().values()) == {10 // len(mem.exemplars)}
            assert len(set(mem.indices().tolist())) == len(mem)
            if selection == "psmr":
                for c, s in cands.items():
                    kept = mem.exemplars[c]
                    best = cands[c][np.argsort(-scores[c], kind="stable")[: len(kept)]]
                    assert kept.tolist() == best.tolist()
    with pytest.raises(ValueError, match="score"):
        ExemplarMemory(4, "psmr").add({0: np.arange(3)})


def test_distillation_is_zero_when_teacher_equals_student_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g)
    assert float(distillation_loss(logits, logits, temperature=2.0)) == pytest.approx(0.0, abs=1e-7)
    # extra (new-class) student outputs are ignored: only the teacher's classes are distilled
    student = torch.cat([logits, torch.randn(8, 3, generator=g)], dim=1)
    assert float(distillation_loss(student, logits, 3.0)) == pytest.approx(0.0, abs=1e-7)
    assert float(distillation_loss(torch.randn(8, 5, generator=g), logits, 2.0)) > 1e-3
    feats = [torch.randn(4, 6, 3, 3, generator=g)]
    assert float(feature_distillation_loss(feats, [f.clone() for f in feats])) == pytest.approx(0.0, abs=1e-6)
    assert float(feature_distillation_loss(feats, [torch.randn(4, 6, 3, 3, generator=g)])) > 0.1


def test_expand_head_keeps_old_outputs_and_clone_is_independent():
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, image_size=32, class_names=["a", "b", "c"]).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model.classify(x).detach()
    copy = clone_model(model).eval()
    expand_head(model, ["a", "b", "c", "d", "e"])
    after, feats = model(x)
    assert after.shape == (2, 5) and model.config["class_names"] == ["a", "b", "c", "d", "e"]
    torch.testing.assert_close(after[:, :3].detach(), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(copy.classify(x).detach(), before, rtol=1e-5, atol=1e-5)
    _, copy_feats = copy(x)
    assert copy_feats[0].shape == feats[0].shape
    with pytest.raises(ConfigError, match="start with the old"):
        expand_head(model, ["b", "a"])


# --------------------------------------------------------------------------- few-shot
def test_few_shot_episodes_never_leak_query_into_support():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 6)
    for k in (1, 5):
        for _ in range(20):
            s, q = sample_episode(labels, labels, [0, 1, 2, 3], k, 3, rng, same_pool=True)
            assert not set(s.tolist()) & set(q.tolist())
            assert np.bincount(labels[s], minlength=4).tolist() == [k] * 4
            assert set(labels[q].tolist()) == {0, 1, 2, 3}
    with pytest.raises(ConfigError, match="fewer than k_shot"):
        sample_episode(labels, labels, [0], 7, 1, rng)
    m, h = mean_ci([0.5, 0.7, 0.6, 0.8])
    assert m == pytest.approx(0.65) and 0 < h < 0.3


def _toy_split(n_per_class: int, classes: tuple[str, ...], size: int, seed: int) -> TensorSplit:
    """Separable toy images: each class lights one colour channel in one quadrant."""
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * len(classes)
    labels = torch.arange(len(classes)).repeat_interleave(n_per_class)
    images = torch.randn(n, 3, size, size, generator=g) * 0.3
    half = size // 2
    for i, y in enumerate(labels.tolist()):
        r, c = divmod(y % 4, 2)
        images[i, y % 3, r * half:(r + 1) * half, c * half:(c + 1) * half] += 2.0
    maps = torch.zeros(n, 1, size, size)
    maps[:, :, : size // 2] = 1.0
    return TensorSplit(images, labels, maps, torch.ones(n, dtype=torch.bool), classes)


# --------------------------------------------------------------------------- the harness
def test_run_continual_tiny_end_to_end():
    classes = ("neutral", "happiness", "sadness", "happily_surprised", "sadly_angry", "fearfully_surprised")
    data = {"train": _toy_split(6, classes, 32, 0), "test": _toy_split(4, classes, 32, 1)}
    cfg = ContinualConfig(base_classes=classes[:3], new_classes=classes[3:], task_sizes=(2, 1),
                          methods=("finetune", "psmr", "joint", "replay+au"), memory_size=12, epochs_base=2,
                          epochs=1, image_size=32, batch_size=8, device="cpu")
    res = run_continual(cfg, data, progress=False)
    table = summary_table(res)
    assert list(table.index) == ["finetune", "psmr", "joint", "replay+au"]
    for method, steps in res.steps.items():
        assert [s["n_classes"] for s in steps] == [3, 5, 6]
        assert [s["task"] for s in steps] == [0, 1, 2]
        assert steps[0]["acc_old"] is None and steps[1]["acc_old"] is not None
        assert res.models[method].config["class_names"] == list(cfg.protocol().class_order)
    for method in ("psmr", "replay+au"):
        for counts in res.memory_counts[method]:
            assert sum(counts.values()) <= cfg.memory_size
        assert len(res.memory_counts[method][-1]) == 6
    assert sorted(res.base_models) == [False, True]
    # few-shot on the basic model's features: results for every k with CIs
    fs = few_shot(res.base_model(), data, classes[3:], k_shots=(1, 2), n_episodes=4, n_query=2, progress=False,
                  device="cpu")
    t975 = stats.t.ppf(0.975, 3)  # 4 episodes
    for k in ("1", "2"):
        for clf in ("prototype", "linear"):
            v = fs["results"][k][clf]["new"]
            assert 1 / 3 < v["mean"] <= 1.0, (k, clf, v)  # the separable toy classes beat chance (3-way)
            assert round(v["mean"] * 4 * 6, 6).is_integer()  # each episode: a multiple of 1/(3 classes x 2 queries)
            assert np.isfinite(v["ci95"]) and v["ci95"] == pytest.approx(t975 * v["std"] / 2)
    # features that carry nothing (a zeroed model) give chance accuracy with no spread over episodes
    blank = build_model("resnet18", num_classes=3, image_size=32, class_names=list(classes[:3]))
    with torch.no_grad():
        for p in blank.parameters():
            p.zero_()
    chance = few_shot(blank, data, classes[3:], k_shots=(1,), n_episodes=4, n_query=2, classifiers=("prototype",),
                      progress=False, device="cpu")["results"]["1"]["prototype"]["new"]
    assert chance["mean"] == pytest.approx(1 / 3) and chance["std"] == 0


def test_a_non_finite_loss_stops_a_task_with_the_shared_error():
    classes = ("a", "b")
    split = _toy_split(4, classes, 32, 5)
    split.images[:] = float("nan")
    model = build_model("resnet18", num_classes=2, image_size=32, class_names=list(classes))
    cfg = ContinualConfig(base_classes=classes[:1], new_classes=classes[1:], methods=("finetune",), image_size=32,
                          batch_size=4, device="cpu", augment=False)
    with pytest.raises(NonFiniteLossError, match="non-finite loss at task 0, epoch 1, batch 1 \\(ce=nan"):
        train_task(model, split, np.arange(len(split)), cfg, torch.device("cpu"), TaskRun(1, 0.01, desc="task 0"))


def test_forgetting_and_step_metrics():
    assert forgetting([{0: 0.9}]) is None
    assert forgetting([{0: 0.9}, {0: 0.5, 1: 0.8}, {0: 0.6, 1: 0.4, 2: 0.7}]) == pytest.approx(((0.9 - 0.6) + (0.8 - 0.4)) / 2)
    classes = ("a", "b", "c")
    test = _toy_split(3, classes, 32, 2)
    model = build_model("resnet18", num_classes=3, image_size=32, class_names=list(classes))
    p = make_protocol(("a", "b"), ("c",), increment=1)
    step = evaluate_step(model, test, p, 1, torch.device("cpu"))
    y = test.labels.numpy()
    with torch.no_grad():
        pred = model.eval().classify(test.images).argmax(1).numpy()
    assert step["acc_overall"] == pytest.approx((pred == y).mean())
    assert step["acc_new"] == pytest.approx((pred[y == 2] == 2).mean())
    assert step["acc_old"] == pytest.approx((pred[y < 2] == y[y < 2]).mean())
    scores = predictive_scores(model, test, np.arange(len(test)), torch.device("cpu"), "prob")
    assert scores.shape == (9,) and ((scores >= 0) & (scores <= 1)).all()


def test_base_checkpoint_is_used_as_task0(tmp_path):
    classes = ("neutral", "happiness", "sadly_angry")
    data = {"train": _toy_split(4, classes, 32, 3), "test": _toy_split(2, classes, 32, 4)}
    base = build_model("resnet18", num_classes=2, image_size=32, class_names=list(classes[:2]))
    path = tmp_path / "best.pt"
    torch.save({"model_state": base.state_dict(), "model_config": base.config}, path)
    cfg = ContinualConfig(base_classes=classes[:2], new_classes=classes[2:], methods=("finetune",), epochs=1,
                          image_size=32, batch_size=4, device="cpu", base_checkpoint=str(path))
    res = run_continual(cfg, data, progress=False)
    loaded = res.base_model().state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in base.state_dict().items())
    assert res.train_logs["finetune"][0]["checkpoint"] == str(path)
    with pytest.raises(ConfigError, match="image_size=48"):
        run_continual(ContinualConfig(base_classes=classes[:2], new_classes=classes[2:], methods=("finetune",),
                                      image_size=48, device="cpu", base_checkpoint=str(path)), data, progress=False)
    with pytest.raises(ConfigError, match="not found"):
        ContinualConfig(base_checkpoint=str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_notebook05_smoke(tmp_path):
    import json

    import nbformat
    import papermill as pm

    from conftest import REPO

    out_dir = tmp_path / "out"
    pm.execute_notebook(str(REPO / "notebooks" / "05_continual_compound.ipynb"), str(tmp_path / "nb05.ipynb"),
                        parameters=dict(output_dir=str(out_dir), n_per_class=6, epochs_base=1, epochs=1, image_size=32,
                                        memory_size=13, n_episodes=3, n_query=2, methods="finetune,psmr",
                                        k_shots="1,2", torch_threads=1),
                        kernel_name="python3", language="python", cwd=str(REPO / "notebooks"), progress_bar=False)
    nb = nbformat.read(tmp_path / "nb05.ipynb", as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert [r["method"] for r in metrics["summary"]] == ["finetune", "psmr"]
    assert metrics["run"]["config"]["image_size"] == 32
    assert set(metrics["few_shot"]["basic model"]["results"]) == {"1", "2"}
    for fig in ("accuracy_per_task.png", "final_comparison.png", "few_shot.png", "compound_cams.png"):
        assert (out_dir / fig).stat().st_size > 1000


def test_image_size_backbone_and_normalisation_come_from_the_base_checkpoint(tmp_path):
    """A lite0 base checkpoint fixes image size, backbone and mean/std; a disagreeing image_size is refused;
    the summary carries Wilson intervals of the final accuracies and bootstrap intervals of forgetting."""
    classes = ("neutral", "happiness", "sadly_angry")
    base = build_model("tf_efficientnet_lite0", num_classes=2, image_size=32, class_names=list(classes[:2]))
    path = tmp_path / "best.pt"
    torch.save({"model_state": base.state_dict(), "model_config": base.config}, path)
    common = dict(base_classes=classes[:2], new_classes=classes[2:], methods=("finetune",), epochs=1, batch_size=4,
                  device="cpu", base_checkpoint=str(path), n_boot=50)
    cfg = ContinualConfig(**common)
    assert (cfg.image_size, cfg.backbone) == (32, "tf_efficientnet_lite0")
    assert cfg.normalisation() == ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    with pytest.raises(ConfigError, match="trained at 32 px, but image_size=64"):
        ContinualConfig(**common, image_size=64)
    assert ContinualConfig(methods=("finetune",)).image_size == 64  # no checkpoint: the old default
    data = {"train": _toy_split(4, classes, 32, 3), "test": _toy_split(6, classes, 32, 4)}
    res = run_continual(cfg, data, progress=False)
    s = res.summary()["finetune"]
    for name in ("acc_overall", "acc_old", "acc_new"):
        assert s[f"{name}_ci_low"] <= s[name] <= s[f"{name}_ci_high"]
    assert s["forgetting_ci_low"] <= s["forgetting"] <= s["forgetting_ci_high"]
    assert "faces" not in json.dumps(res.to_json()["steps"])
