"""Faults that long GPU jobs meet, on the DiT trainer: kill -9, a rank dying under torchrun, a full or unwritable disk;
and kill -9 on the VA-VAE trainer."""
import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, torchrun
from test_train_dit import TINY, assert_same_state, train, write_latents
from test_train_vavae import TINY as VAVAE_TINY, make_images

RUN = [*TINY, "--log_every=10", "--ckpt_every=5", "--global_batch_size=8"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_latents(str(tmp_path_factory.mktemp("latents")))


def run(*args, **kwargs):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train_dit.py"), *RUN, *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_kill_9_then_resume_matches_an_uninterrupted_run(data, tmp_path):
    common = [f"--data_dir={data}", "--epochs=10"]  # 80 steps, a checkpoint every 5
    straight = run(*common, f"--out_dir={tmp_path / 'straight'}")
    killed_dir = tmp_path / "killed"
    victim = run(*common, f"--out_dir={killed_dir}")
    deadline = time.time() + 240
    while not (killed_dir / "step_00000020.pt").exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    for name in os.listdir(killed_dir):  # whatever the moment of the kill, every checkpoint file is whole
        if name.endswith(".pt") and not name.startswith("."):
            torch.load(killed_dir / name, weights_only=True)
    assert straight.wait() == 0
    resumed = run(*common, f"--out_dir={killed_dir}")
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    assert_same_state(torch.load(tmp_path / "straight" / "step_00000080.pt", weights_only=True),
                      torch.load(killed_dir / "step_00000080.pt", weights_only=True))


WRAPPER = """
import os, runpy, sys
import config
save, marker = config.save_checkpoint, sys.argv[1]
def save_then_die(state, path):
    save(state, path)
    if state["step"] == 10 and not os.path.exists(marker):  # die once, right after the step-10 checkpoint
        open(marker, "w").close()
        os._exit(17)
config.save_checkpoint = save_then_die
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""


def test_rank_death_under_torchrun_restarts_and_resumes(data, tmp_path):
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER)
    common = [f"--data_dir={data}", "--epochs=4"]
    result = torchrun("--nproc_per_node=2", "--max-restarts=1", str(wrapper), str(tmp_path / "died"),
                      os.path.join(ROOT, "train_dit.py"), *RUN, *common, f"--out_dir={tmp_path / 'restarted'}",
                      env={"PYTHONPATH": ROOT})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (tmp_path / "died").exists(), "the injected failure did not happen"
    assert "resumed from" in result.stdout and "step_00000010.pt at step 10" in result.stdout
    straight = torchrun("--nproc_per_node=2", os.path.join(ROOT, "train_dit.py"), *RUN, *common,
                        f"--out_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert_same_state(torch.load(tmp_path / "straight" / "step_00000032.pt", weights_only=True),
                      torch.load(tmp_path / "restarted" / "step_00000032.pt", weights_only=True))


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(data, tmp_path, monkeypatch):
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=2", "--max_steps=5", "--ckpt_every=5")
    before = (tmp_path / "step_00000005.pt").read_bytes()
    real_save = torch.save

    def save_until_disk_full(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", save_until_disk_full)
    with pytest.raises(SystemExit, match="could not write checkpoint .*step_00000010.pt: No space left on device"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=3", "--ckpt_every=5")
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["step_00000005.pt"]  # no temp file, no half checkpoint
    assert (tmp_path / "step_00000005.pt").read_bytes() == before


def test_unwritable_out_dir_is_a_clear_error(data, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match="could not write checkpoint .*a_file/run/step_00000005.pt"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path / 'a_file' / 'run'}", "--epochs=2", "--max_steps=5",
              "--ckpt_every=5")
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_pickled_checkpoint_needs_the_explicit_flag(data, tmp_path):
    import argparse
    torch.save({"model": {}, "args": argparse.Namespace(lr=1e-4)}, tmp_path / "step_00000001.pt")  # as the release does
    with pytest.raises(SystemExit, match="pickled Python objects .* --allow_unsafe_checkpoint=True"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=1")


def test_vavae_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    make_images(tmp_path / "data", 8, size=64)  # 2 steps of 4 per epoch
    common = [sys.executable, os.path.join(ROOT, "train_vavae.py"), *VAVAE_TINY, f"--data_dir={tmp_path / 'data'}",
              "--epochs=5", "--max_steps=10", "--ckpt_every=2", "--disc_start=1", "--ema_decay=0.9", "--image_every=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the two runs side by side, one core each

    def start(name):
        return subprocess.Popen([*common, f"--out_dir={tmp_path / name}"], cwd=ROOT, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    straight, victim = start("straight"), start("killed")
    killed_dir, deadline = tmp_path / "killed", time.time() + 240
    while not (killed_dir / "step_00000004.pt").exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed_dir / "step_00000010.pt").exists()
    for name in os.listdir(killed_dir):  # whatever the moment of the kill, every checkpoint file is whole
        if name.endswith(".pt") and not name.startswith("."):
            torch.load(killed_dir / name, weights_only=True)
    assert straight.wait() == 0, straight.stdout.read()
    resumed = start("killed")
    out = resumed.communicate()[0]
    assert resumed.returncode == 0, out
    assert "resumed from" in out
    a, b = (torch.load(tmp_path / name / "step_00000010.pt", weights_only=True) for name in ("straight", "killed"))
    for key in ("autoencoder", "autoencoder_ema", "vf_loss", "discriminator"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for key in ("optimizer_ae", "optimizer_disc"):
        for i, state in a[key]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, b[key]["state"][i][name]), (key, i, name)
