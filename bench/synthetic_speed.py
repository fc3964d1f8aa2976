"""Throughput of the synthetic face generator, side by side with what follows it.

Measures in one run: images/s of `generate_sample` (draw at 192 px, downsample), of
`build_synthetic` (generation + PNG writes + manifest), and of MediaPipe FaceMesh
detection on the same faces, and prints the ratios. Usage:

    python bench/synthetic_speed.py [--n 20] [--size 112]

`--n` is images per class (7 classes).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np

from fer_lib.faces.au import EXPRESSIONS
from fer_lib.data.synthetic import SyntheticConfig, build_synthetic, generate_sample


def main() -> None:
    """Run the three measurements and print images/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="images per class")
    parser.add_argument("--size", type=int, default=112, help="image side in pixels")
    parser.add_argument("--no-detect", action="store_true", help="skip the MediaPipe measurement")
    args = parser.parse_args()
    cfg = SyntheticConfig(n_per_class={"train": args.n}, image_size=args.size)
    total = args.n * len(EXPRESSIONS)

    t0, c0 = time.perf_counter(), time.process_time()
    samples = [generate_sample(e, 0, "train", i, cfg) for e in EXPRESSIONS for i in range(args.n)]
    gen_s, gen_cpu = time.perf_counter() - t0, time.process_time() - c0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        build_synthetic(cfg, root=f"{tmp}/syn", progress=False)
        build_s = time.perf_counter() - t0
    print(f"images: {total} at {args.size} px (drawn at 192 px)")
    print(f"generate_sample : {total / gen_s:8.1f} images/s wall, {total / gen_cpu:8.1f} images/s per CPU-second")
    print(f"build_synthetic : {total / build_s:8.1f} images/s (with PNG writes, manifest, truth.npz)")
    print(f"ratio build/generate time: {build_s / gen_s:.2f}")
    if not args.no_detect:
        from fer_lib.faces.landmarks import MediaPipeFaceMesh

        det = MediaPipeFaceMesh()
        det.detect(samples[0].image)  # model load outside the timing
        t0, c0 = time.perf_counter(), time.process_time()
        found = [det.detect(s.image) is not None for s in samples]
        det_s, det_cpu = time.perf_counter() - t0, time.process_time() - c0
        print(f"MediaPipe detect: {total / det_s:8.1f} images/s wall, {total / det_cpu:8.1f} images/s per CPU-second "
              f"(found {np.mean(found):.1%}; MediaPipe may use several threads)")
        print(f"ratio detection/generation time: {det_s / gen_s:.2f}")


if __name__ == "__main__":
    main()
