"""The bad-input sweep: malformed options and files give one clear `error: ...` line and leave outputs untouched.

Every script runs in this process (runpy, or its main(argv)); each case starts from an out_dir that already holds
a file, and that folder must be byte-identical afterwards. train_dit.py has its own sweep in test_train_dit.py."""
import contextlib
import importlib
import os
import re
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import dit
import vavae
from conftest import ROOT


# -----------------------------------------------------------------------------
# fixtures: a few PNGs, tiny VA-VAE and LightningDiT checkpoints, latent statistics, a few broken files

def write_png(path, seed, size=64):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    for i in range(4):
        write_png(root / "images" / f"class{i % 2}" / f"{i}.png", i)
    (root / "empty" / "class0").mkdir(parents=True)
    (root / "corrupt" / "class0").mkdir(parents=True)
    png = (root / "images" / "class0" / "0.png").read_bytes()
    for i in range(4):
        (root / "corrupt" / "class0" / f"{i}.png").write_bytes(png[:len(png) // 3])  # truncated PNGs
    (root / "mixed").mkdir()
    write_png(root / "mixed" / "a.png", 0)
    write_png(root / "mixed" / "b.png", 1)
    (root / "mixed" / "c.png").write_bytes(png[:100])
    torch.manual_seed(0)
    ae = vavae.AutoencoderKL(ch=32)
    torch.save({"autoencoder": ae.state_dict(), "autoencoder_kwargs": ae.kwargs}, root / "vavae.pt")
    torch.save({"autoencoder": ae.state_dict(), "autoencoder_kwargs": {**ae.kwargs, "ch": 64}}, root / "vavae_kw64.pt")
    ae16 = vavae.AutoencoderKL(ch=32, z_channels=16, embed_dim=16)
    torch.save({"autoencoder": ae16.state_dict(), "autoencoder_kwargs": ae16.kwargs}, root / "vavae16.pt")
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in ae.state_dict().items()}
    torch.save({"autoencoder": nan, "autoencoder_kwargs": ae.kwargs}, root / "vavae_nan.pt")
    (root / "truncated.pt").write_bytes((root / "vavae.pt").read_bytes()[:5000])
    model = dit.LightningDiT(input_size=4, patch_size=1, in_channels=32, hidden_size=64, depth=2, num_heads=2,
                             num_classes=10)
    torch.save({"ema": model.state_dict()}, root / "dit.pt")
    torch.save({"ema": {k: v.float().fill_(float("nan")) if v.is_floating_point() else v
                        for k, v in model.state_dict().items()}}, root / "dit_nan.pt")
    torch.save({"mean": torch.zeros(1, 32, 1, 1), "std": torch.ones(1, 32, 1, 1)}, root / "stats.pt")
    torch.save({"mean": torch.full((1, 32, 1, 1), float("nan")), "std": torch.ones(1, 32, 1, 1)}, root / "stats_nan.pt")
    torch.save(torch.zeros(3), root / "tensor.pt")
    import argparse
    torch.save({"autoencoder": ae.state_dict(), "args": argparse.Namespace(lr=1)}, root / "pickled.pt")
    return root


MANIFESTS = {"prepare.json", "run.json"}  # prepare.py and sample.py record their settings before the work


def snapshot(folder):
    """Every file under folder: relative path -> bytes."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


def expect_clear_error(run, out_dir, pattern):
    """run() must stop with SystemExit('error: ...' matching pattern) and leave out_dir as it was."""
    before = snapshot(out_dir)
    with pytest.raises(SystemExit) as stop:
        run()
    message = str(stop.value.code)
    assert message.startswith("error: "), message
    assert "\n" not in message.strip(), message
    assert re.search(pattern, message), (pattern, message)
    after = snapshot(out_dir)
    assert {name: after.get(name) for name in before} == before  # nothing changed or removed
    assert set(after) - set(before) <= MANIFESTS, set(after) - set(before)  # at most a run's settings recorded


def fresh_out_dir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier_result.txt").write_text("made by an earlier run")
    return out


@contextlib.contextmanager
def isolated():
    """Scripts seed the global generator and sample.py turns gradients off: leave other tests' state alone."""
    with torch.random.fork_rng(), torch.enable_grad():
        yield


def run_script(name, args):
    argv = sys.argv
    sys.argv = [name, *args]
    try:
        with isolated():
            runpy.run_path(os.path.join(ROOT, name), run_name="__main__")
    finally:
        sys.argv = argv


# -----------------------------------------------------------------------------
# train_vavae.py

KW64_MISMATCH = (r"vavae_kw64.pt does not fit AutoencoderKL\(.*shape mismatch \(\d+\): "
                 r"encoder.conv_in.weight \(32, 3, 3, 3\) vs model \(64, 3, 3, 3\)")  # weights ch 32, kwargs ch 64
VAVAE_TINY = ["--image_size=64", "--ch=32", "--vf_model=", "--perceptual_weight=0.0", "--global_batch_size=4",
              "--num_workers=0", "--log_every=1", "--image_every=0", "--max_steps=1"]


def vavae_checkpoint_of_ch64(out):
    torch.save({"autoencoder": vavae.AutoencoderKL(ch=64).state_dict(), "step": 1}, out / "step_00000001.pt")


@pytest.mark.parametrize("args, setup, pattern", [
    (["--no_such_option=1"], None, "unknown option --no_such_option"),
    (["--lr=fast"], None, r"--lr='fast' is not a valid float"),
    (["--epochs=2.5"], None, "--epochs expects int"),
    (["--lr"], None, "--lr needs a value"),
    (["config/no_such_file.py"], None, "config file config/no_such_file.py does not exist"),
    (["--data_dir={f}/missing"], None, "data_dir .*missing does not exist"),
    (["--data_dir={f}/empty"], None, "no images .* under .*empty"),
    (["--data_dir={f}/corrupt"], None, r"none of the 4 images of step 0 \(rank 0\) could be decoded"),
    (["--global_batch_size=0"], None, "global_batch_size must be positive"),
    (["--ch=40"], None, "ch \\(40\\) of 32"),
    ([], vavae_checkpoint_of_ch64,
     r"autoencoder of .*step_00000001.pt does not fit AutoencoderKL \(check --ch.*shape mismatch"),
    ([], lambda out: (out / "step_00000003.pt").write_bytes(b"\x80 truncated"), "step_00000003.pt is not a readable"),
    (["--init_from={f}/truncated.pt"], None, "truncated.pt is not a readable checkpoint"),
    (["--init_from={f}/vavae_kw64.pt"], None, KW64_MISMATCH),
    (["--init_from={f}/pickled.pt"], None, "pickled Python objects .*--allow_unsafe_checkpoint=True"),
    (["--init_from={f}/vavae_nan.pt"], None, "non-finite loss at step 0"),
    (["--vf_model=vit_no_such_model", "--vf_weights=random"], None, "unknown foundation model 'vit_no_such_model'"),
    (["--vf_model=vit_small_patch14_dinov2.lvd142m", "--vf_weights={f}/nope.pth"], None, "nope.pth do not exist"),
    (["--perceptual_weight=1.0", "--lpips_weights={f}/dit.pt"], None,
     r"dit.pt is not an LPIPS weights file \(no lin0..lin4 heads\)"),
    (["--out_dir={f}/vavae.pt/run"], None, "could not create out_dir .*vavae.pt/run: Not a directory"),
])
def test_train_vavae(files, tmp_path, args, setup, pattern):
    out = fresh_out_dir(tmp_path)
    if setup:
        setup(out)
    args = [a.format(f=files) for a in args]
    expect_clear_error(lambda: run_script("train_vavae.py", [*VAVAE_TINY, f"--data_dir={files}/images",
                                                             f"--out_dir={out}", *args]), out, pattern)


# -----------------------------------------------------------------------------
# prepare.py

def run_prepare(args):
    import prepare
    with isolated():
        importlib.reload(prepare).main(args)  # fresh module constants for every run


def other_settings_shards(out):
    (out / "prepare.json").write_text('{"seed": 1}')
    (out / "latents_rank00_shard000.safetensors").write_bytes(b"an earlier run's shard")


@pytest.mark.parametrize("args, setup, pattern", [
    (["--no_such_option=1"], None, "unknown option --no_such_option"),
    (["--image_size=big"], None, "--image_size='big' is not a valid int"),
    (["--seed=1.5"], None, "--seed expects int"),
    (["{f}/nope.py"], None, "config file .*nope.py does not exist"),
    (["--vavae_path={f}/nope.pt"], None, "VA-VAE checkpoint .*nope.pt does not exist"),
    (["--vavae_path={f}/truncated.pt"], None, "truncated.pt is not a readable checkpoint"),
    (["--vavae_path={f}/dit.pt"], None, "dit.pt has no autoencoder weights"),
    (["--vavae_path={f}/tensor.pt"], None, "tensor.pt holds a Tensor"),
    (["--vavae_path={f}/vavae_kw64.pt"], None, KW64_MISMATCH),
    (["--vavae_path={f}/pickled.pt"], None, "pickled Python objects"),
    (["--vavae_path={f}/vavae_nan.pt"], None, "vavae_nan.pt gives non-finite latents"),
    (["--data_dir={f}/missing"], None, "data folder .*missing does not exist"),
    (["--data_dir={f}/mixed"], None, "has no class subfolders"),
    (["--data_dir={f}/empty"], None, "no images found under .*empty"),
    (["--data_dir={f}/corrupt"], None, r"none of the 4 images of shard 0 could be read, e.g. .*0.png"),
    (["--image_size=40"], None, "--image_size 40 must be a positive multiple of 16"),
    (["--shard_size=0"], None, "shard_size must be positive"),
    (["--batch_size=0"], None, "batch_size must be positive"),
    ([], other_settings_shards, "holds shards made with other settings"),
    (["--out_dir={f}/vavae.pt/latents"], None, "could not create out_dir .*vavae.pt/latents: Not a directory"),
    (["--make_demo={f}/demo", "--demo_classes=11"], None, "the demo dataset has 1 to 10 classes"),
])
def test_prepare(files, tmp_path, args, setup, pattern):
    out = fresh_out_dir(tmp_path)
    if setup:
        setup(out)
    args = [a.format(f=files) for a in args]
    expect_clear_error(lambda: run_prepare([f"--data_dir={files}/images", f"--vavae_path={files}/vavae.pt",
                                            f"--out_dir={out}", "--image_size=64", "--num_workers=0", *args]),
                       out, pattern)
    assert not os.path.exists(out / "latents_stats.pt")


# -----------------------------------------------------------------------------
# sample.py

def run_sample(args):
    import sample
    with isolated():
        importlib.reload(sample).main(args)


def numbered_pngs_without_manifest(out):
    write_png(out / "000000.png", 0)


@pytest.mark.parametrize("args, setup, pattern", [
    (["--no_such_option=1"], None, "unknown option --no_such_option"),
    (["--num_steps=many"], None, "--num_steps='many' is not a valid int"),
    (["--cfg_scale=[1]"], None, "--cfg_scale expects float"),
    (["--mode=video"], None, "--mode='video'; choose one of grid, fid"),
    (["--method=rk4"], None, "--method='rk4'; choose one of euler, heun"),
    (["--dit_path={f}/nope.pt"], None, "checkpoint .*nope.pt does not exist"),
    (["--dit_path={f}/truncated.pt"], None, "truncated.pt is not a readable checkpoint"),
    (["--dit_path={f}/vavae.pt"], None, "vavae.pt holds no LightningDiT weights"),
    (["--vavae_path={f}/dit.pt"], None, "dit.pt has no autoencoder weights"),
    (["--vavae_path={f}/vavae16.pt"], None, "the DiT takes 32 latent channels, the VA-VAE makes 16"),
    (["--latent_stats_path={f}/nope.pt"], None, "latent statistics .*nope.pt do not exist"),
    (["--latent_stats_path={f}/vavae.pt"], None, "vavae.pt is not a latent statistics file"),
    (["--latent_stats_path={f}/stats_nan.pt"], None, "stats_nan.pt: .* must have one finite entry per latent channel"),
    (["--dit_path={f}/dit_nan.pt"], None, "the DiT gave non-finite latents; .*dit_nan.pt"),
    (["--mode=grid", "--grid_labels=(3, 10)"], None, r"--grid_labels=\(3, 10\) has labels outside 0..9"),
    (["--num_images=0"], None, "--num_images must be at least 1"),
    (["--batch_size=0"], None, "--batch_size must be at least 1"),
    (["--num_steps=1"], None, "--num_steps must be at least 2"),
    ([], numbered_pngs_without_manifest, "holds numbered PNGs but no run.json"),
    (["--out_dir={f}/vavae.pt/samples"], None, "could not create out_dir .*vavae.pt/samples: Not a directory"),
])
def test_sample(files, tmp_path, args, setup, pattern):
    out = fresh_out_dir(tmp_path)
    if setup:
        setup(out)
    args = [a.format(f=files) for a in args]
    expect_clear_error(lambda: run_sample([f"--dit_path={files}/dit.pt", f"--vavae_path={files}/vavae.pt",
                                           f"--latent_stats_path={files}/stats.pt", f"--out_dir={out}", "--mode=fid",
                                           "--num_images=2", "--num_steps=2", "--batch_size=2", *args]),
                       out, pattern)


# -----------------------------------------------------------------------------
# fid.py

@pytest.fixture(scope="module")
def fid_files(files):
    """An untrained FID Inception weights file (same shapes as the real one, no download), an ADM .npz and stats."""
    import fid
    torch.save(fid.FIDInception(with_fc=False).state_dict(), files / "inception.pth")
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(files / "samples.npz", arr_0=images)
    (files / "samples_truncated.npz").write_bytes((files / "samples.npz").read_bytes()[:400])
    np.savez(files / "floats.npz", arr_0=images.astype(np.float32))
    np.savez(files / "stats_8.npz", mu=np.zeros(8), sigma=np.eye(8))  # stats of any width: no Inception pass
    np.savez(files / "stats_nan.npz", mu=np.full(8, np.nan), sigma=np.eye(8))
    np.savez(files / "stats_64.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(files / "sigma_only.npz", sigma=np.eye(4))
    (files / "one" / "x").mkdir(parents=True)
    write_png(files / "one" / "x" / "a.png", 0)
    return files


@pytest.mark.parametrize("args, pattern", [
    (["--no_such_option=1"], "unknown option --no_such_option"),
    (["--batch_size=big"], "--batch_size='big' is not a valid int"),
    (["--samples={f}/samples.npz", "--reference="], "pass --samples=PATH and --reference=PATH"),
    (["--samples={f}/nope"], "input .*nope' does not exist"),
    (["--samples={f}/empty"], "holds 0 images; FID needs at least 2"),
    (["--samples={f}/one"], "holds 1 images; FID needs at least 2"),
    (["--samples={f}/mixed"], "c.png is not a readable image"),
    (["--samples={f}/samples_truncated.npz"], "samples_truncated.npz is not a readable .npz"),
    (["--samples={f}/floats.npz"], "arr_0 must be uint8"),
    (["--samples={f}/vavae.pt"], "neither a folder of images nor an .npz file"),
    (["--reference={f}/stats_nan.npz"], "statistics contain NaN"),
    (["--reference={f}/stats_64.npz"], "feature dimensions do not match"),
    (["--reference={f}/sigma_only.npz"], "needs mu and sigma"),
    (["--inception_weights={f}/nope.pth"], "Inception weights .*nope.pth do not exist"),
    (["--inception_weights={f}/vavae.pt"], "is not an FID Inception-v3 state dict"),
    (["--inception_weights={f}/truncated.pt"], "truncated.pt is not a readable state dict"),
    (["--out_json={f}/vavae.pt/metrics.json"], "could not write .*metrics.json"),
    (["--reconstruct_with={f}/vavae.pt", "--samples={f}/images"], "only --reconstruct_with=VAVAE.pt"),
    (["--reconstruct_with={f}/nope.pt", "--reference=", "--samples={f}/images"], "checkpoint .*nope.pt does not exist"),
    (["--reconstruct_with={f}/dit.pt", "--reference=", "--samples={f}/images"], "dit.pt has no autoencoder weights"),
    (["--reconstruct_with={f}/vavae.pt", "--reference=", "--samples={f}/samples.npz"],
     "--reconstruct_with needs --samples to be a folder of images"),
    (["--reconstruct_with={f}/vavae.pt", "--reference=", "--samples={f}/corrupt"], r"0.png is not a readable image"),
    (["--reconstruct_with={f}/vavae.pt", "--reference=", "--samples={f}/images", "--lpips_weights={f}/nope.pth"],
     "LPIPS weights .* not exist"),
])
def test_fid(fid_files, tmp_path, args, pattern):
    out = fresh_out_dir(tmp_path)
    (out / "metrics.json").write_text("{}")
    args = [a.format(f=fid_files) for a in args]
    base = [f"--inception_weights={fid_files}/inception.pth", f"--samples={fid_files}/stats_8.npz",
            f"--reference={fid_files}/stats_8.npz", f"--out_json={out}/metrics.json", "--image_size=64"]
    expect_clear_error(lambda: run_script("fid.py", [*base, *args]), out, pattern)


# -----------------------------------------------------------------------------
# bench.py (it writes no files: the out_dir check only confirms it stays away from them)

BENCH_TINY = ["--depth=1", "--hidden_size=32", "--num_heads=2", "--latent_size=2", "--latent_channels=4",
              "--batch_size=2", "--warmup=0", "--iters=1", "--vae_ch=32", "--image_size=32", "--vae_batch_size=1",
              "--vf_model=vit_tiny_patch16_224", "--vf_image_size=32", "--inception_batch_size=1"]


@pytest.mark.parametrize("args, pattern", [
    (["--no_such_option=1"], "unknown option --no_such_option"),
    (["--iters=ten"], "--iters='ten' is not a valid int"),
    (["--peak_flops=[1]"], "--peak_flops expects float"),
    (["{f}/nope.py"], "config file .*nope.py does not exist"),
    (["--parts=train,fid"], "--parts=train,fid names unknown parts"),
    (["--iters=0"], "iters must be positive"),
    (["--batch_size=0"], "batch_size must be positive"),
    (["--parts=train", "--model_name=LightningDiT-Q/3"], "unknown model 'LightningDiT-Q/3'"),
    (["--parts=vavae", "--vae_ch=48"], "--vae_ch \\(48\\) must be a multiple of 32"),
    (["--parts=vavae", "--image_size=40"], "--image_size \\(40\\) a multiple of 16"),
    (["--parts=vavae", "--vf_model=vit_no_such_model"], "unknown foundation model 'vit_no_such_model'"),
    (["--parts=vavae", "--vf_image_size=64"], "token grid"),
    (["--parts=inception", "--inception_weights={f}/nope.pth"], "Inception weights .*nope.pth do not exist"),
    (["--parts=inception", "--inception_weights={f}/vavae.pt"], "not an FID Inception-v3 state dict"),
    (["--parts=", "--official_repo={f}/missing"], "--official_repo=.*missing is not a checkout of hustvl/LightningDiT"),
])
def test_bench(files, tmp_path, args, pattern):
    out = fresh_out_dir(tmp_path)
    args = [a.format(f=files) for a in args]
    expect_clear_error(lambda: run_script("bench.py", [*BENCH_TINY, *args]), out, pattern)
