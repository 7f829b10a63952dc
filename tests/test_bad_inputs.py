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
    torch.save({"autoencoder": vavae.AutoencoderKL(ch=64).state_dict(), "optimizer_ae": {}, "optimizer_disc": {},
                "step": 1, "config": {}}, out / "step_00000001.pt")


@pytest.mark.parametrize("args, setup, pattern", [
    (["--no_such_option=1"], None, "unknown option --no_such_option"),
    (["--lr=fast"], None, r"--lr='fast' is not a valid float"),
    (["--epochs=2.5"], None, "--epochs expects int"),
    (["--lr"], None, "--lr needs a value"),
    (["config/no_such_file.py"], None, "config file config/no_such_file.py does not exist"),
    (["--data_dir={f}/missing"], None, "data_dir .*missing is not a folder"),
    (["--data_dir={f}/empty"], None, "no images .* under .*empty"),
    (["--data_dir={f}/corrupt"], None, r"none of the 4 images of step 0 \(rank 0\) could be decoded"),
    (["--global_batch_size=0"], None, "--global_batch_size=0 is not allowed: it must be >= 1"),
    (["--global_batch_size=-4"], None, "--global_batch_size=-4 is not allowed"),
    (["--micro_batch_size=-1"], None, "--micro_batch_size=-1 is not allowed: it must be >= 0"),
    (["--lr=-1"], None, "--lr=-1.0 is not allowed: it must be > 0"),
    (["--ema_decay=1.5"], None, r"--ema_decay=1.5 is not allowed: it must be in \[0, 1\)"),
    (["--epochs=0"], None, "--epochs=0 is not allowed: it must be >= 1"),
    (["--max_steps=-5"], None, "--max_steps=-5 is not allowed: it must be >= 0"),
    (["--ckpt_every=0"], None, "--ckpt_every=0 is not allowed"),
    (["--log_every=0"], None, "--log_every=0 is not allowed"),
    (["--num_workers=-1"], None, "--num_workers=-1 is not allowed: it must be >= 0"),
    (["--ch=0"], None, "--ch=0 is not allowed: it must be >= 32"),
    (["--image_size=0"], None, "--image_size=0 is not allowed: it must be >= 16"),
    (["--image_size=40"], None, r"image_size \(40\) must be a multiple of 16"),
    (["--ch_mult=(1,2,4)", "--image_size=34"], None,
     r"image_size \(34\) must be a multiple of 4 \(ch_mult has 3 levels"),
    (["--ch_mult=()"], None, r"ch_mult \(\) must hold one positive width multiple per level"),
    (["--ch_mult=(1,0,2)"], None, r"ch_mult \(1, 0, 2\) must hold one positive width multiple per level"),
    (["--num_res_blocks=0"], None, "--num_res_blocks=0 is not allowed: it must be >= 1"),
    (["--vf_weight=-0.1"], None, "--vf_weight=-0.1 is not allowed"),
    (["--cos_margin=2"], None, r"--cos_margin=2.0 is not allowed: it must be in \[0, 1\]"),
    (["--kl_weight=nan"], None, "--kl_weight='nan' is not a valid float"),
    (["--bf16=no"], None, "--bf16='no' is not allowed: it must be one of True, False, None"),
    (["--compile=flase"], None, "--compile='flase' is not allowed: it must be one of True, False, None"),
    (["--timeout_minutes=0"], None, "--timeout_minutes=0.0 is not allowed: it must be > 0"),
    ([], lambda out: torch.save({"model": {}, "ema": {}, "optimizer": {}, "step": 2, "config": {}},
                                out / "step_00000002.pt"),
     "step_00000002.pt lacks autoencoder, optimizer_ae, optimizer_disc: it is not a train_vavae.py checkpoint to "
     "resume.* --init_from"),
    (["--vf_model=vit_small_patch14_dinov2.lvd142m", "--vf_image_size=56", "--vf_weights={f}/pickled.pt"], None,
     "pickled.pt holds pickled Python objects beyond tensors .* --allow_unsafe_checkpoint=True"),
    (["--vf_model=vit_small_patch14_dinov2.lvd142m", "--vf_image_size=56", "--vf_weights={f}/truncated.pt"], None,
     "truncated.pt is not a readable checkpoint"),
    (["--vf_model=vit_small_patch14_dinov2.lvd142m", "--vf_image_size=56", "--vf_weights={f}/dit.pt"], None,
     "could not load the vit_small_patch14_dinov2.lvd142m weights from .*dit.pt \\(.*\\); give --vf_weights"),
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
    (["--out_dir={f}/vavae.pt"], None, "out_dir .*vavae.pt is a file, not a folder; choose another --out_dir"),
])
def test_train_vavae(files, tmp_path, args, setup, pattern):
    out = fresh_out_dir(tmp_path)
    if setup:
        setup(out)
    args = [a.format(f=files) for a in args]
    expect_clear_error(lambda: run_script("train_vavae.py", [*VAVAE_TINY, f"--data_dir={files}/images",
                                                             f"--out_dir={out}", *args]), out, pattern)


