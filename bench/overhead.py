"""Training-time overhead of AU guidance, and data-pipeline throughput, measured side by side.

1. Time per training step (forward + loss + backward + SGD step), same batch and weights:
   - "plain": the bare timm model, cross-entropy only (no hooks at all);
   - "au":    the TappedModel with fer_lib.training.losses.AUGuidedLoss (lambda=9, cosine, last stage),
              AU maps area-resized to the layer inside the loss.
   Variants are interleaved (plain, au, au, plain, ...) over `--repeats` rounds and the
   median per-step time of each is compared: ratio = au / plain (goal <= 1.03). On CPU the
   clock is the process CPU time (time.process_time), so other jobs on shared cores do not
   distort the ratio; on GPU it is wall time after torch.cuda.synchronize().
2. Images/s of the full pipeline (DataLoader over the synthetic FERDataset -> AU train step)
   vs the same train step on pre-stacked tensors (ratio goal >= 0.9), also interleaved.

    python bench/overhead.py                       # CPU, 64 px, resnet18 + vit_tiny
    python bench/overhead.py --device cuda --image-size 112 --batch-size 64
Prints one line per measurement and writes a JSON summary with --json PATH.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fer_lib.training.losses import AUGuidedLoss
from fer_lib.models import build_model
from fer_lib.models.timm_backbones import _create_net
from fer_lib.utils import atomic_write_json, run_info, seed_everything


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_plain(net, opt, x, y, amp):
    with torch.autocast("cuda", torch.float16, enabled=amp):
        logits = net(x)
    loss = F.cross_entropy(logits.float(), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _step_au(model, opt, crit, x, y, maps, has, amp):
    with torch.autocast("cuda", torch.float16, enabled=amp):
        logits, feats = model(x)
    loss, _ = crit(logits, feats, y, maps, has)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _clock(device: torch.device) -> float:
    """Process CPU time on CPU (robust when other jobs share the cores), wall time on GPU."""
    return time.process_time() if device.type == "cpu" else time.perf_counter()


def _time(fn, steps: int, device: torch.device) -> float:
    _sync(device)
    t0 = _clock(device)
    for _ in range(steps):
        fn()
    _sync(device)
    return (_clock(device) - t0) / steps


def bench_loss_overhead(backbone: str, args, device: torch.device) -> dict:
    """Median step time of plain CE vs CE + AU loss on one model and batch, interleaved."""
    seed_everything(0)
    size, b = args.image_size, args.batch_size
    amp = device.type == "cuda"
    tapped = build_model(backbone, layers=("last",), image_size=size).to(device)
    plain_net = _create_net(backbone, 7, size, 3).to(device)  # the bare timm model: no hooks
    plain_net.load_state_dict(tapped.net.state_dict())
    if device.type == "cuda":
        tapped.to(memory_format=torch.channels_last)
        plain_net.to(memory_format=torch.channels_last)
    x = torch.randn(b, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 7, (b,), device=device)
    maps = torch.rand(b, 1, size, size, device=device)
    has = torch.ones(b, dtype=torch.bool, device=device)
    crit = AUGuidedLoss(9.0, "cosine")
    opt_plain = torch.optim.SGD(plain_net.parameters(), lr=1e-4, momentum=0.9)
    opt_au = torch.optim.SGD(tapped.parameters(), lr=1e-4, momentum=0.9)
    runs = {
        "plain": lambda: _step_plain(plain_net, opt_plain, x, y, amp),
        "au": lambda: _step_au(tapped, opt_au, crit, x, y, maps, has, amp),
    }
    for fn in runs.values():  # warm-up
        for _ in range(args.warmup):
            fn()
    times = {k: [] for k in runs}
    order = list(runs)
    for r in range(args.repeats):
        for name in (order if r % 2 == 0 else order[::-1]):
            times[name].append(_time(runs[name], args.steps, device))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"backbone": backbone, "ms_per_step": {k: 1000 * v for k, v in med.items()},
            "ratio_au_over_plain": med["au"] / med["plain"], "all_ms": {k: [1000 * t for t in v] for k, v in times.items()}}


def bench_pipeline(args, device: torch.device) -> dict:
    """Images/s of DataLoader(FERDataset) + AU step vs the AU step on pre-stacked tensors."""
    from torch.utils.data import DataLoader

    from fer_lib.data import build_datasets

    seed_everything(0)
    size, b = args.image_size, args.batch_size
    amp = device.type == "cuda"
    ds = build_datasets("synthetic", image_size=size, seed=0, landmarks="ground_truth", augment=True,
                        n_per_class={"train": args.pipeline_per_class}, splits=["train"], progress=False)["train"]
    model = build_model(args.pipeline_backbone, layers=("last",), image_size=size).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    crit = AUGuidedLoss(9.0, "cosine")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loader = DataLoader(ds, batch_size=b, shuffle=True, drop_last=True, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
    stacked = [tuple(t.to(device) for t in batch) for batch in loader]  # the same data, decoded once

    def step(images, labels, maps, has):
        images = images.to(device, non_blocking=True)
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
        _step_au(model, opt, crit, images, labels.to(device), maps.to(device), has.to(device), amp)

    def run_loader() -> tuple[int, float]:
        _sync(device)
        t0, n = _clock(device), 0
        for batch in loader:
            step(*batch)
            n += batch[0].shape[0]
        _sync(device)
        return n, _clock(device) - t0

    def run_stacked() -> tuple[int, float]:
        _sync(device)
        t0, n = _clock(device), 0
        for batch in stacked:
            step(*batch)
            n += batch[0].shape[0]
        _sync(device)
        return n, _clock(device) - t0

    run_stacked()  # warm-up
    rates = {"pipeline": [], "model_only": []}
    for r in range(args.pipeline_repeats):
        pair = [("pipeline", run_loader), ("model_only", run_stacked)]
        for name, fn in (pair if r % 2 == 0 else pair[::-1]):
            n, t = fn()
            rates[name].append(n / t)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"backbone": args.pipeline_backbone, "images": len(ds), "num_workers": args.num_workers,
            "images_per_s": med, "ratio_pipeline_over_model": med["pipeline"] / med["model_only"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--backbones", default="resnet18,vit_tiny_patch16_224")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=6, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--pipeline-backbone", default="resnet18")
    p.add_argument("--pipeline-per-class", type=int, default=12)
    p.add_argument("--pipeline-repeats", type=int, default=4)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--skip-pipeline", action="store_true")
    p.add_argument("--json", default=None, help="write the summary here (atomically)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    clock = "process CPU time" if device.type == "cpu" else "wall time"
    print(f"clock={clock} device={device} threads={torch.get_num_threads()} image_size={args.image_size} batch={args.batch_size}")
    summary = {"run": run_info(vars(args)), "device": str(device), "loss_overhead": [], "pipeline": None}
    for backbone in args.backbones.split(","):
        r = bench_loss_overhead(backbone.strip(), args, device)
        summary["loss_overhead"].append(r)
        ms = r["ms_per_step"]
        print(f"{r['backbone']:>24}: plain CE {ms['plain']:.1f} ms/step | CE+AU {ms['au']:.1f} ms/step | "
              f"ratio {r['ratio_au_over_plain']:.3f} (goal <= 1.03)", flush=True)
    if not args.skip_pipeline:
        r = bench_pipeline(args, device)
        summary["pipeline"] = r
        ips = r["images_per_s"]
        print(f"pipeline ({r['backbone']}, {r['images']} images, workers={r['num_workers']}): "
              f"DataLoader {ips['pipeline']:.1f} img/s | pre-stacked {ips['model_only']:.1f} img/s | "
              f"ratio {r['ratio_pipeline_over_model']:.3f} (goal >= 0.9)", flush=True)
    if args.json:
        atomic_write_json(Path(args.json), summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
