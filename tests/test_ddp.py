"""DistributedDataParallel on CPU: `torchrun --nproc_per_node 2` (gloo) on a tiny run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import json, os, sys
    sys.path.insert(0, {tests!r})
    from _toy_data import toy_splits
    from fer_lib.training.train import TrainConfig, train

    config = TrainConfig(backbone="resnet18", layers=(4, 5), epochs=2, image_size=32, batch_size=8, lr=0.02,
                         device="cpu", landmarks="ground_truth", out_dir=sys.argv[1], seed=5, au_weight=9.0)
    results = train(config, toy_splits(32))
    with open(os.path.join(sys.argv[2], "rank%s.json" % os.environ.get("RANK", "0")), "w") as fh:
        json.dump({{"test": results["test"], "checksums": results.get("rank_param_checksums"),
                   "world_size": results["world_size"]}}, fh)
""")


@pytest.mark.slow
def test_torchrun_two_cpu_processes_stay_in_sync(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun not found beside the Python interpreter")
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    out, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", str(script), str(out), str(reports)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = json.loads((reports / "rank0.json").read_text())
    r1 = json.loads((reports / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    checksums = r0["checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # identical parameters on both ranks
    assert r0["test"] == r1["test"]  # gathered evaluation: every rank sees the same metrics
    assert r0["test"]["n"] == 21  # the shards cover the whole test set exactly once
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["test"]["accuracy"] == r0["test"]["accuracy"]
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["train"]["n"] == 48  # 2 ranks x 3 batches x 8 images
    assert not (out / ".lock").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best.pt", "last.pt"]
