"""A tiny in-test dataset returning contract-1 4-tuples (image, label, au_map, has_landmarks).

Images carry a class-dependent bright blob where the class's AU map is, so a model can
learn the classes in a few steps; some samples have no landmarks (zero map, flag False).
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from fer_lib.faces.au import EXPRESSIONS, render_heatmaps
from fer_lib.faces.landmarks import ANCHORS


class ToyFER(Dataset):
    """Deterministic random faces-free dataset for training-loop tests."""

    def __init__(self, n: int = 48, size: int = 32, seed: int = 0, no_landmark_every: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % len(EXPRESSIONS)
        base = torch.tensor([[0.5, 0.5]]).repeat(len(ANCHORS), 1)
        anchors = (base + 0.25 * (torch.rand(len(ANCHORS), 2, generator=g) - 0.5))[None].repeat(n, 1, 1)
        anchors = anchors + 0.02 * torch.randn(anchors.shape, generator=g)
        self.has_landmarks = torch.ones(n, dtype=torch.bool)
        if no_landmark_every:
            self.has_landmarks[::no_landmark_every] = False
        anchors[~self.has_landmarks] = float("nan")
        maps, _ = render_heatmaps(anchors, self.labels, size)
        self.maps = maps[:, None]
        noise = 0.3 * torch.randn(n, 3, size, size, generator=g)
        tint = (self.labels.float()[:, None, None, None] / len(EXPRESSIONS))
        self.images = noise + tint + self.maps
        self.class_names = list(EXPRESSIONS)
        self.mean, self.std, self.image_size = [0.5] * 3, [0.25] * 3, size
        self.records, self.skipped = [], []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i], self.maps[i], self.has_landmarks[i]


def toy_splits(size: int = 32, n_train: int = 48, n_eval: int = 21) -> dict[str, ToyFER]:
    return {"train": ToyFER(n_train, size, 0), "val": ToyFER(n_eval, size, 1), "test": ToyFER(n_eval, size, 2)}
