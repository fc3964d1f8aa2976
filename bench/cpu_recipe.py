"""What helps the CPU training recipe of the real-face runs (preset `fer2013_lite0`: ImageNet
tf_efficientnet_lite0 at 112 px, AU guidance at blocks.4, 7x7), measured side by side in one run.

Every arm runs the project's one training step (fer_lib.training.step.AUGuidedStep) on FER2013
Training faces; arms take turns round by round so that load drifts hit all of them alike; each arm's
time is its median step. Ratios (< 1 is faster for step times, > 1 is better for throughput):

    AU / CE               AU-guided step (lambda 9) over the CE step, same batches (goal <= 1.03)
    pipeline / stacked    images/s through the full input pipeline (PNG decoding, cached landmarks,
                          augmentation, AU maps) over the same steps on pre-stacked tensors (goal >= 0.9)
    in-memory decode      the pipeline with the decoded images held in memory over reading PNGs
    layer-size AU maps    the pipeline with AU maps rendered at 7x7 (FERDataset.au_map_size) over 112x112
    channels_last         the AU step with model and batch in channels_last over the default layout
    1 thread              the AU step on one thread over two
    torch.compile         the AU step of torch.compile(model) (inductor) over eager, compile time apart

    python bench/cpu_recipe.py --steps 6 --batch 32 --out results/bench/cpu_recipe.json
Needs ../shared/data/fer2013 (exits with a message where it is absent).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from fer_lib.data import build_datasets
from fer_lib.models import build_model
from fer_lib.training.losses import AUGuidedLoss
from fer_lib.training.presets import preset_dict
from fer_lib.training.step import AUGuidedStep
from fer_lib.utils import atomic_write_json, run_info, seed_everything


def make_step(cfg: dict, au_weight: float, channels_last: bool = False, compile_model: bool = False) -> AUGuidedStep:
    seed_everything(0)
    model = build_model(cfg["backbone"], layers=cfg["layers"], image_size=cfg["image_size"], pretrained="imagenet")
    model.train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    runner = torch.compile(model) if compile_model else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)  # small: the weights barely move between arms' rounds
    return AUGuidedStep(runner, opt, criterion=AUGuidedLoss(au_weight, "cosine", cfg["label_smoothing"]))


def batches(ds: Any, batch: int, n: int) -> list:
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    return [next(it) for _ in range(n)]


def arms_for(cfg: dict, ds: Any, ds_memory: Any, ds_layer: Any, stacked: list, args: argparse.Namespace
             ) -> dict[str, Callable[[int], float]]:
    """Each arm: a function of the round that runs one step and returns its seconds (data included where
    the arm measures the pipeline)."""
    loaders = {name: iter(torch.utils.data.DataLoader(d, batch_size=args.batch, shuffle=True,
                                                      generator=torch.Generator().manual_seed(1)))
               for name, d in (("pipeline", ds), ("memory", ds_memory), ("layer", ds_layer))}
    ce, au = make_step(cfg, 0.0), make_step(cfg, 9.0)
    au_cl = make_step(cfg, 9.0, channels_last=True)

    def timed(step: AUGuidedStep, batch_of: Callable[[int], Any], threads: int = 2,
              channels_last: bool = False) -> Callable[[int], float]:
        def run(i: int) -> float:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            batch = batch_of(i)
            if channels_last:
                batch = (batch[0].contiguous(memory_format=torch.channels_last), *batch[1:])
            step(batch)
            torch.set_num_threads(2)
            return time.perf_counter() - t0
        return run

    stacked_of = lambda i: stacked[i % len(stacked)]  # noqa: E731
    arms = {
        "CE step (stacked)": timed(ce, stacked_of),
        "AU step (stacked)": timed(au, stacked_of),
        "AU step, full pipeline": timed(au, lambda i: next(loaders["pipeline"])),
        "AU step, pipeline, images in memory": timed(au, lambda i: next(loaders["memory"])),
        "AU step, pipeline, 7x7 AU maps": timed(au, lambda i: next(loaders["layer"])),
        "AU step, channels_last": timed(au_cl, stacked_of, channels_last=True),
        "AU step, 1 thread": timed(au, stacked_of, threads=1),
    }
    if args.compile:
        compiled = make_step(cfg, 9.0, compile_model=True)
        t0 = time.perf_counter()
        try:
            compiled(stacked[0])
            arms["AU step, torch.compile"] = timed(compiled, stacked_of)
            print(f"torch.compile: first step (compilation) {time.perf_counter() - t0:.0f} s")
        except Exception as exc:  # noqa: BLE001 - reported, not fatal: inductor needs a C++ compiler
            print(f"torch.compile failed: {type(exc).__name__}: {str(exc)[:200]}")
    return arms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="timed rounds (one step of every arm per round)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--out", default="results/bench/cpu_recipe.json")
    args = ap.parse_args()
    cfg = preset_dict("fer2013_lite0")
    if cfg["data_root"] is None:
        sys.exit("FER2013 is absent (../shared/data/fer2013): nothing to measure")
    torch.set_num_threads(2)
    common = dict(root=cfg["data_root"], image_size=cfg["image_size"], landmarks="detect", augment=True,
                  progress=False, splits=["train"], mean=(0.5,) * 3, std=(0.5,) * 3,
                  max_per_class=max(32, (args.steps + 2) * args.batch // 5), **cfg["dataset_kwargs"])
    ds = build_datasets("fer2013", **common)["train"]
    ds_memory = build_datasets("fer2013", **common)["train"]
    for i, r in enumerate(ds_memory.records):
        r.image = ds_memory.load_rgb(i)  # decoded once, held in memory
    ds_layer = build_datasets("fer2013", **common)["train"]
    ds_layer.au_map_size = (7, 7)
    stacked = batches(ds, args.batch, 2)
    arms = arms_for(cfg, ds, ds_memory, ds_layer, stacked, args)
    times: dict[str, list[float]] = {name: [] for name in arms}
    for i in range(args.steps + 1):  # round 0 warms every arm up and is not counted
        order = list(arms) if i % 2 == 0 else list(reversed(arms))
        for name in order:
            t = arms[name](i)
            if i > 0:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ref = med["AU step (stacked)"]
    print(f"{'arm':40s} {'median step s':>14s} {'img/s':>8s} {'vs AU stacked':>14s}")
    for name, t in med.items():
        print(f"{name:40s} {t:14.3f} {args.batch / t:8.1f} {t / ref:13.2f}x")
    ratios = {
        "au_over_ce_step": med["AU step (stacked)"] / med["CE step (stacked)"],
        "pipeline_over_stacked_throughput": med["AU step (stacked)"] / med["AU step, full pipeline"],
        "in_memory_over_png_throughput": med["AU step, full pipeline"] / med["AU step, pipeline, images in memory"],
        "layer_maps_over_image_maps_throughput": med["AU step, full pipeline"] / med["AU step, pipeline, 7x7 AU maps"],
        "channels_last_over_default_step": med["AU step, channels_last"] / ref,
        "one_thread_over_two_step": med["AU step, 1 thread"] / ref,
    }
    if "AU step, torch.compile" in med:
        ratios["compile_over_eager_step"] = med["AU step, torch.compile"] / ref
    print("\n".join(f"{k:40s} {v:.3f}" for k, v in ratios.items()))
    atomic_write_json(Path(args.out), {"run": run_info(vars(args)), "median_step_s": med, "ratios": ratios,
                                       "batch": args.batch, "steps": args.steps,
                                       "all_step_s": {k: [float(x) for x in v] for k, v in times.items()}})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
