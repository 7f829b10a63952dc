"""bench.py: its arithmetic on hand-computed numbers, a tiny run of every part, and the side-by-side option."""
import importlib.util
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

from conftest import ROOT

MIRROR = os.path.join(ROOT, "..", ".mirror", "hustvl+LightningDiT", "repo")
TINY = ["--depth=2", "--hidden_size=64", "--num_heads=2", "--latent_size=8", "--latent_channels=4", "--batch_size=4",
        "--warmup=1", "--iters=2"]


def run_bench(*args, env=None):
    # one thread: timings are not checked, and two threads next to other busy processes run 10-100x slower
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    result = subprocess.run([sys.executable, "bench.py", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    return result.returncode, result.stdout + result.stderr


def bench_functions(monkeypatch):
    """bench.py's globals after a run that times nothing (--parts= and no official_repo)."""
    monkeypatch.setattr(sys, "argv", ["bench.py", "--parts="])
    with torch.random.fork_rng():  # bench.py seeds the global generator; leave other tests' state alone
        return runpy.run_path(os.path.join(ROOT, "bench.py"))


def test_throughput_and_mfu_on_hand_computed_numbers(monkeypatch):
    throughput = bench_functions(monkeypatch)["throughput"]
    # XL/1 training: 3 x 237.3 GFLOP per image, 64 images in 0.5 s on a 989 TFLOP/s H100
    images_per_second, mfu = throughput(3 * 237.3e9, 0.5, 64, 989e12)
    assert images_per_second == 128.0
    assert mfu == pytest.approx(128 * 711.9e9 / 989e12) and mfu == pytest.approx(0.0921368, abs=1e-7)
    assert throughput(1e9, 2.0, 10, 1e10) == (5.0, 0.5)  # 5 images/s x 1 GFLOP = half of 10 GFLOP/s
    assert throughput(1e9, 2.0, 10, 0.0) == (5.0, None)  # unknown peak (CPU): no MFU
    assert throughput(0, 2.0, 10, 1e10) == (5.0, None)  # unknown FLOPs: no MFU


def test_tiny_run_prints_every_part_with_consistent_numbers():
    code, out = run_bench(*TINY, "--num_steps=10", "--vae_ch=32", "--image_size=32", "--vae_batch_size=2",
                          "--vf_model=vit_tiny_patch16_224", "--vf_image_size=32", "--inception_batch_size=2",
                          "--peak_flops=1e12")
    assert code == 0, out
    assert "device: " in out and "torch " in out and "'batch_size': 4" in out and "'vae_ch': 32" in out
    rows = re.findall(r"^(.+?)\s+([\d.]+) ms\s+([\d.]+) images/s\s+MFU (\S+)\s+peak memory ([\d.]+) GiB", out, re.M)
    names = [name.strip() for name, *_ in rows]
    assert names == ["dit train step (B=4)", "dit sample step cfg=6.7", "dit sample step cfg=1.0",
                     "vavae encode (B=2)", "vavae decode (B=2)", "vavae train step (B=2)",
                     "inception features (B=2)"], out
    for name, ms, images_per_second, mfu, memory in rows:
        batch = 4 if name.startswith("dit") else 2
        assert float(images_per_second) == pytest.approx(batch / (float(ms) / 1e3), rel=0.02, abs=0.1), name
        assert mfu.endswith("%") and float(memory) > 0, name  # --peak_flops given: every part has an MFU
    # the shifted 10-point grid has 6 of its 9 Euler points at t >= 0.125, so 6 guided calls
    assert "10-step Euler, skipping the unconditional half (6 of 9 calls guided)" in out
    assert "10-step Euler, guiding every step (6 of 9 calls guided)" in out


def test_unknown_part_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench.py", "--parts=train,fid"])
    with pytest.raises(SystemExit, match=r"error: --parts=train,fid names unknown parts; choose from "
                                         r"train,sample,vavae,inception$"):
        runpy.run_path(os.path.join(ROOT, "bench.py"))


def test_official_side_by_side_agrees_on_the_same_weights(tmp_path):
    if not os.path.isdir(MIRROR):
        pytest.skip(f"official mirror {MIRROR} not found")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("einops (imported by the official models/) is not installed")
    archive = subprocess.run(["git", "-C", MIRROR, "archive", "HEAD", "models"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive.stdout, check=True)
    code, out = run_bench(*TINY, "--parts=", f"--official_repo={tmp_path}", env={"TORCHDYNAMO_DISABLE": "1"})
    assert code == 0, out
    match = re.search(r"ours ([\d.]+) ms, official ([\d.]+) ms, official / ours = ([\d.]+); "
                      r"max \|output difference\| (\S+) \(max \|output\| ([\d.]+)\)", out)
    assert match, out
    assert float(match[4]) <= 1e-5 and float(match[5]) > 0.1  # same outputs, and not the zero-init output
    assert "dit train step" not in out  # --parts= runs only the comparison
