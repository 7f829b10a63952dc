"""Faults that long GPU jobs meet, on the DiT trainer: kill -9, a rank dying under torchrun, a full or unwritable disk;
and kill -9 on the VA-VAE trainer."""
import json
import os
import re
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
import config.runtime as config
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


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(data, tmp_path):
    """A real full disk (RLIMIT_FSIZE: writes past 1 MiB fail with EFBIG inside torch's zip writer, which raises
    RuntimeError, not OSError): one error line, no temp file, the earlier checkpoint intact."""
    import resource
    subprocess.run([sys.executable, os.path.join(ROOT, "train_dit.py"), *RUN, f"--data_dir={data}",
                    f"--out_dir={tmp_path}", "--epochs=2", "--max_steps=5", "--ckpt_every=5", "--depth=1",
                    "--hidden_size=32"], cwd=ROOT, check=True, capture_output=True)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert 0 < os.path.getsize(tmp_path / "step_00000005.pt") < 2 ** 20

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(tmp_path / "step_00000005.pt") // 2,) * 2)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_dit.py"), *RUN, f"--data_dir={data}",
                             f"--out_dir={tmp_path}", "--epochs=3", "--ckpt_every=5", "--depth=1", "--hidden_size=32"],
                            cwd=ROOT, capture_output=True, text=True, preexec_fn=small_disk)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line, no traceback
    assert re.fullmatch(r"error: could not write .*step_00000010.pt \(.*\). Free disk space or choose a writable "
                        r"folder; files written before are intact", result.stderr.strip()), result.stderr
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert {k: after[k] for k in before if k != "metrics.jsonl"} == {k: v for k, v in before.items()
                                                                        if k != "metrics.jsonl"}
    assert set(after) == set(before)  # no temp file, no half checkpoint


def test_unwritable_out_dir_is_found_at_start(data, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(SystemExit, match="could not create out_dir .*a_file/run: Not a directory"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path / 'a_file' / 'run'}", "--epochs=2")
    assert "step 1/" not in capsys.readouterr().out  # stopped before any training
    with pytest.raises(SystemExit, match=r"out_dir .*a_file is a file, not a folder; choose another --out_dir"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path / 'a_file'}", "--epochs=2")
    assert os.listdir(tmp_path) == ["a_file"] and (tmp_path / "a_file").read_text() == "not a folder"


def test_temp_files_of_a_killed_save_are_removed_at_start(data, tmp_path, capsys):
    tmp_path.joinpath(".step_00000005.pt.tmp4242").write_bytes(b"half a checkpoint")
    tmp_path.joinpath(".metrics.png.tmp17").write_bytes(b"half a plot")
    tmp_path.joinpath("notes.tmp1").write_text("the user's own file")
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=1", "--max_steps=1")
    assert "removed 2 temporary file(s) of an earlier interrupted save" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "notes.tmp1", "step_00000001.pt"]


def wait_for_log_lines(folder, n, process, deadline=240):
    end = time.time() + deadline
    path = folder / "metrics.jsonl"
    while process.poll() is None and time.time() < end:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"the run ended or stalled before step {n}")


def test_sigterm_saves_a_checkpoint_and_resume_is_exact(data, tmp_path):
    common = [f"--data_dir={data}", "--epochs=10", "--log_every=1"]  # 80 steps, a checkpoint every 5
    straight = run(*common, f"--out_dir={tmp_path / 'straight'}")
    victim = run(*common, f"--out_dir={tmp_path / 'stopped'}")
    wait_for_log_lines(tmp_path / "stopped", 7, victim)
    victim.send_signal(signal.SIGTERM)
    out = victim.communicate()[0]
    assert victim.returncode == 0, out
    assert "SIGTERM: stopping with a checkpoint at the next step" in out
    stopped_at = int(re.search(r"stopped by a signal; rerun the same command to resume: step (\d+)/80", out)[1])
    assert 7 < stopped_at < 80 and (tmp_path / "stopped" / f"step_{stopped_at:08d}.pt").exists()
    resumed = run(*common, f"--out_dir={tmp_path / 'stopped'}")
    assert resumed.wait() == 0 and straight.wait() == 0
    assert_same_state(torch.load(tmp_path / "straight" / "step_00000080.pt", weights_only=True),
                      torch.load(tmp_path / "stopped" / "step_00000080.pt", weights_only=True))
    steps = [json.loads(line)["step"] for line in open(tmp_path / "stopped" / "metrics.jsonl")]
    assert steps == list(range(1, 81))


def test_sigterm_under_torchrun_stops_every_rank_at_one_step(data, tmp_path):
    common = [os.path.join(ROOT, "train_dit.py"), *RUN, f"--data_dir={data}", "--epochs=10", "--log_every=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo, also on a one-GPU machine
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    victim = subprocess.Popen([*launcher, *common, f"--out_dir={tmp_path / 'stopped'}"], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_log_lines(tmp_path / "stopped", 5, victim)
        victim.send_signal(signal.SIGTERM)  # the launcher passes it on to both ranks, as a cluster's preemption does
        out = victim.communicate(timeout=120)[0]
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    stopped_at = int(re.search(r"stopped by a signal; rerun the same command to resume: step (\d+)/80", out)[1])
    assert (tmp_path / "stopped" / f"step_{stopped_at:08d}.pt").exists(), out
    for folder in ("stopped", "straight"):
        result = torchrun("--nproc_per_node=2", *common, f"--out_dir={tmp_path / folder}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert_same_state(torch.load(tmp_path / "straight" / "step_00000080.pt", weights_only=True),
                      torch.load(tmp_path / "stopped" / "step_00000080.pt", weights_only=True))


def test_a_stuck_rank_ends_the_job_after_the_collective_timeout(data, tmp_path):
    """Rank 1 stops (SIGSTOP: alive, not progressing); rank 0 gives up after --timeout_minutes with one clear line."""
    victim = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               os.path.join(ROOT, "train_dit.py"), *RUN, f"--data_dir={data}", "--epochs=100",
                               "--log_every=1", "--timeout_minutes=0.1", f"--out_dir={tmp_path}"], cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_log_lines(tmp_path, 3, victim)
        ranks = subprocess.run(["pgrep", "-P", str(victim.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2
        stuck = max(map(int, ranks))  # the second rank started
        os.kill(stuck, signal.SIGSTOP)
        out = victim.communicate(timeout=180)[0]
    finally:
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
    assert victim.returncode != 0
    assert re.search(r"error: rank \d waited more than 0.1 min for the other ranks \(.*\)\. Another rank is stuck or "
                     r"gone", out), out[-3000:]


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
