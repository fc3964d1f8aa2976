"""One short GPU check (at most ~5 minutes on one GPU): the paper preset's model on the device.

1. ResNet50 at 224 px (the paper preset), AMP (fp16 + GradScaler) and channels_last, on
   synthetic faces (fer_lib's generator, exact landmarks): CE-only and AU-guided (lambda 9,
   cosine, last stage) steps interleaved on the same batches -> images/s of each and the
   AU / CE step-time ratio (goal <= 1.03), peak GPU memory.
2. AU heatmaps rendered on the device (fer_lib.faces.au.render_heatmaps) at 224 px: maps/s.
3. An evaluation pass (fer_lib.training.train.evaluate: accuracy, ATT-COS) over the batches: images/s.
4. DDP with NCCL on every visible GPU: `torchrun --standalone --nproc_per_node N -m fer_lib.training.train`
   for a few steps on the synthetic set; the ranks' parameter checksums must agree.
Prints one summary table and writes JSON (default results/gpu_check/gpu_check.json).

    python bench/gpu_check.py                   # on a machine with CUDA
    python bench/gpu_check.py --steps 100 --ddp-steps 20 --json results/gpu_check/gpu_check.json
Without CUDA it says so and exits with status 2 (nothing is measured on a CPU here).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fer_lib.faces.au import EXPRESSIONS, render_heatmaps
from fer_lib.data import generate_sample
from fer_lib.training.losses import AUGuidedLoss
from fer_lib.models import build_model
from fer_lib.training.train import DistContext, evaluate
from fer_lib.utils import REPO_ROOT, atomic_write_json, run_info, seed_everything

SIZE = 224


def synthetic_batch(batch_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Synthetic faces with exact anchors: images (B,3,224,224), labels, AU maps (B,1,224,224), valid."""
    faces = [generate_sample(EXPRESSIONS[i % 7], seed=0, index=i) for i in range(min(batch_size, 28))]
    reps = -(-batch_size // len(faces))
    images = np.stack([np.asarray(f.image) for f in faces] * reps)[:batch_size]
    anchors = np.stack([f.anchors for f in faces] * reps)[:batch_size]
    labels = torch.tensor([f.label for f in faces] * reps)[:batch_size]
    x = torch.from_numpy(images).float().div(255).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = ((x - 0.45) / 0.225).to(device).contiguous(memory_format=torch.channels_last)
    maps, valid = render_heatmaps(torch.as_tensor(anchors, device=device), labels.to(device), SIZE)
    return x, labels.to(device), maps[:, None], valid, torch.as_tensor(anchors, device=device)


def step_times(steps: int, batch_size: int, device: torch.device) -> dict:
    """CE-only vs AU-guided steps (AMP, channels_last), interleaved; wall time after synchronize."""
    x, y, maps, valid, _ = synthetic_batch(batch_size, device)
    arms = {}
    for name, weight in (("ce", 0.0), ("au", 9.0)):
        torch.manual_seed(0)
        model = build_model("resnet50", layers=("last",), image_size=SIZE).to(device)
        model = model.to(memory_format=torch.channels_last).train()
        arms[name] = (model, torch.optim.SGD(model.parameters(), lr=2e-3, momentum=0.9),
                      AUGuidedLoss(weight), torch.amp.GradScaler("cuda"))
    times = {name: [] for name in arms}
    torch.cuda.reset_peak_memory_stats(device)
    for step in range(steps + 5):
        for name in (arms if step % 2 == 0 else reversed(list(arms))):
            model, opt, crit, scaler = arms[name]
            torch.cuda.synchronize(device)
            t = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.float16):
                logits, feats = model(x)
            loss, _ = crit(logits, feats, y, maps, valid)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            torch.cuda.synchronize(device)
            if step >= 5:  # warm-up steps (cuDNN autotuning) are not timed
                times[name].append(time.perf_counter() - t)
    ce, au = statistics.median(times["ce"]), statistics.median(times["au"])
    return {"ce_images_per_s": batch_size / ce, "au_images_per_s": batch_size / au, "au_over_ce": au / ce,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30, "steps": steps,
            "batch_size": batch_size, "model": arms["au"][0]}


def heatmaps_per_s(device: torch.device, batch: int = 512, repeats: int = 20) -> float:
    _, _, _, _, anchors = synthetic_batch(28, device)
    anchors = anchors.repeat(-(-batch // 28), 1, 1)[:batch]
    labels = torch.arange(batch, device=device) % 7
    render_heatmaps(anchors, labels, SIZE)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(repeats):
        render_heatmaps(anchors, labels, SIZE)
    torch.cuda.synchronize(device)
    return batch * repeats / (time.perf_counter() - t)


class _Batches(torch.utils.data.Dataset):
    """The synthetic batch as a dataset for fer_lib.training.train.evaluate (CPU tensors, as a DataLoader gives)."""

    def __init__(self, x, y, maps, valid, repeat: int):
        self.items = (x.float().cpu(), y.cpu(), maps.cpu(), valid.cpu())
        self.repeat = repeat

    def __len__(self) -> int:
        return len(self.items[1]) * self.repeat

    def __getitem__(self, i: int):
        j = i % len(self.items[1])
        return tuple(t[j] for t in self.items)


def evaluation_pass(model, batch_size: int, device: torch.device) -> dict:
    x, y, maps, valid, _ = synthetic_batch(batch_size, device)
    data = _Batches(x, y, maps[:, 0:1], valid, repeat=8)
    t = time.perf_counter()
    res = evaluate(model, data, device, batch_size=batch_size, amp=True, ctx=DistContext(device=device))
    torch.cuda.synchronize(device)
    return {"images_per_s": len(data) / (time.perf_counter() - t), "att_cos": res["att_cos_mean"], "n": res["n"]}


def ddp_run(steps: int, timeout: int) -> dict:
    """fer_lib.training.train under torchrun with NCCL on every visible GPU, a few steps; checksums of the ranks."""
    n = torch.cuda.device_count()
    out = Path(tempfile.mkdtemp(prefix="gpu_check_ddp_"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           "-m", "fer_lib.training.train", "--dataset", "synthetic", "--landmarks", "ground_truth", "--backbone", "resnet50",
           "--image-size", "224", "--batch-size", "32", "--epochs", "1", "--max-steps-per-epoch", str(steps),
           "--dataset-kwargs", json.dumps({"n_per_class": 40}), "--device", "cuda", "--out-dir", str(out)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    wall = time.perf_counter() - t
    metrics = json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").is_file() else {}
    sums = metrics.get("rank_param_checksums") or []
    return {"gpus": n, "returncode": proc.returncode, "wall_s": wall, "world_size": metrics.get("world_size"),
            "checksums_agree": bool(sums) and max(sums) - min(sums) <= 1e-6 * max(1.0, abs(sums[0])),
            "backend": "nccl", "stderr_tail": proc.stderr[-800:] if proc.returncode else ""}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--ddp-steps", type=int, default=20)
    p.add_argument("--ddp-timeout", type=int, default=150)
    p.add_argument("--json", default=str(REPO_ROOT / "results" / "gpu_check" / "gpu_check.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device here: bench/gpu_check.py measures nothing on a CPU (run it on a GPU machine)")
        return 2
    seed_everything(0)
    device = torch.device("cuda", 0)
    result = {"run": run_info(vars(args)), "device": torch.cuda.get_device_name(device),
              "cuda": torch.version.cuda, "gpus": torch.cuda.device_count()}
    steps = step_times(args.steps, args.batch_size, device)
    model = steps.pop("model")
    result["train"] = steps
    result["heatmaps_per_s"] = heatmaps_per_s(device)
    result["evaluate"] = evaluation_pass(model, args.batch_size, device)
    result["ddp"] = ddp_run(args.ddp_steps, args.ddp_timeout)
    rows = [("device", f"{result['device']} x{result['gpus']} (CUDA {result['cuda']})"),
            ("train img/s, CE (AMP, channels_last)", f"{steps['ce_images_per_s']:.0f}"),
            ("train img/s, AU-guided", f"{steps['au_images_per_s']:.0f}"),
            ("AU / CE step time (goal <= 1.03)", f"{steps['au_over_ce']:.3f}"),
            ("peak memory", f"{steps['peak_memory_gib']:.2f} GiB (batch {args.batch_size})"),
            ("AU heatmaps/s at 224 px on the device", f"{result['heatmaps_per_s']:.0f}"),
            ("evaluation img/s (AMP)", f"{result['evaluate']['images_per_s']:.0f}"),
            ("DDP (NCCL)", f"{result['ddp']['gpus']} GPU(s), rc {result['ddp']['returncode']}, "
                           f"checksums agree: {result['ddp']['checksums_agree']}, {result['ddp']['wall_s']:.0f} s")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    atomic_write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0 if result["ddp"]["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
