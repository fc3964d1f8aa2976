"""Heatmaps per second: batched torch renderer vs a straightforward per-image numpy loop.

Measured side by side in one run, at 56x56 and 224x224, on the same random faces and labels.
Goal: batched >= 20x the loop at 56x56 and >= 5x at 224x224. Then the maps training needs: the image-size
map area-pooled to a tapped layer (7x7, 14x14, 28x28) vs the same map rendered directly at the layer's size
(au.render_layer_heatmaps), for 112 and 224 px images.
Usage: python bench/heatmaps.py [--batch 512] [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fer_lib.faces import au
from fer_lib.faces.landmarks import ANCHORS


def random_faces(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Plausible anchors (a frontal template plus jitter) and non-neutral labels."""
    rng = np.random.default_rng(seed)
    template = rng.uniform(0.25, 0.75, (len(ANCHORS), 2)).astype(np.float32)
    anchors = template[None] + rng.normal(0, 0.02, (n, len(ANCHORS), 2)).astype(np.float32)
    labels = rng.integers(1, len(au.EXPRESSIONS), n)
    return anchors, labels


def time_best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--loop-images", type=int, default=200, help="images timed in the numpy loop")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}, device: {args.device}")
    anchors, labels = random_faces(args.batch)
    names = [au.EXPRESSIONS[i] for i in labels]
    a_t = torch.from_numpy(anchors).to(args.device)
    l_t = torch.from_numpy(labels).to(args.device)
    print(f"{'size':>8} {'numpy loop maps/s':>18} {'batched maps/s':>15} {'ratio':>7}")
    for size in (56, 224):
        n_loop = args.loop_images if size == 56 else max(20, args.loop_images // 4)
        loop_s = time_best(lambda: [au.heatmap(anchors[i], names[i], size) for i in range(n_loop)], args.repeats)

        def batched():
            maps, _ = au.render_heatmaps(a_t, l_t, size)
            if maps.is_cuda:
                torch.cuda.synchronize()

        batched()  # warm-up
        batch_s = time_best(batched, args.repeats)
        loop_rate, batch_rate = n_loop / loop_s, args.batch / batch_s
        print(f"{size:>4}x{size:<3} {loop_rate:>18,.0f} {batch_rate:>15,.0f} {batch_rate / loop_rate:>6.1f}x")
    print(f"\n{'image -> layer':>16} {'render+pool maps/s':>19} {'at layer maps/s':>16} {'ratio':>7}")
    for image_size, layer in ((112, 7), (112, 14), (112, 28), (224, 7), (224, 28)):
        def pooled():
            maps, _ = au.render_heatmaps(a_t, l_t, image_size)
            return torch.nn.functional.adaptive_avg_pool2d(maps[:, None], layer)

        def direct():
            return au.render_layer_heatmaps(a_t, l_t, layer, image_size)

        pooled(), direct()  # warm-up
        pool_rate = args.batch / time_best(pooled, args.repeats)
        direct_rate = args.batch / time_best(direct, args.repeats)
        print(f"{image_size:>9} -> {layer:<4} {pool_rate:>19,.0f} {direct_rate:>16,.0f} {direct_rate / pool_rate:>6.1f}x")


if __name__ == "__main__":
    main()
