"""The shortcut test's measures (fer_lib.analysis.shortcut) on a model that reads only the cue square."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fer_lib.analysis import shortcut
from fer_lib.data import build_datasets
from fer_lib.data.synthetic import SPURIOUS_CUES, cue_coverage
from fer_lib.utils import ConfigError

SIZE = 32


class CueReader(nn.Module):
    """Classifies a face by the cue square whose colour is there (a pure shortcut); its one 'tapped' map is
    that square's coverage, so all of its attention is on the cue."""

    tap_names = ["cue"]

    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        masks = [torch.from_numpy(cue_coverage(c, SIZE, SIZE)) for c in range(len(SPURIOUS_CUES))]
        self.register_buffer("masks", torch.stack(masks))                      # (C, H, W)
        self.register_buffer("colours", torch.tensor([col for _, col in SPURIOUS_CUES], dtype=torch.float32) / 255)
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        rgb = x * self.std + self.mean                                          # back to [0, 1]
        inside = torch.einsum("bchw,khw->bkc", rgb, self.masks) / self.masks.sum((1, 2))[None, :, None]
        logits = -(inside - self.colours[None]).abs().sum(-1)                   # colour match per class
        cue = logits.argmax(1)
        feats = self.masks[cue][:, None]                                        # attention: the chosen square
        return logits + 0 * self.dummy, [feats]


def _test_set(**options):
    return build_datasets("synthetic", image_size=SIZE, seed=2, landmarks="ground_truth", splits=["test"],
                          n_per_class={"train": 1, "val": 1, "test": 3}, progress=False, **options)["test"]


def test_a_cue_reader_follows_the_shuffled_cue_and_looks_only_at_it():
    faces = _test_set(spurious_p=1.0, spurious_eval="shuffled")
    cues = shortcut.cue_classes(faces)
    assert (cues >= 0).all() and (cues != np.asarray([r.label for r in faces.records])).any()
    report = shortcut.cue_report(CueReader(faces.mean, faces.std), faces, shortcut.ShortcutSettings(cam_method=None))
    assert report["n"] == report["n_with_cue"] == 21
    assert report["cue_follow"] == 1.0                                    # every lying cue wins
    assert report["accuracy"] == pytest.approx(np.mean(cues == [r.label for r in faces.records]))
    assert report["att_cue_energy"] == pytest.approx(1.0)                 # all attention on the cue square
    assert np.isnan(report["cam_cue_energy"])                             # no CAM asked for
    low, high = report["accuracy_ci"]
    assert 0.0 <= low <= report["accuracy"] <= high <= 1.0


def test_clean_faces_carry_no_cue_and_the_headline_reads_the_pairs():
    clean = _test_set(spurious_p=0.0)
    assert (shortcut.cue_classes(clean) == -1).all()
    rec = {"accuracy": 0.8, "accuracy_ci": [0.7, 0.9], "cue_follow": 0.1, "att_cue_energy": 0.2,
           "att_cue_energy_ci": [0.1, 0.3], "cam_cue_energy": 0.05, "cam_cue_energy_ci": [0.0, 0.1]}
    report = {"base": {"clean": rec, "shuffled": rec},
              "cue": {"clean": {**rec, "accuracy": 0.6}, "shuffled": {**rec, "accuracy": 0.3}}}
    head = shortcut.shortcut_headline(report, {"baseline": ("base", "cue")})["baseline"]
    assert head["shortcut_accuracy"] == 0.6 and head["shortcut_drop"] == pytest.approx(0.2)
    assert head["shuffled_accuracy"] == 0.3 and head["cue_energy"] == 0.2
    with pytest.raises(ConfigError, match="needs models"):
        shortcut.shortcut_headline(report, {"guided": ("base", "missing")})
    with pytest.raises(ConfigError, match="accepted: clean, shuffled"):
        shortcut.shortcut_test_set({}, "noisy")
