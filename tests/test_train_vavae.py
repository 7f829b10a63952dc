"""train_vavae.py end to end on a few generated images: tiny autoencoder (ch 32, 64 px crops, 4x4 latents), a random
ViT-S/14 at 56 px as the foundation model (4x4 tokens), random-weight LPIPS. Runs in-process through runpy."""
import math
import os
import re
import runpy
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import ROOT

import vavae
from config.runtime import latest_checkpoint

SCRIPT = os.path.join(ROOT, "train_vavae.py")
TINY = ["--image_size=64", "--ch=32", "--vf_model=vit_small_patch14_dinov2.lvd142m", "--vf_weights=random",
        "--vf_image_size=56", "--lpips_weights=random", "--global_batch_size=4", "--num_workers=0", "--log_every=1"]


def run_train(args):
    argv = sys.argv
    sys.argv = [SCRIPT, *args]
    try:
        runpy.run_path(SCRIPT, run_name="__main__")
    finally:
        sys.argv = argv


def make_images(folder, n, odd_ones=False, size=None):
    """n smooth RGB PNGs (size x size, or of assorted sizes) in two class folders; odd_ones turns the first five into
    greyscale, CMYK, RGBA, palette and a too-small image, and adds one file that is not an image at all."""
    rng = np.random.default_rng(0)
    for i in range(n):
        h, w = (size, size) if size else rng.integers(64, 110, 2)
        yy, xx = np.mgrid[0:h, 0:w] / 8.0
        pixels = np.stack([np.sin(xx + i), np.cos(yy - i), np.sin(xx + yy)], -1) * 100 + 128
        image = Image.fromarray(pixels.astype(np.uint8))
        if odd_ones:
            image = [image.convert("L"), image.convert("CMYK"), image.convert("RGBA"), image.convert("P"),
                     image.resize((40, 50)), image][min(i, 5)]
        os.makedirs(folder / f"class{i % 2}", exist_ok=True)
        image.save(folder / f"class{i % 2}" / f"{i}.{'jpg' if image.mode in ('L', 'CMYK') else 'png'}")
    if odd_ones:
        (folder / "class0" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")


def log_values(output, name):
    return [float(v) for v in re.findall(rf" {name} ([-0-9.e+]+)", output)]


def test_training_reduces_reconstruction_loss_with_every_term_active(tmp_path, capsys):
    make_images(tmp_path / "data", 5, odd_ones=True, size=64)  # + the broken file: one step of 4 per epoch
    out = tmp_path / "out"
    run_train([*TINY, f"--data_dir={tmp_path / 'data'}", f"--out_dir={out}", "--max_steps=32", "--epochs=32",
               "--disc_start=0", "--lr=3e-4", "--image_every=32", "--ckpt_every=16"])
    output = capsys.readouterr().out
    nll = log_values(output, "nll_sum")
    assert len(nll) == 32 and all(math.isfinite(v) for v in nll)
    assert sum(nll[-8:]) / 8 < 0.8 * sum(nll[:4]) / 4, nll
    for name in ("kl", "vf_loss", "vf_weight", "d_weight", "d_loss"):  # every term is on from the first step
        assert all(v > 0 for v in log_values(output, name)), (name, output)
    assert any(v != 0 for v in log_values(output, "g_loss"))
    assert "img/s" in output
    skipped = re.search(r"skipped (\d+) unreadable image", output)
    assert skipped and int(skipped.group(1)) >= 1, output

    assert sorted(os.listdir(out)) == ["metrics.jsonl", "metrics.png", "recon_00000032.png", "step_00000016.pt",
                                       "step_00000032.pt"]
    grid = Image.open(out / "recon_00000032.png")  # inputs over reconstructions
    assert grid.size == (5 * 64, 2 * 64)  # the 5 readable images (a fixed set for the whole run)
    checkpoint = torch.load(latest_checkpoint(str(out)), weights_only=True)
    assert checkpoint["step"] == 32 and checkpoint["epoch"] == 32.0 and checkpoint["config"]["lr"] == 3e-4
    assert checkpoint["autoencoder_kwargs"]["ch"] == 32 and "autoencoder_ema" not in checkpoint
    assert list(checkpoint["vf_loss"]) == ["linear_proj.weight"]
    assert checkpoint["vf_loss"]["linear_proj.weight"].shape == (384, 32, 1, 1)
    assert "main.3.running_mean" in checkpoint["discriminator"]
    assert set(checkpoint) >= {"optimizer_ae", "optimizer_disc"}

    # what was learned, measured apart from training: L1 error on the images (resized to 64 px, posterior mean)
    autoencoder = vavae.load_autoencoder(latest_checkpoint(str(out)))  # as prepare.py / sample.py load it
    assert autoencoder.kwargs["ch"] == 32
    images = [Image.open(p).convert("RGB").resize((64, 64)) for p in sorted((tmp_path / "data").glob("*/[0-9].*"))]
    x = vavae.uint8_to_images(torch.from_numpy(np.stack([np.asarray(image) for image in images])))
    torch.manual_seed(0)
    untrained = vavae.AutoencoderKL(ch=32).eval()
    with torch.no_grad():
        errors = [(m.decode(m.encode(x).mode()) - x).abs().mean().item() for m in (untrained, autoencoder)]
    assert errors[1] < 0.8 * errors[0], errors


def test_resume_is_bitwise_exact(tmp_path, capsys):
    make_images(tmp_path / "data", 8)
    common = [*TINY, f"--data_dir={tmp_path / 'data'}", "--disc_start=1", "--ema_decay=0.9", "--image_every=0"]
    run_train([*common, f"--out_dir={tmp_path / 'straight'}", "--max_steps=4"])
    run_train([*common, f"--out_dir={tmp_path / 'resumed'}", "--max_steps=2"])
    run_train([*common, f"--out_dir={tmp_path / 'resumed'}", "--max_steps=4"])
    assert "resumed from" in capsys.readouterr().out
    a = torch.load(tmp_path / "straight" / "step_00000004.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "step_00000004.pt", weights_only=True)
    for key in ("autoencoder", "autoencoder_ema", "vf_loss", "discriminator"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)
    assert not torch.equal(a["autoencoder"]["decoder.conv_out.weight"], a["autoencoder_ema"]["decoder.conv_out.weight"])
    for key in ("optimizer_ae", "optimizer_disc"):
        for i, state in a[key]["state"].items():
            for name, value in state.items():
                assert torch.equal(value, b[key]["state"][i][name]), (key, i, name)


def test_init_from_starts_a_stage_from_previous_weights(tmp_path, capsys):
    make_images(tmp_path / "data", 8)
    common = [*TINY, f"--data_dir={tmp_path / 'data'}", "--disc_start=0", "--image_every=0", "--max_steps=1"]
    run_train([*common, f"--out_dir={tmp_path / 'stage1'}"])
    run_train([*common, f"--out_dir={tmp_path / 'stage2'}", f"--init_from={tmp_path / 'stage1'}", "--lr=1e-30",
               "--seed=5"])
    assert "initialised from" in capsys.readouterr().out
    a = torch.load(tmp_path / "stage1" / "step_00000001.pt", weights_only=True)
    b = torch.load(tmp_path / "stage2" / "step_00000001.pt", weights_only=True)
    for key in ("autoencoder", "vf_loss", "discriminator"):
        for name, value in a[key].items():
            if "running" not in name and "num_batches" not in name:  # BatchNorm statistics move in train mode
                assert torch.equal(value, b[key][name]), (key, name)


def test_ldm_baseline_without_vf_loss_and_l1_only(tmp_path, capsys):
    make_images(tmp_path / "data", 4)
    run_train([*TINY, "--vf_model=", "--perceptual_weight=0.0", "--lpips_weights=missing.pth",
               f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", "--max_steps=1", "--image_every=0"])
    assert log_values(capsys.readouterr().out, "vf_loss") == [0.0]
    assert "vf_loss" not in torch.load(tmp_path / "out" / "step_00000001.pt", weights_only=True)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys):
    make_images(tmp_path / "data", 4)
    with pytest.raises(SystemExit, match="non-finite loss at step"):
        run_train([*TINY, f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'out'}", "--lr=1e30",
                   "--ckpt_every=1", "--max_steps=10", "--epochs=10", "--image_every=0"])
    path = latest_checkpoint(str(tmp_path / "out"))
    assert path is not None
    checkpoint = torch.load(path, weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["autoencoder"].values())
    assert not [name for name in os.listdir(tmp_path / "out") if ".tmp" in name]  # no half-written file


def test_bad_options_give_clear_errors(tmp_path):
    data = tmp_path / "data"
    make_images(data, 4)
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    base = [*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}"]
    cases = [([f"--data_dir={tmp_path / 'missing'}"], "is not a folder"),
             ([f"--data_dir={tmp_path / 'empty'}"], "no images"),
             (["--global_batch_size=8"], "fewer than one global batch"),
             (["--micro_batch_size=3"], "does not divide"),
             (["--max_steps=100", "--epochs=2"], "past the end"),
             (["--ch=48"], "multiple"),
             (["--vf_image_size=224"], "token grid"),
             ([f"--lpips_weights={tmp_path / 'vgg.pth'}"], "LPIPS weights"),
             ([f"--init_from={tmp_path}"], "without step_"),
             (["--cos_margin=big"], "float"),
             (["--no_such_option=1"], "unknown option")]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            run_train([*base, *extra])
    for stage in (1, 2, 3):  # the schedule files only set known keys
        with pytest.raises(SystemExit, match="is not a folder"):
            run_train([os.path.join(ROOT, "config", f"vavae_stage{stage}.py"), f"--data_dir={tmp_path / 'missing'}"])
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
