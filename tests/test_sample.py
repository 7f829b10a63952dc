"""sample.py: per-image seeds (same images on 1 and 2 ranks), the ADM .npz layout with labels, resume, the grid, the
PNG writer thread, compile, the guidance interval in float32, clear errors."""
import concurrent.futures
import errno
import importlib
import io
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import config.runtime
import dit
import vavae
from config.runtime import load_latent_stats
from conftest import GOLDEN, torchrun
from test_bad_inputs import expect_clear_error, files, fresh_out_dir, isolated, write_png  # noqa: F401

NUM_CLASSES = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random LightningDiT on 4x4x32 latents and a tiny random VA-VAE (64 px images), plus latent stats."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = dit.LightningDiT(input_size=4, patch_size=1, in_channels=32, hidden_size=64, depth=2, num_heads=2,
                             num_classes=NUM_CLASSES)
    with torch.no_grad():  # the release init zeroes the output layers; random weights make every part matter
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "config": {}}, folder / "dit.pt")
    save_tiny_autoencoder(folder / "vavae.pt")
    stats = {"mean": 0.1 * torch.randn(1, 32, 1, 1), "std": 0.5 + torch.rand(1, 32, 1, 1)}
    torch.save(stats, folder / "latents_stats.pt")
    return folder


def save_tiny_autoencoder(path):
    torch.manual_seed(1)
    torch.save({"state_dict": vavae.AutoencoderKL(ch=32).state_dict()}, path)


def base_args(models, out_dir, **overrides):
    args = dict(dit_path=models / "dit.pt", vavae_path=models / "vavae.pt",
                latent_stats_path=models / "latents_stats.pt", out_dir=out_dir, mode="fid", num_images=7,
                labels="balanced", num_steps=4, cfg_scale=4.0, cfg_interval_start=0.3, batch_size=3)
    args.update(overrides)
    return [f"--{k}={v}" for k, v in args.items()]


def run_in_process(args):
    import sample
    sample = importlib.reload(sample)  # fresh module constants for every run
    sample.main(args)


def pngs(folder, n):
    return np.stack([np.asarray(Image.open(os.path.join(folder, f"{i:06d}.png"))) for i in range(n)])


def test_fid_set_same_on_one_and_two_ranks_and_after_resume(models, tmp_path, one_thread):
    one, two = tmp_path / "one", tmp_path / "two"
    run_in_process(base_args(models, one))
    result = torchrun("--nproc_per_node=2", "sample.py", *base_args(models, two))
    assert result.returncode == 0, result.stdout + result.stderr

    images = pngs(one, 7)
    assert images.shape == (7, 64, 64, 3) and images.dtype == np.uint8
    with zipfile.ZipFile(one / "samples.npz") as archive:  # byte for byte what np.savez(arr_0=..., arr_1=...) stores
        assert archive.namelist() == ["arr_0.npy", "arr_1.npy"]
        for name, array in (("arr_0.npy", images), ("arr_1.npy", np.arange(7, dtype=np.int64) % 10)):
            expected = io.BytesIO()
            np.save(expected, array)
            assert archive.read(name) == expected.getvalue()  # row i is image i, and its label i % 10
    np.testing.assert_array_equal(np.load(two / "samples.npz")["arr_0"], images)
    assert len({im.tobytes() for im in images}) == 7 and images.std() > 10  # real, distinct images

    # the batch of images 3-5 by hand: noise of image i from seed base_seed + i, label i % 10, the sampler, the
    # decoder, the released clamp
    model = dit.load_dit(str(models / "dit.pt"))
    autoencoder = vavae.load_autoencoder(str(models / "vavae.pt"))
    mean, std = load_latent_stats(str(models / "latents_stats.pt"))
    noise = torch.stack([torch.randn(32, 4, 4, generator=torch.Generator().manual_seed(i)) for i in (3, 4, 5)])
    with torch.no_grad():
        z = dit.sample(model, noise, torch.tensor([3, 4, 5]), num_steps=4, timestep_shift=0.3, cfg_scale=4.0,
                       cfg_interval_start=0.3, guidance="legacy3")
        by_hand = vavae.images_to_uint8(autoencoder.decode(vavae.denormalize_latents(z, mean, std)))
    np.testing.assert_array_equal(np.asarray(by_hand), images[3:6])

    # interrupted run: two PNGs and the npz missing, half-written temporary files left behind (removed on the rerun)
    kept = os.stat(two / "000001.png").st_mtime_ns
    for name in ("000002.png", "000005.png", "samples.npz"):
        os.remove(two / name)
    (two / ".000002.png.tmp123").write_bytes(b"\x89PNG half")
    (two / ".samples.npz.tmp123").write_bytes(b"PK half")
    run_in_process(base_args(models, two))
    np.testing.assert_array_equal(np.load(two / "samples.npz")["arr_0"], images)
    assert os.stat(two / "000001.png").st_mtime_ns == kept  # finished images are not redone
    assert sorted(os.listdir(two)) == [f"{i:06d}.png" for i in range(7)] + ["run.json", "samples.npz"]

    # more images later: the first 7 stay, one new one is made
    run_in_process(base_args(models, one, num_images=8))
    more = np.load(one / "samples.npz")["arr_0"]
    assert more.shape == (8, 64, 64, 3)
    np.testing.assert_array_equal(more[:7], images)

    # the grid: cell (seed 1, label 1) starts from the same noise with the same label as fid image 1 (in another
    # batch, so equal up to float summation order)
    run_in_process(base_args(models, tmp_path / "grid", mode="grid", grid_labels=(1, 2, 3), grid_seeds=(0, 1)))
    grid = np.asarray(Image.open(tmp_path / "grid" / "grid.png"))
    assert grid.shape == (2 * (64 + 14), 3 * 64, 3)
    cell = grid[78:78 + 64, 0:64].astype(int)
    assert np.abs(cell - images[1]).max() <= 1 and np.abs(grid[0:64, 0:64].astype(int) - images[1]).mean() > 10


def test_other_run_in_out_dir_is_refused(models, tmp_path):
    run_in_process(base_args(models, tmp_path, num_images=2, num_steps=2, labels="random"))
    by_hand = []  # random labels: drawn from image i's generator after its noise; arr_1 holds them
    for i in (0, 1):
        generator = torch.Generator().manual_seed(i)
        torch.randn(32, 4, 4, generator=generator)
        by_hand.append(int(torch.randint(NUM_CLASSES, (), generator=generator)))
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_1"], by_hand)
    with pytest.raises(SystemExit, match=r"holds images of another run \(cfg_scale: 4.0 -> 5.0\)"):
        run_in_process(base_args(models, tmp_path, num_images=2, num_steps=2, labels="random", cfg_scale=5.0))
    os.remove(tmp_path / "run.json")
    with pytest.raises(SystemExit, match="holds numbered PNGs but no run.json"):
        run_in_process(base_args(models, tmp_path, num_images=2, num_steps=2, labels="random"))


class InlineExecutor(concurrent.futures.Executor):
    """Saves each PNG at once, before the next batch: sample.py as it was before the writer thread."""

    def __init__(self, max_workers):
        pass

    def submit(self, fn, *args):
        future = concurrent.futures.Future()
        future.set_result(fn(*args))
        return future


def test_png_writer_thread_writes_what_synchronous_saves_write(models, tmp_path, monkeypatch):
    run_in_process(base_args(models, tmp_path / "thread", num_images=8, num_steps=2, batch_size=2))
    monkeypatch.setattr(concurrent.futures, "ThreadPoolExecutor", InlineExecutor)
    run_in_process(base_args(models, tmp_path / "inline", num_images=8, num_steps=2, batch_size=2))
    names = [f"{i:06d}.png" for i in range(8)]
    assert sorted(os.listdir(tmp_path / "thread")) == names + ["run.json", "samples.npz"]  # no temporary files
    for name in names:  # whole files, byte for byte the synchronous ones
        assert (tmp_path / "thread" / name).read_bytes() == (tmp_path / "inline" / name).read_bytes(), name
        Image.open(tmp_path / "thread" / name).load()
    thread, inline = np.load(tmp_path / "thread" / "samples.npz"), np.load(tmp_path / "inline" / "samples.npz")
    assert all(np.array_equal(thread[k], inline[k]) for k in ("arr_0", "arr_1"))


def test_write_error_in_the_writer_thread_stops_the_run_with_one_line(models, tmp_path, monkeypatch):
    def save_png_on_a_full_disk(array, path):  # image 4 meets a full disk, inside write_atomically as a real one would
        def write(f):
            if path.endswith("000004.png"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            Image.fromarray(array).save(f, format="PNG")
        config.runtime.write_atomically(path, write)
    monkeypatch.setattr(config.runtime, "save_png", save_png_on_a_full_disk)
    with pytest.raises(SystemExit) as stop:
        run_in_process(base_args(models, tmp_path, num_images=7, num_steps=2, batch_size=2))
    message = str(stop.value.code)
    assert message.startswith("error: could not write ") and "\n" not in message, message
    assert "000004.png (No space left on device" in message
    # the images before and after it are whole files; no temporary file and no samples.npz
    assert sorted(os.listdir(tmp_path)) == [f"{i:06d}.png" for i in range(7) if i != 4] + ["run.json"]
    for i in (0, 1, 2, 3, 5, 6):
        Image.open(tmp_path / f"{i:06d}.png").load()


def test_compiled_sampling_matches_eager(models, tmp_path, monkeypatch):
    """--compile=True samples with torch.compile'd DiT; its latents match eager ones to the float32 floor and the
    images to one level. One guided batch, so that it compiles once. The floor: the release's own guided output moves by
    up to 4.5e-6 per call (golden README, cfg 4), and the 3 guided Euler calls of num_steps=4 can each add theirs
    (seen: 1.1e-5 on an AVX-512 CPU, where inductor's fused reductions sum in another order than eager's)."""
    calls = []

    def recording_sample(model, *args, **kwargs):
        calls.append((model, real_sample(model, *args, **kwargs)))
        return calls[-1][1]
    real_sample = dit.sample
    monkeypatch.setattr(dit, "sample", recording_sample)
    grid = dict(mode="grid", grid_labels=(1, 2, 3), grid_seeds=(0,), cfg_interval_start=0.0)
    run_in_process(base_args(models, tmp_path / "eager", compile=False, **grid))
    run_in_process(base_args(models, tmp_path / "compiled", compile=True, **grid))
    torch._dynamo.reset()
    (eager_model, eager), (compiled_model, compiled) = calls
    assert isinstance(compiled_model, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(eager_model, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(compiled, eager, atol=3 * 4.5e-6, rtol=0)
    images = [np.asarray(Image.open(tmp_path / run / "grid.png")).astype(int) for run in ("eager", "compiled")]
    assert np.abs(images[0] - images[1]).max() <= 1


class CountingField(torch.nn.Module):
    """v = 0; records (t, batch size) of each call: a batch of 2 is a guided step (conditional + null label)."""
    num_classes = 10

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((t[0].item(), x.shape[0]))
        return torch.zeros_like(x)


def guided_steps(num_steps, timestep_shift, start):
    model = CountingField()
    dit.sample(model, torch.zeros(1, 4, 2, 2), torch.zeros(1, dtype=torch.long), num_steps=num_steps,
               timestep_shift=timestep_shift, cfg_scale=4.0, cfg_interval_start=start)
    return model.calls, [batch == 2 for _, batch in model.calls]


def test_guidance_interval_compares_in_float32_as_the_release():
    # 101 uniform points: t_11 = float32(0.11) = 0.1099999994 < 0.11 as doubles, but not in float32 (the release
    # compares a float32 time tensor with the Python float): guided from step 11 on
    calls, guided = guided_steps(101, 1.0, 0.11)
    assert calls[11][0] == torch.tensor(0.11).item() < 0.11
    assert guided == [False] * 11 + [True] * 89
    # the release's decisions on its 250-step grid (golden: the official forward_with_cfg on each grid point)
    path = os.path.join(GOLDEN, "timestep_grids.pt")
    if not os.path.exists(path):
        pytest.skip(f"golden file {path} not found")
    entry = torch.load(path, weights_only=True)["grids"]["250_0.3"]
    assert len(entry["cfg_interval"]) == 3
    for interval in entry["cfg_interval"].values():
        _, guided = guided_steps(250, 0.3, interval["cfg_interval_start"])
        assert guided == interval["guided_step"].tolist()


# -----------------------------------------------------------------------------
# bad inputs: one clear error line, out_dir untouched (fixtures and helpers in test_bad_inputs.py)

def run_sample(args):
    import sample
    with isolated():
        importlib.reload(sample).main(args)


def sample_args(files, out, *args):
    return [f"--dit_path={files}/dit.pt", f"--vavae_path={files}/vavae.pt", f"--latent_stats_path={files}/stats.pt",
            f"--out_dir={out}", "--mode=fid", "--num_images=2", "--num_steps=2", "--batch_size=2", *args]


def numbered_pngs_without_manifest(out, files):
    write_png(out / "000000.png", 0)


def unreadable_manifest(out, files):
    (out / "run.json").write_text('{"cfg_scale": 4.0,')


def manifest_of_another_run(out, files):
    (out / "run.json").write_text('{"cfg_scale": 4.0}')


def statistics_of_16_channels(out, files):
    torch.save({"mean": torch.zeros(1, 16, 1, 1), "std": torch.ones(1, 16, 1, 1)}, out / "stats16.pt")


def earlier_run_with_a_damaged_png(out, files):
    run_sample(sample_args(files, out))
    os.remove(out / "samples.npz")
    png = (out / "000001.png").read_bytes()
    (out / "000001.png").write_bytes(png[:len(png) // 2])  # a copy cut short


def earlier_run_with_an_odd_png(out, files):
    run_sample(sample_args(files, out))
    os.remove(out / "samples.npz")
    write_png(out / "000001.png", 0, size=32)


@pytest.mark.parametrize("args, setup, pattern", [
    (["--no_such_option=1"], None, "unknown option --no_such_option"),
    (["--num_steps=many"], None, "--num_steps='many' is not a valid int"),
    (["--cfg_scale=[1]"], None, "--cfg_scale expects float"),
    (["--mode=video"], None, "--mode='video' is not allowed: it must be one of grid, fid"),
    (["--method=rk4"], None, "--method='rk4' is not allowed: it must be one of euler, heun"),
    (["--labels=uniform"], None, "--labels='uniform' is not allowed: it must be one of random, balanced"),
    (["--guidance=some"], None, "--guidance='some' is not allowed: it must be one of legacy3, all"),
    (["--precision=fp16"], None, "--precision='fp16' is not allowed: it must be one of fp32, bf16"),
    (["--precision=bf16"], None, "--precision=bf16 needs a CUDA GPU"),
    (["--compile=maybe"], None, "--compile='maybe' is not allowed: it must be one of True, False, None"),
    (["--allow_unsafe_checkpoint=None"], None, "--allow_unsafe_checkpoint=None is not allowed: it must be one of "
                                               "True, False"),
    (["--grid_labels=abc"], None, "--grid_labels='abc' is not allowed: it must be one of None, ints"),
    (["--grid_seeds=(0.5,)"], None, r"--grid_seeds=\(0.5,\) is not allowed: it must be one of ints"),
    (["--mode=grid", "--grid_labels=()"], None, r"--grid_labels=\(\) and --grid_seeds=\(0, 1\) need one entry or more"),
    (["--mode=grid", "--grid_seeds=()"], None, r"--grid_labels=None and --grid_seeds=\(\) need one entry or more"),
    (["--mode=grid", "--grid_labels=(3, 10)"], None, r"--grid_labels=\(3, 10\) has labels outside 0..9"),
    (["--num_images=0"], None, "--num_images=0 is not allowed: it must be >= 1"),
    (["--batch_size=0"], None, "--batch_size=0 is not allowed: it must be >= 1"),
    (["--num_steps=1"], None, "--num_steps=1 is not allowed: it must be >= 2"),
    (["--timestep_shift=0"], None, "--timestep_shift=0.0 is not allowed: it must be > 0"),
    (["--timestep_shift=-1"], None, "--timestep_shift=-1.0 is not allowed: it must be > 0"),
    (["--timestep_shift=1e999"], None, "--timestep_shift=inf is not allowed: it must be a finite number > 0"),
    (["--cfg_scale=-1"], None, "--cfg_scale=-1.0 is not allowed: it must be >= 0"),
    (["--cfg_interval_start=1.5"], None, r"--cfg_interval_start=1.5 is not allowed: it must be in \[0, 1\]"),
    (["--base_seed=-1"], None, r"--base_seed=-1 is not allowed: it must be in \[0, 1e18\]"),
    (["--timeout_minutes=0"], None, "--timeout_minutes=0.0 is not allowed: it must be > 0"),
    (["--dit_path={f}/nope.pt"], None, "checkpoint .*nope.pt does not exist"),
    (["--dit_path={f}/truncated.pt"], None, "truncated.pt is not a readable checkpoint"),
    (["--dit_path={f}/vavae.pt"], None, "vavae.pt holds no LightningDiT weights"),
    (["--dit_path={f}/tensor.pt"], None, "tensor.pt holds a Tensor, not LightningDiT weights"),
    (["--dit_path={f}/pickled.pt"], None, "pickled.pt holds pickled Python objects .*--allow_unsafe_checkpoint=True"),
    (["--dit_path={f}/images"], None, "folder .*images holds no checkpoint"),
    (["--dit_path={f}/dit_nan.pt"], None, "the DiT gave non-finite latents; .*dit_nan.pt"),
    (["--vavae_path={f}/dit.pt"], None, "dit.pt has no autoencoder weights"),
    (["--vavae_path={f}/tensor.pt"], None, "tensor.pt holds a Tensor"),
    (["--vavae_path={f}/vavae16.pt"], None, "the DiT takes 32 latent channels, the VA-VAE makes 16"),
    (["--latent_stats_path={f}/nope.pt"], None, "latent statistics .*nope.pt do not exist"),
    (["--latent_stats_path={f}/vavae.pt"], None, r"vavae.pt lacks mean, std \(expected a latent statistics file"),
    (["--latent_stats_path={f}/stats_nan.pt"], None, "stats_nan.pt: .* must have one finite entry per latent channel"),
    (["--latent_stats_path={out}/stats16.pt"], statistics_of_16_channels, "VA-VAE makes 32 and the statistics have 16"),
    ([], numbered_pngs_without_manifest, "holds numbered PNGs but no run.json"),
    ([], unreadable_manifest, r"run.json is unreadable \(.*\); it records the settings .* use a new --out_dir"),
    ([], manifest_of_another_run, r"holds images of another run \(dit_path: None -> "),
    ([], earlier_run_with_a_damaged_png, "000001.png is unreadable .*; delete it and rerun to draw it again"),
    ([], earlier_run_with_an_odd_png, r"000001.png is \(32, 32, 3\), image 0 is \(64, 64, 3\); delete the odd one"),
    (["--out_dir={f}/vavae.pt/samples"], None, "could not create out_dir .*vavae.pt/samples: Not a directory"),
])
def test_sample(files, tmp_path, args, setup, pattern):
    out = fresh_out_dir(tmp_path)
    if setup:
        setup(out, files)
    args = [a.format(f=files, out=out) for a in args]
    expect_clear_error(lambda: run_sample(sample_args(files, out, *args)), out, pattern)
