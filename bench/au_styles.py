"""Our Gaussian AU maps vs the reference code's ellipse maps (au_style="reference") on real faces.

Cosine between the two styles per face on FER2013 PublicTest (80 per class, landmarks from the cache),
by class. Needs ../shared/data/fer2013. Usage: python bench/au_styles.py
"""
import sys

import numpy as np

from fer_lib.data.dataset import DEFAULT_FER2013_ROOT
from fer_lib.data import build_datasets

if not DEFAULT_FER2013_ROOT.is_dir():
    sys.exit(f"FER2013 is not at {DEFAULT_FER2013_ROOT}")
splits = build_datasets("fer2013", None, image_size=112, seed=0, landmarks="detect", splits=["val"], progress=False,
                        au_style="reference", max_per_class=80)
ref = splits["val"]
cos, per = [], {}
for i, r in enumerate(ref.records):
    name = ref.class_names[r.label]
    if not r.has_landmarks or name == "neutral":
        continue
    a = ref.sample(i, augment=False)[2]
    ref.au_style = "gaussian"; g = ref.sample(i, augment=False)[2]; ref.au_style = "reference"
    if a.max() == 0 or g.max() == 0:
        continue
    c = float((a * g).sum() / np.linalg.norm(a) / np.linalg.norm(g))
    cos.append(c); per.setdefault(name, []).append(c)
print(f"faces {len(cos)}; cosine mean {np.mean(cos):.3f} median {np.median(cos):.3f} [p10 {np.percentile(cos,10):.3f}, p90 {np.percentile(cos,90):.3f}]")
for k, v in per.items(): print(f"  {k:10s} n={len(v):3d} mean {np.mean(v):.3f}")
