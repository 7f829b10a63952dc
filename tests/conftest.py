import os
import signal
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub downloads in tests: DINOv2/VGG paths run on random weights
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GOLDEN = os.path.join(ROOT, "..", "shared", "golden")
ASSETS = os.path.join(ROOT, "..", "shared", "assets")


@pytest.fixture
def one_thread():
    """torchrun gives each rank one thread; use the same here, so float summation order matches bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def grad_mode_is_left_on():
    """Scripts run inside this process: one that turned autograd off globally would break every later test."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left torch's grad mode disabled"


def torchrun(*args, timeout=240, env=None):
    """python -m torch.distributed.run --standalone <args>, one thread per rank, in ROOT. On a timeout the whole process
    group is killed (subprocess.run would kill only the launcher and leave its ranks running)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args]
    # the multi-rank tests run on gloo even on a one-GPU machine (a test that wants CUDA passes CUDA_VISIBLE_DEVICES)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **(env or {})}
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung for {timeout} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, process.returncode, stdout, stderr)
