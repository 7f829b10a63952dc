"""bench.py: its arithmetic on hand-computed numbers, a tiny run of every part, the side-by-side option, bad inputs;
config/gpu_check.sh in its tiny mode."""
import importlib.util
import os
import re
import runpy
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_bad_inputs import expect_clear_error, files, fresh_out_dir, run_script  # noqa: F401 -- files: a fixture

OFFICIAL = os.path.join(ROOT, ".official")  # the release's models/, exported as BENCHMARKS.md shows (not in git)
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


def test_official_side_by_side_agrees_on_the_same_weights():
    if not os.path.isfile(os.path.join(OFFICIAL, "models", "lightningdit.py")):
        pytest.skip(f"the release's models/ are not in {OFFICIAL} (BENCHMARKS.md shows how to export them)")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("einops (imported by the official models/) is not installed")
    code, out = run_bench(*TINY, "--parts=", f"--official_repo={OFFICIAL}", env={"TORCHDYNAMO_DISABLE": "1"})
    assert code == 0, out
    match = re.search(r"ours ([\d.]+) ms, official ([\d.]+) ms, official / ours = ([\d.]+); "
                      r"max \|output difference\| (\S+) \(max \|output\| ([\d.]+)\)", out)
    assert match, out
    assert float(match[4]) <= 1e-5 and float(match[5]) > 0.1  # same outputs, and not the zero-init output
    assert "dit train step" not in out  # --parts= runs only the comparison


# -----------------------------------------------------------------------------
# bad inputs: one clear error line, out_dir untouched (fixtures and helpers in test_bad_inputs.py)

BENCH_TINY = ["--depth=1", "--hidden_size=32", "--num_heads=2", "--latent_size=2", "--latent_channels=4",
              "--batch_size=2", "--warmup=0", "--iters=1", "--vae_ch=32", "--image_size=32", "--vae_batch_size=1",
              "--vf_model=vit_tiny_patch16_224", "--vf_image_size=32", "--inception_batch_size=1"]


@pytest.mark.parametrize("args, pattern", [
    (["--no_such_option=1"], "unknown option --no_such_option"),
    (["--iters=ten"], "--iters='ten' is not a valid int"),
    (["--peak_flops=[1]"], "--peak_flops expects float"),
    (["{f}/nope.py"], "config file .*nope.py does not exist"),
    (["--parts=train,fid"], "--parts=train,fid names unknown parts"),
    (["--iters=0"], "--iters=0 is not allowed: it must be >= 1$"),
    (["--batch_size=0"], "--batch_size=0 is not allowed: it must be >= 1$"),
    (["--num_steps=1"], "--num_steps=1 is not allowed: it must be >= 2$"),
    (["--cfg_interval_start=1.5"], r"--cfg_interval_start=1.5 is not allowed: it must be in \[0, 1\]$"),
    (["--compile=yes"], "--compile='yes' is not allowed: it must be one of True, False, None$"),
    (["--parts=train", "--model_name=LightningDiT-Q/3"], "unknown model 'LightningDiT-Q/3'"),
    (["--parts=vavae", "--vae_ch=48"], "--vae_ch \\(48\\) must be a multiple of 32"),
    (["--parts=vavae", "--image_size=40"], "--image_size \\(40\\) a multiple of 16"),
    (["--parts=vavae", "--vf_model=vit_no_such_model"], "unknown foundation model 'vit_no_such_model'"),
    (["--parts=vavae", "--vf_image_size=64"], "token grid"),
    (["--parts=inception", "--inception_weights={f}/nope.pth"], "Inception weights .*nope.pth do not exist"),
    (["--parts=inception", "--inception_weights={f}/vavae.pt"], "not an FID Inception-v3 state dict"),
    (["--parts=", "--official_repo={f}/missing"],
     "--official_repo=.*missing is not a checkout of hustvl/LightningDiT .*export the release's models/ folder"),
])
def test_bench(files, tmp_path, args, pattern):
    out = fresh_out_dir(tmp_path)
    args = [a.format(f=files) for a in args]
    expect_clear_error(lambda: run_script("bench.py", [*BENCH_TINY, *args]), out, pattern)


# -----------------------------------------------------------------------------
# config/gpu_check.sh: proven on the CPU before any GPU time is spent on it

STEPS = ("tests", "train", "official", "sample", "vavae", "inception", "loop")


def gpu_check(out, **env):
    env = {**os.environ, "GPU_CHECK_TINY": "1", "PYTHON": sys.executable, "OUT": str(out), **env}
    result = subprocess.run(["sh", "config/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    return result.returncode, result.stdout + result.stderr, (out / "summary.txt").read_text()


def status(step, ran):
    """A step's status in summary.txt: the official step is skipped where the release's models/ are not exported."""
    if step == "official" and not os.path.isfile(os.path.join(OFFICIAL, "models", "lightningdit.py")):
        return "skipped (no .official)"
    return ran


def summary_line(step, ran):
    return re.compile(rf"^{step} +{re.escape(status(step, ran))} +\d+ s$", re.M)


def test_gpu_check_tiny_mode_passes_every_step_and_leaves_its_logs(tmp_path):
    code, out, summary = gpu_check(tmp_path)
    assert code == 0, out[-6000:]
    assert all(summary_line(step, "ok").search(summary) for step in STEPS), summary
    assert "0 of 7 steps failed" in summary
    # what comes back from the device: at most 8 files, none in folders
    assert sorted(os.listdir(tmp_path)) == sorted([f"{step}.log" for step in STEPS] + ["summary.txt"])
    for name, lines in (("train.log", 2), ("sample.log", 8), ("vavae.log", 3), ("inception.log", 1)):
        assert len(re.findall(r"images/s", (tmp_path / name).read_text())) == lines, name
    assert "1 passed" in (tmp_path / "tests.log").read_text()
    loop = (tmp_path / "loop.log").read_text()
    assert "ok: the second run resumed at step 2" in loop and "ok: sample grids at steps 2 and 4" in loop
    assert "dit train step (B=4)" in summary and "250-step Euler, skipping" in summary  # results gathered


@pytest.mark.parametrize("env, ran", [({"GPU_CHECK_SECONDS": "0"}, "out of time"),  # every command refused
                                      ({"PYTHON": "false"}, "failed (exit 1)")])  # every command fails
def test_gpu_check_goes_on_after_failures_and_says_so(tmp_path, env, ran):
    code, out, summary = gpu_check(tmp_path, **env)
    assert code == 1, out[-6000:]
    assert all(summary_line(step, ran).search(summary) for step in STEPS), summary
    failed = [step for step in STEPS if status(step, ran) == ran]
    assert f"{len(failed)} of 7 steps failed" in summary
    for step in failed:  # each step tried its commands, whatever happened to the steps before
        assert "$ " in (tmp_path / f"{step}.log").read_text(), step
