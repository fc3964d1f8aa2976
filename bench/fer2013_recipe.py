"""The FER2013 recipe's cost (preset `fer2013_lite0`), measured side by side in one run.

1. Training throughput through the full input pipeline (PNG decoding, cached landmarks,
   augmentation, AU maps), baseline (lambda 0) and AU-guided (lambda 9) steps interleaved on the
   same batches: images/s of each, their ratio, and the projected wall time of one epoch of the
   28,709 Training faces (two runs side by side on a 2-core CPU each get about half of it).
2. Loading a shipped checkpoint (fp16 safetensors + JSON card) vs loading its training checkpoint
   the way fer_lib did before checkpoints became plain data (torch.load, weights_only=False).
3. With --runs DIR [DIR ...]: the measured wall time per epoch and images/s of finished runs
   (their history.json / metrics.json), i.e. what the recipe cost for real.

    python bench/fer2013_recipe.py --steps 12 --runs runs/fer2013/lite0-112-l0-s0 runs/fer2013/lite0-112-l9-s0
Needs ../shared/data/fer2013 for part 1 (skipped with a message where it is absent).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fer_lib.models.checkpoints import load_file, shipped_checkpoints
from fer_lib.training.losses import AUGuidedLoss
from fer_lib.models import build_model, load_checkpoint
from fer_lib.training.presets import fer2013_root, preset_dict
from fer_lib.utils import atomic_write_json, run_info, seed_everything

TRAINING_FACES = 28_709


def pipeline_throughput(steps: int, batch_size: int) -> dict:
    """Images/s of baseline and AU-guided steps fed by the real FER2013 pipeline, interleaved."""
    from fer_lib.data import build_datasets

    cfg = preset_dict("fer2013_lite0")
    if cfg["data_root"] is None:
        return {"skipped": "../shared/data/fer2013 is absent"}
    seed_everything(0)
    ds = build_datasets("fer2013", root=cfg["data_root"], image_size=cfg["image_size"], landmarks="detect",
                        augment=True, progress=False, splits=["train"], mean=(0.5,) * 3, std=(0.5,) * 3,
                        max_per_class=max(64, steps * batch_size // 3), **cfg["dataset_kwargs"])["train"]
    loader = iter(torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True,
                                              generator=torch.Generator().manual_seed(0)))
    arms = {}
    for name, weight in (("baseline", 0.0), ("guided", 9.0)):
        model = build_model(cfg["backbone"], layers=cfg["layers"], image_size=cfg["image_size"], pretrained="imagenet")
        arms[name] = (model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4),
                      AUGuidedLoss(weight, "cosine", cfg["label_smoothing"]))
    times = {name: [] for name in arms}
    for step in range(steps + 1):
        t0 = time.perf_counter()
        images, labels, maps, has = next(loader)
        load_s = time.perf_counter() - t0
        order = list(arms) if step % 2 == 0 else list(reversed(arms))
        for name in order:
            model, opt, crit = arms[name]
            t1 = time.perf_counter()
            logits, feats = model(images)
            loss, _ = crit(logits, feats, labels, maps, has)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step:  # the first step warms up
                times[name].append(time.perf_counter() - t1 + load_s)
    out = {}
    for name, ts in times.items():
        per_step = statistics.median(ts)
        out[name] = {"images_per_s": batch_size / per_step, "epoch_s": TRAINING_FACES / (batch_size / per_step)}
    out["guided_over_baseline_step_time"] = out["baseline"]["images_per_s"] / out["guided"]["images_per_s"]
    return out


def checkpoint_load_times(repeats: int, training: list[str]) -> dict:
    """Seconds per load_checkpoint: each shipped checkpoint (safetensors + card) vs the training checkpoints
    given, read as before this version (trust=True: torch.load with weights_only=False), interleaved."""
    out = {}
    for name, path in shipped_checkpoints().items():
        card = json.loads(path.with_suffix(".json").read_text())
        rows = {"shipped": [], "safetensors_only": []}
        for i in range(repeats):
            t = time.perf_counter()
            load_checkpoint(path)
            rows["shipped"].append(time.perf_counter() - t)
            t = time.perf_counter()
            load_file(path)
            rows["safetensors_only"].append(time.perf_counter() - t)

        out[name] = {k: statistics.median(v) for k, v in rows.items()}
        out[name]["size_mib"] = path.stat().st_size / 2**20
        out[name]["backbone"] = card["model_config"]["backbone"]
    for ckpt in training:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            load_checkpoint(ckpt, trust=True)  # today's path before this version: weights_only=False
            times.append(time.perf_counter() - t)
        out[ckpt] = {"training_pt_unsafe": statistics.median(times), "size_mib": Path(ckpt).stat().st_size / 2**20}
    return out


def finished_runs(run_dirs: list[str]) -> dict:
    """Measured wall time per epoch and images/s of finished (or running) training runs."""
    out = {}
    for d in run_dirs:
        hist = Path(d) / "history.json"
        if not hist.is_file():
            out[d] = {"missing": str(hist)}
            continue
        history = json.loads(hist.read_text())
        epoch_s = [h["time_s"] for h in history]
        n = [h["train"]["n"] for h in history]
        out[d] = {"epochs": len(history), "epoch_s_median": statistics.median(epoch_s),
                  "images_per_s": sum(n) / sum(epoch_s), "val_accuracy": [h["val"]["accuracy"] for h in history]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--runs", nargs="*", default=[])
    p.add_argument("--training-checkpoints", nargs="*", default=[],
                   help="training .pt files to time as they were loaded before (for the load-time comparison)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"run": run_info(vars(args)), "threads": torch.get_num_threads()}
    result["pipeline"] = pipeline_throughput(args.steps, args.batch_size) if fer2013_root() else \
        {"skipped": "../shared/data/fer2013 is absent"}
    pl = result["pipeline"]
    if "skipped" not in pl:
        for name in ("baseline", "guided"):
            print(f"{name:9s} {pl[name]['images_per_s']:6.1f} img/s through the full pipeline "
                  f"({torch.get_num_threads()} threads) -> one epoch of {TRAINING_FACES} faces {pl[name]['epoch_s'] / 60:.1f} min")
        print(f"AU-guided / baseline step time: {pl['guided_over_baseline_step_time']:.3f}")
    else:
        print(f"pipeline: skipped ({pl['skipped']})")
    result["checkpoint_load_s"] = checkpoint_load_times(args.repeats, args.training_checkpoints)
    for name, row in result["checkpoint_load_s"].items():
        if "shipped" in row:
            print(f"load {name}: {row['shipped'] * 1000:.0f} ms (model rebuilt + fp16 weights, {row['size_mib']:.1f} MiB); "
                  f"weights alone {row['safetensors_only'] * 1000:.0f} ms")
        else:
            print(f"load {name} as before (weights_only=False): {row['training_pt_unsafe'] * 1000:.0f} ms "
                  f"({row['size_mib']:.1f} MiB)")
    result["runs"] = finished_runs(args.runs)
    for d, row in result["runs"].items():
        if "missing" in row:
            print(f"{d}: no history.json")
            continue
        print(f"{d}: {row['epochs']} epochs, {row['epoch_s_median'] / 60:.1f} min per epoch, "
              f"{row['images_per_s']:.1f} img/s, val accuracy by epoch {[round(a, 4) for a in row['val_accuracy']]}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
