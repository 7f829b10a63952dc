"""sample.py: per-image seeds (same images on 1 and 2 ranks), the ADM .npz layout, resume, the grid, clear errors."""
import importlib
import io
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import dit
import vavae
from conftest import torchrun

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
    with zipfile.ZipFile(one / "samples.npz") as archive:  # byte for byte what np.savez(arr_0=images) stores
        assert archive.namelist() == ["arr_0.npy"]
        expected = io.BytesIO()
        np.save(expected, images)
        assert archive.read("arr_0.npy") == expected.getvalue()  # row i is image i
    np.testing.assert_array_equal(np.load(two / "samples.npz")["arr_0"], images)
    assert len({im.tobytes() for im in images}) == 7 and images.std() > 10  # real, distinct images

    # the batch of images 3-5 by hand: noise of image i from seed base_seed + i, label i % 10, the sampler, the
    # decoder, the released clamp
    model = dit.load_dit(str(models / "dit.pt"))
    autoencoder = vavae.load_autoencoder(str(models / "vavae.pt"))
    mean, std = vavae.load_latent_stats(str(models / "latents_stats.pt"))
    noise = torch.stack([torch.randn(32, 4, 4, generator=torch.Generator().manual_seed(i)) for i in (3, 4, 5)])
    with torch.no_grad():
        z = dit.sample(model, noise, torch.tensor([3, 4, 5]), num_steps=4, timestep_shift=0.3, cfg_scale=4.0,
                       cfg_interval_start=0.3, guidance="legacy3")
        by_hand = vavae.images_to_uint8(autoencoder.decode(vavae.denormalize_latents(z, mean, std)))
    np.testing.assert_array_equal(np.asarray(by_hand), images[3:6])

    # interrupted run: two PNGs and the npz missing, a half-written temporary file left behind
    kept = os.stat(two / "000001.png").st_mtime_ns
    for name in ("000002.png", "000005.png", "samples.npz"):
        os.remove(two / name)
    (two / ".000002.png.tmp123").write_bytes(b"\x89PNG half")
    run_in_process(base_args(models, two))
    np.testing.assert_array_equal(np.load(two / "samples.npz")["arr_0"], images)
    assert os.stat(two / "000001.png").st_mtime_ns == kept  # finished images are not redone

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
    with pytest.raises(SystemExit, match=r"holds images of another run \(cfg_scale: 4.0 -> 5.0\)"):
        run_in_process(base_args(models, tmp_path, num_images=2, num_steps=2, labels="random", cfg_scale=5.0))
    os.remove(tmp_path / "run.json")
    with pytest.raises(SystemExit, match="holds numbered PNGs but no run.json"):
        run_in_process(base_args(models, tmp_path, num_images=2, num_steps=2, labels="random"))


def test_clear_errors(models, tmp_path):
    with pytest.raises(SystemExit, match="latent statistics .* do not exist"):
        run_in_process(base_args(models, tmp_path, latent_stats_path=tmp_path / "none.pt"))
    torch.save({"mean": torch.zeros(1, 16, 1, 1), "std": torch.ones(1, 16, 1, 1)}, tmp_path / "stats16.pt")
    with pytest.raises(SystemExit, match="the VA-VAE makes 32 and the statistics have 16"):
        run_in_process(base_args(models, tmp_path, latent_stats_path=tmp_path / "stats16.pt"))
    with pytest.raises(SystemExit, match="bf16 needs a CUDA GPU"):
        run_in_process(base_args(models, tmp_path, precision="bf16"))
    with pytest.raises(SystemExit, match="--mode='video'"):
        run_in_process(base_args(models, tmp_path, mode="video"))
    with pytest.raises(SystemExit, match="outside 0..9"):
        run_in_process(base_args(models, tmp_path, mode="grid", grid_labels=(3, 10)))
