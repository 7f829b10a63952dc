"""train_dit.py on tiny random latents: learning, exact resume (1 and 2 gloo ranks), faults and clear errors."""
import json
import os
import re
import runpy
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conftest import ASSETS, ROOT, torchrun

TINY = ["--model_name=LightningDiT-B/1", "--depth=2", "--hidden_size=64", "--num_heads=2", "--num_classes=4",
        "--global_batch_size=16", "--log_every=1"]


def write_latents(folder, n=64, shards=2, shape=(32, 4, 4), seed=0):
    """Each of 4 classes is a fixed random pattern plus a little noise: something a tiny model can learn."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    labels = torch.arange(n) % 4
    latents = torch.randn(4, *shape, generator=g)[labels] + 0.1 * torch.randn(n, *shape, generator=g)
    for s, part in enumerate(torch.arange(n).chunk(shards)):
        save_file({"latents": latents[part].contiguous(), "latents_flip": latents[part].flip(-1).contiguous(),
                   "labels": labels[part].contiguous()}, os.path.join(folder, f"latents_rank00_shard{s:03d}.safetensors"))
    torch.save({"mean": latents.mean((0, 2, 3), keepdim=True), "std": latents.std((0, 2, 3), keepdim=True)},
               os.path.join(folder, "latents_stats.pt"))
    return folder


def train(*args):
    """Run train_dit.py in this process (fast: no new interpreter); returns what it printed."""
    argv = sys.argv
    sys.argv = ["train_dit.py", *TINY, *args]
    try:
        runpy.run_path(os.path.join(ROOT, "train_dit.py"), run_name="__main__")
    finally:
        sys.argv = argv


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_latents(str(tmp_path_factory.mktemp("latents")))


def test_loss_goes_down(data, tmp_path, capsys):
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=15", "--lr=3e-3", "--ckpt_every=1000")
    losses = [float(line.split("| loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if "| loss " in line]
    assert len(losses) == 60
    assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10
    checkpoint = torch.load(tmp_path / "step_00000060.pt", weights_only=True)
    assert checkpoint["step"] == 60 and checkpoint["epoch"] == 15 and checkpoint["config"]["lr"] == 3e-3
    assert set(checkpoint) == {"model", "ema", "optimizer", "step", "epoch", "config"}


def assert_same_state(a, b):
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    for i, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][i][name]), (i, name)


def test_resume_is_bitwise_exact(data, tmp_path):
    common = [f"--data_dir={data}", "--epochs=2", "--ckpt_every=3", "--micro_batch_size=8", "--ema_decay=0.9"]
    train(*common, f"--out_dir={tmp_path / 'straight'}")
    train(*common, f"--out_dir={tmp_path / 'resumed'}", "--max_steps=3")
    train(*common, f"--out_dir={tmp_path / 'resumed'}")  # picks up step 3
    straight = torch.load(tmp_path / "straight" / "step_00000008.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "step_00000008.pt", weights_only=True)
    assert_same_state(straight, resumed)


def test_resume_picks_the_newest_step_not_the_largest_file(data, tmp_path):
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=1", "--ckpt_every=2")
    with open(tmp_path / "step_00000002.pt", "ab") as f:
        f.write(b"\0" * 10_000_000)  # the oldest checkpoint is now the largest file
    (tmp_path / ".step_00000005.pt.tmp123").write_bytes(b"half-written")  # a crash mid-write leaves only a temp file
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=2", "--ckpt_every=2")
    assert torch.load(tmp_path / "step_00000008.pt", weights_only=True)["step"] == 8


def train_under_torchrun(nproc, *args):
    result = torchrun(f"--nproc_per_node={nproc}", os.path.join(ROOT, "train_dit.py"), *TINY, *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_two_gloo_ranks_resume_bitwise(data, tmp_path):
    common = [f"--data_dir={data}", "--epochs=2", "--ckpt_every=2"]
    out = train_under_torchrun(2, *common, f"--out_dir={tmp_path / 'straight'}")
    assert "2 process(es) x 1 micro-batch(es) of 8" in out
    train_under_torchrun(2, *common, f"--out_dir={tmp_path / 'resumed'}", "--max_steps=2")
    train_under_torchrun(2, *common, f"--out_dir={tmp_path / 'resumed'}")
    straight = torch.load(tmp_path / "straight" / "step_00000008.pt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed" / "step_00000008.pt", weights_only=True)
    assert_same_state(straight, resumed)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path):
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=1", "--ckpt_every=2", "--max_steps=2")
    before = (tmp_path / "step_00000002.pt").read_bytes()
    with pytest.raises(SystemExit, match="non-finite loss at step"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=2", "--ckpt_every=2", "--lr=1e30")
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl", "metrics.png", "step_00000002.pt"]
    assert (tmp_path / "step_00000002.pt").read_bytes() == before


def test_nonfinite_skip_leaves_weights_and_ema_untouched(data, tmp_path, monkeypatch, capsys):
    import dit
    real_loss = dit.rectified_flow_loss

    def poisoned(model, x1, y, t, x0):
        mse, cos = real_loss(model, x1, y, t, x0)
        return mse * float("nan"), cos
    monkeypatch.setattr(dit, "rectified_flow_loss", poisoned)
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=1", "--nonfinite=skip", "--max_steps=2",
          "--ckpt_every=2", "--log_every=100")
    assert "step 0: non-finite loss, step skipped" in capsys.readouterr().out
    checkpoint = torch.load(tmp_path / "step_00000002.pt", weights_only=True)
    for name, value in checkpoint["ema"].items():
        assert torch.equal(value, checkpoint["model"][name]), name  # nothing was learnt, nothing was poisoned
    assert all(torch.isfinite(v).all() for v in checkpoint["model"].values())


def test_compile_smoke(data, tmp_path):
    """The one torch.compile run on CPU (a cold compile costs ~20 s)."""
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=1", "--max_steps=2", "--compile=True")
    assert torch.load(tmp_path / "step_00000002.pt", weights_only=True)["step"] == 2


def bad_shards(folder):
    write_latents(folder)
    save_file({"latents": torch.zeros(4, 32, 8, 8), "latents_flip": torch.zeros(4, 32, 8, 8),
               "labels": torch.zeros(4, dtype=torch.long)}, os.path.join(folder, "latents_rank01_shard000.safetensors"))


def nan_latents(folder):
    write_latents(folder)
    save_file({"latents": torch.full((16, 32, 4, 4), float("nan")), "latents_flip": torch.zeros(16, 32, 4, 4),
               "labels": torch.zeros(16, dtype=torch.long)}, os.path.join(folder, "latents_rank01_shard000.safetensors"))


def with_stats(**stats):
    def setup(folder, out):
        write_latents(folder)
        torch.save(stats, os.path.join(folder, "latents_stats.pt"))
    return setup


def with_labels(labels):
    def setup(folder, out):
        write_latents(folder)
        save_file({"latents": torch.zeros(16, 32, 4, 4), "latents_flip": torch.zeros(16, 32, 4, 4), "labels": labels},
                  os.path.join(folder, "latents_rank01_shard000.safetensors"))
    return setup


def truncated_shard(folder, out):
    write_latents(folder)
    path = os.path.join(folder, "latents_rank00_shard000.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) - 1000])


def vavae_checkpoint_in_out_dir(folder, out):
    write_latents(folder)
    torch.save({"autoencoder": {}, "optimizer_ae": {}, "step": 4}, os.path.join(out, "step_00000004.pt"))


def data_only(setup):
    return lambda folder, out: setup(folder)


STATS = dict(mean=torch.zeros(1, 32, 1, 1), std=torch.ones(1, 32, 1, 1))


@pytest.mark.parametrize("setup, args, message", [
    (None, [], "data_dir .* is not a folder; run prepare.py"),
    (data_only(os.makedirs), [], "holds no .safetensors shards"),
    (lambda f, o: (write_latents(f), os.remove(os.path.join(f, "latents_stats.pt"))), [], "latents_stats.pt is missing"),
    (data_only(bad_shards), [], r"holds latents of shape \[32, 8, 8\], others \[32, 4, 4\]"),
    (lambda f, o: (write_latents(f), open(os.path.join(f, "latents_rank00_shard000.safetensors"), "wb").write(b"x")),
     [], "is unreadable"),
    (truncated_shard, [], "shard .*shard000.safetensors is unreadable .*truncated\\); delete it and rerun prepare.py"),
    (with_labels(torch.zeros(16, 1, dtype=torch.long)), [], r"labels must be integers of shape \(N,\)"),
    (with_labels(torch.full((16,), 1.5)), [], r"labels must be integers of shape \(N,\), got torch.float32"),
    (with_stats(mean=STATS["mean"]), [], "latents_stats.pt lacks std"),
    (with_stats(mean=STATS["mean"], std=torch.zeros(1, 32, 1, 1)), [], "std must be positive"),
    (with_stats(mean=torch.zeros(1, 8, 1, 1), std=torch.ones(1, 8, 1, 1)), [], "statistics of 8 channels, the latents 32"),
    (lambda f, o: (write_latents(f), open(os.path.join(f, "latents_stats.pt"), "wb").write(b"PK\x03\x04 cut")), [],
     "latents_stats.pt is not a readable checkpoint"),
    (data_only(nan_latents), ["--epochs=4", "--log_every=1000"], "non-finite values in the latents"),
    (data_only(write_latents), ["--num_classes=3"], r"labels in .* span \[0, 3\], outside \[0, 3\)"),
    (data_only(write_latents), ["--epochs=1", "--max_steps=9"], "--max_steps=9 is past the end of --epochs=1"),
    (data_only(write_latents), ["--global_batch_size=128"], "fewer than one global batch"),
    (data_only(write_latents), ["--micro_batch_size=5"], "micro_batch_size 5 does not divide"),
    (data_only(write_latents), ["--nonfinite=maybe"], "--nonfinite='maybe' is not allowed: it must be one of stop, skip"),
    (data_only(write_latents), ["--bf16=no"], "--bf16='no' is not allowed: it must be one of True, False, None"),
    (data_only(write_latents), ["--compile=flase"], "--compile='flase' is not allowed"),
    (data_only(write_latents), ["--warmup_steps=-5"], "--warmup_steps=-5 is not allowed: it must be >= 0"),
    (data_only(write_latents), ["--ema_decay=2.0"], r"--ema_decay=2.0 is not allowed: it must be in \[0, 1\)"),
    (data_only(write_latents), ["--epochs=0"], "--epochs=0 is not allowed: it must be >= 1"),
    (data_only(write_latents), ["--max_steps=-5"], "--max_steps=-5 is not allowed"),
    (data_only(write_latents), ["--ckpt_every=0"], "--ckpt_every=0 is not allowed: it must be >= 1"),
    (data_only(write_latents), ["--log_every=0"], "--log_every=0 is not allowed"),
    (data_only(write_latents), ["--global_batch_size=0"], "--global_batch_size=0 is not allowed"),
    (data_only(write_latents), ["--global_batch_size=-16"], "--global_batch_size=-16 is not allowed: it must be >= 1"),
    (data_only(write_latents), ["--lr=-1"], "--lr=-1.0 is not allowed: it must be > 0"),
    (data_only(write_latents), ["--lr=1e999"], "--lr=inf is not allowed: it must be a finite number > 0"),
    (data_only(write_latents), ["--hidden_size=65"], "hidden_size 65 must be num_heads 2 x a multiple of 4"),
    (data_only(write_latents), ["--timeout_minutes=0"], "--timeout_minutes=0.0 is not allowed"),
    (data_only(write_latents), ["--init_weights=best"], "--init_weights='best' is not allowed: it must be one of ema"),
    (data_only(write_latents), ["--init_from=/no/such/file.pt"], "checkpoint /no/such/file.pt does not exist"),
    (lambda f, o: (write_latents(f), torch.save({"model": {}}, os.path.join(f, "m.pt"))),
     ["--init_from={f}/m.pt"], r"m.pt holds no ema weights \(--init_weights=ema; the other choice is model\)"),
    (data_only(write_latents), ["--model_name=LightningDiT-Q/3"], "unknown model 'LightningDiT-Q/3'"),
    (vavae_checkpoint_in_out_dir, [], "step_00000004.pt lacks model, ema, optimizer, config: it is not a train_dit.py checkpoint"),
])
def test_bad_input_is_a_clear_error(tmp_path, setup, args, message):
    from test_bad_inputs import expect_clear_error, fresh_out_dir
    folder, out = str(tmp_path / "data"), fresh_out_dir(tmp_path)
    if setup:
        setup(folder, str(out))
    args = [a.format(f=folder) for a in args]
    expect_clear_error(lambda: train(f"--data_dir={folder}", f"--out_dir={out}", *args), out, message)


def test_checkpoint_of_another_size_names_the_differing_keys(data, tmp_path):
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=1", "--max_steps=2", "--ckpt_every=2")
    with pytest.raises(SystemExit, match=r"does not fit this model .*unexpected: blocks\.1\.norm1\.weight"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path / 'small'}", "--epochs=1", "--depth=1",
              f"--init_from={tmp_path}")


def test_sample_grid_and_online_fid_when_a_decoder_is_given(data, tmp_path, capsys):
    from PIL import Image

    from vavae import AutoencoderKL
    torch.manual_seed(0)
    ae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())  # f2: 4x4 latents -> 8x8 px
    torch.save({"autoencoder": ae.state_dict(), "autoencoder_kwargs": ae.kwargs}, tmp_path / "ae.pt")
    with pytest.raises(SystemExit, match="--sample_every and --fid_every need --vavae_path"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--epochs=1", "--sample_every=2")
    train(f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--epochs=1", "--max_steps=2", "--sample_every=2",
          f"--vavae_path={tmp_path / 'ae.pt'}")
    grid = Image.open(tmp_path / "run" / "samples_00000002.png")
    assert grid.size == (8 * 8, 8) and grid.mode == "RGB"

    inception = os.path.join(ASSETS, "pt_inception-2015-12-05.pth")
    if not os.path.exists(inception):
        print(f"online FID part skipped: {inception} not found")
        return
    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(6):
        Image.fromarray(torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8).numpy()).save(reference / f"{i}.png")
    with pytest.raises(SystemExit, match="--fid_every needs --fid_reference"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--epochs=1", "--fid_every=2",
              f"--vavae_path={tmp_path / 'ae.pt'}")
    train(f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--epochs=1", "--fid_every=2", "--fid_num_samples=6",
          f"--fid_reference={reference}", f"--inception_weights={inception}", f"--vavae_path={tmp_path / 'ae.pt'}")
    fid_lines = [line for line in capsys.readouterr().out.splitlines() if "| FID " in line]
    assert [line.split(" |")[0] for line in fid_lines] == ["step 4"]  # resumed at 2: step 4 is the next and last
    assert 0 < float(fid_lines[0].split("FID ")[1].split()[0]) < 1000


def test_sample_grid_before_the_first_checkpoint(data, tmp_path):
    """out_dir exists from the start: a grid due before any checkpoint no longer crashes the run."""
    from vavae import AutoencoderKL
    torch.manual_seed(0)
    ae = AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())
    torch.save({"autoencoder": ae.state_dict(), "autoencoder_kwargs": ae.kwargs}, tmp_path / "ae.pt")
    train(f"--data_dir={data}", f"--out_dir={tmp_path / 'run'}", "--epochs=1", "--max_steps=3", "--sample_every=1",
          "--ckpt_every=100", f"--vavae_path={tmp_path / 'ae.pt'}")
    names = sorted(os.listdir(tmp_path / "run"))
    assert names == ["metrics.jsonl", "metrics.png", "samples_00000001.png", "samples_00000002.png",
                     "samples_00000003.png", "step_00000003.pt"]


def read_metrics(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]


def test_metrics_log_survives_a_resume_without_repeating_steps(data, tmp_path, capsys):
    common = [f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=2", "--ckpt_every=3", "--log_every=1"]
    train(*common, "--max_steps=5")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    os.remove(tmp_path / "step_00000005.pt")  # as if killed after logging steps 4 and 5: resume at 3
    capsys.readouterr()
    train(*common)
    out = capsys.readouterr().out
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert set(records[-1]) == {"step", "epoch", "loss", "mse", "cos", "lr", "img_per_s"}
    assert records[-1]["epoch"] == 2.0 and records[-1]["lr"] == 2e-4
    assert Image.open(tmp_path / "metrics.png").size[0] == 640
    assert re.search(r"step 8/8 .* \| eta \d+m\d\ds", out), out
    assert re.search(r"done: step 8/8; 5 steps in \d+m\d\ds, 80 images seen; loss last [0-9.]+, best [0-9.]+ at step",
                     out), out


def test_resume_refuses_changed_settings_that_change_the_run(data, tmp_path):
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=1", "--max_steps=2")
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    with pytest.raises(SystemExit, match=r"error: .*step_00000002.pt was trained with other settings \(global_batch_size "
                                         r"16 -> 8; seed 0 -> 3\); a resume must continue the same run"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=2", "--global_batch_size=8", "--seed=3")
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    train(f"--data_dir={data}", f"--out_dir={tmp_path}", "--epochs=1", "--log_every=3", "--ckpt_every=7")  # free ones


def release_checkpoint(path, seed):
    """A checkpoint laid out as the release's train.py saves it: model/ema/opt/args, `module.` keys in `model`."""
    import argparse
    import dit
    torch.manual_seed(seed)
    model = dit.create_dit("LightningDiT-B/1", depth=2, hidden_size=64, num_heads=2, input_size=4, in_channels=32,
                           num_classes=4)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    ema = {k: v + 0.01 for k, v in model.state_dict().items()}  # other, sane weights (+1 gave NaN gradients)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "ema": ema, "opt": {},
                "args": argparse.Namespace(model="LightningDiT-B/1")}, path)
    return model.state_dict(), ema


def test_init_from_fine_tunes_from_a_release_checkpoint(data, tmp_path, capsys):
    weights, ema = release_checkpoint(str(tmp_path / "release" / "checkpoints" / "0080000.pt"), seed=1)
    common = [f"--data_dir={data}", "--epochs=1", "--max_steps=1", "--lr=1e-30", "--allow_unsafe_checkpoint=True"]
    train(*common, f"--out_dir={tmp_path / 'ema'}", f"--init_from={tmp_path / 'release'}")
    train(*common, f"--out_dir={tmp_path / 'model'}", f"--init_from={tmp_path / 'release'}", "--init_weights=model")
    torch.save(ema, tmp_path / "bare.pt")  # a state dict alone
    train(*common, f"--out_dir={tmp_path / 'bare'}", f"--init_from={tmp_path / 'bare.pt'}")
    assert "initialised from the ema weights of" in capsys.readouterr().out
    for run, expected in (("ema", ema), ("model", weights), ("bare", ema)):
        checkpoint = torch.load(tmp_path / run / "step_00000001.pt", weights_only=True)
        assert checkpoint["step"] == 1 and len(checkpoint["optimizer"]["state"]) > 0  # a new run with a new optimizer
        for name, value in expected.items():  # lr 1e-30 moves nothing: the weights are the initial ones
            assert torch.equal(checkpoint["model"][name], value), (run, name)


def test_a_release_checkpoint_in_out_dir_is_not_resumed(data, tmp_path):
    release_checkpoint(str(tmp_path / "out" / "checkpoints" / "0080000.pt"), seed=1)
    with pytest.raises(SystemExit, match=r"0080000.pt lacks optimizer, step, config: it is not a train_dit.py "
                                         r"checkpoint to resume. .*--init_from"):
        train(f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", "--allow_unsafe_checkpoint=True")


def test_prefetch_threads_memory_and_inline_reading_give_the_same_run(data, tmp_path):
    """The data order is a function of (seed, epoch) alone: how the rows are read changes nothing, bit for bit."""
    runs = {"threads": [], "memory": ["--data_in_memory=True"], "inline": ["--prefetch_batches=0"]}
    for name, args in runs.items():
        train(f"--data_dir={data}", f"--out_dir={tmp_path / name}", "--epochs=2", "--micro_batch_size=8", *args)
    threads, memory, inline = (torch.load(tmp_path / name / "step_00000008.pt", weights_only=True) for name in runs)
    assert_same_state(threads, memory)
    assert_same_state(threads, inline)
