"""prepare.py: ADM crops of awkward images (the shared reader in config/runtime.py), folder scanning, the demo dataset,
the latent shards, clear errors."""
import hashlib
import importlib
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import prepare
import vavae
from config.runtime import adm_center_crop, load_rgb
from conftest import torchrun
from test_bad_inputs import KW64_MISMATCH, expect_clear_error, files, fresh_out_dir, isolated  # noqa: F401


# -----------------------------------------------------------------------------
# crops: a straightforward re-statement of the release's pipeline (ImageFolder loader + ADM's center_crop_arr)

def reference_crop(path, size):
    image = Image.open(path)
    if image.mode == "I;16":
        image = Image.fromarray(np.round(np.asarray(image) / 257).astype(np.uint8))
    if image.mode in ("RGBA", "P"):
        rgba = np.asarray(image.convert("RGBA")).astype(np.float64)
        alpha = rgba[..., 3:] / 255
        image = Image.fromarray(np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8))
    image = image.convert("RGB")
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.array(image)
    crop_y, crop_x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[crop_y:crop_y + size, crop_x:crop_x + size]


def odd_image(mode, width, height, seed=0):
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs * 255 // max(width - 1, 1), ys * 255 // max(height - 1, 1), (xs * ys) % 256], -1)
    rgb = np.clip(rgb + rng.integers(-20, 20, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    if mode == "I;16":
        return Image.fromarray((rgb[..., 0].astype(np.uint16) * 257 + ys.astype(np.uint16)))
    if mode == "RGBA":
        alpha = np.where(xs < width // 3, 0, np.where(xs < 2 * width // 3, 255, 128)).astype(np.uint8)
        return Image.fromarray(np.dstack([rgb, alpha]))
    if mode == "P":
        image = image.quantize(16)
        image.info["transparency"] = 3  # palette entry 3 is transparent
        return image
    return image.convert(mode)


CASES = [("RGB", 333, 257, 64), ("L", 129, 300, 64), ("CMYK", 100, 80, 64), ("P", 90, 140, 64),
         ("RGBA", 150, 99, 64), ("I;16", 70, 130, 64), ("RGB", 20, 30, 64), ("RGB", 700, 300, 64),
         ("RGB", 700, 300, 256), ("L", 700, 300, 512)]


@pytest.mark.parametrize("mode, width, height, size", CASES)
def test_crop_matches_reference(tmp_path, mode, width, height, size):
    path = str(tmp_path / ("x.jpg" if mode == "CMYK" else "x.png"))
    odd_image(mode, width, height).save(path)
    assert Image.open(path).mode == mode
    got = np.asarray(adm_center_crop(load_rgb(path), size))
    want = reference_crop(path, size)
    assert got.shape == want.shape == (size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_crop_geometry_by_hand():
    # 700x300 -> 64: box-halve twice (350x150, 175x75), bicubic to round(175*64/75)=149 x 64, crop from x=42
    ramp = np.tile(np.arange(700, dtype=np.uint16)[None, :] // 3, (300, 1)).astype(np.uint8)
    image = Image.fromarray(ramp).convert("RGB")
    halved = image.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX)
    expected = np.asarray(halved.resize((149, 64), Image.BICUBIC))[:, 42:106]
    np.testing.assert_array_equal(np.asarray(adm_center_crop(image, 64)), expected)
    tiny = Image.new("RGB", (20, 30))  # upscaled: 64 x round(30*3.2)=96, crop from y=16
    assert adm_center_crop(tiny, 64).size == (64, 64)


def test_load_rgb_rejects_broken_files(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.jpg", "text.png"):
        with pytest.raises(Exception):
            load_rgb(str(tmp_path / name))


# -----------------------------------------------------------------------------
# folder scanning

def test_scan_keeps_class_indices(tmp_path, capsys):
    for name in ("b_cat", "a_dog", "c_empty", "d_fish/sub"):
        os.makedirs(tmp_path / name)
    for path in ("a_dog/1.JPEG", "a_dog/0.png", "b_cat/x.jpg", "d_fish/z.png", "d_fish/sub/y.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / path, format="PNG")
    (tmp_path / "b_cat" / "notes.txt").write_text("x")
    (tmp_path / "README").write_text("x")
    files, classes = prepare.scan_image_folder(str(tmp_path))
    assert classes == ["a_dog", "b_cat", "c_empty", "d_fish"]
    rel = [(os.path.relpath(p, tmp_path), y) for p, y in files]
    assert rel == [("a_dog/0.png", 0), ("a_dog/1.JPEG", 0), ("b_cat/x.jpg", 1), ("d_fish/z.png", 3),
                   ("d_fish/sub/y.png", 3)]  # ImageFolder's order; the empty class keeps label 2
    out = capsys.readouterr().out
    assert "'c_empty' (label 2) has no images" in out and "ignored 1 files" in out


def test_scan_reads_a_folder_reached_through_a_link_loop_once(tmp_path):
    os.makedirs(tmp_path / "a" / "sub")
    for path in ("a/0.png", "a/1.png", "a/sub/2.png", "a/sub/3.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / path)
    os.symlink(tmp_path / "a", tmp_path / "a" / "sub" / "loop")  # a/sub/loop/sub/loop/...
    files, classes = prepare.scan_image_folder(str(tmp_path))
    assert classes == ["a"]
    # 4 images, not one copy per trip around the loop (164 before: until the system refuses the path)
    assert [(os.path.relpath(p, tmp_path), y) for p, y in files] == [("a/0.png", 0), ("a/1.png", 0),
                                                                      ("a/sub/2.png", 0), ("a/sub/3.png", 0)]


def test_scan_errors(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        prepare.scan_image_folder(str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="no class subfolders"):
        prepare.scan_image_folder(str(tmp_path))
    os.makedirs(tmp_path / "a")
    with pytest.raises(SystemExit, match="no images found"):
        prepare.scan_image_folder(str(tmp_path))


# -----------------------------------------------------------------------------
# demo dataset

def folder_digest(folder):
    digest = hashlib.sha256()
    for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            digest.update(os.path.relpath(os.path.join(root, name), folder).encode())
            digest.update(open(os.path.join(root, name), "rb").read())
    return digest.hexdigest()


def test_demo_dataset_is_deterministic_and_class_conditional(tmp_path):
    a = prepare.make_demo_dataset(str(tmp_path / "a"), num_classes=10, images_per_class=12)
    run_prepare([f"--make_demo={tmp_path / 'b'}", "--demo_images_per_class=12"])  # the command line way
    assert folder_digest(a) == folder_digest(tmp_path / "b")
    files, classes = prepare.scan_image_folder(a)
    assert len(classes) == 10 and len(files) == 120
    pixels = np.stack([np.asarray(Image.open(p)) for p, _ in files]).astype(np.float64)  # (120, 64, 64, 3)
    labels = np.array([y for _, y in files])
    assert pixels.shape == (120, 64, 64, 3)
    # the classes differ in what lies where the background does not: the pixels far from the image's median colour
    median = np.median(pixels, axis=(1, 2), keepdims=True)
    outlier = np.abs(pixels - median).sum(-1, keepdims=True) > 90
    feature = (pixels * outlier).sum((1, 2)) / np.maximum(outlier.sum((1, 2)), 1)  # mean colour of the shape
    centroids = np.stack([feature[labels == c].mean(0) for c in range(10)])
    nearest = np.argmin(((feature[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() > 0.9
    distances = np.sqrt(((centroids[:, None] - centroids[None]) ** 2).sum(-1)) + 1e9 * np.eye(10)
    assert distances.min() > 40
    # and they vary within a class: position, size, rotation, background
    assert pixels[labels == 0].std(0).mean() > 20


# -----------------------------------------------------------------------------
# latent shards: format, per-image seeds, statistics, bad files, resume, ranks

def save_tiny_autoencoder(path):
    torch.manual_seed(1)
    torch.save({"state_dict": vavae.AutoencoderKL(ch=32).state_dict()}, path)


def run_prepare(args):
    with isolated():
        importlib.reload(prepare).main(args)  # fresh module constants for every run


def read_shards(folder):
    shards = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                shards[name] = ({k: f.get_tensor(k).clone() for k in f.keys()}, f.metadata())  # not a view of the file
    return shards


def test_shards_stats_bad_files_and_resume(tmp_path, capsys):
    data, out, ae_path = tmp_path / "data", tmp_path / "latents", tmp_path / "vavae.pt"
    prepare.make_demo_dataset(str(data), num_classes=3, images_per_class=5)
    odd_image("CMYK", 100, 80).save(data / "00_red_circle" / "zz.jpg")
    png = (data / "01_green_square" / "0000.png").read_bytes()
    (data / "01_green_square" / "bad.png").write_bytes(png[:len(png) // 2])  # truncated
    (data / "02_blue_triangle" / "text.png").write_text("not an image")
    (data / "02_blue_triangle" / "notes.txt").write_text("ignored")
    os.makedirs(data / "03_empty")
    save_tiny_autoencoder(ae_path)
    args = [f"--data_dir={data}", f"--out_dir={out}", f"--vavae_path={ae_path}", "--image_size=64",
            "--shard_size=7", "--batch_size=3", "--num_workers=0", "--seed=5"]
    run_prepare(args)
    log = capsys.readouterr().out
    assert "'03_empty' (label 3) has no images" in log and "ignored 1 files" in log
    assert "skipped 2 unreadable image(s)" in log and "bad.png" in log and "text.png" in log

    # 18 files in ImageFolder order, cut into shards of 7 / 7 / 4; the 2 unreadable ones are left out
    shards = read_shards(out)
    assert sorted(os.listdir(out)) == ["latents_rank00_shard000.safetensors", "latents_rank00_shard001.safetensors",
                                       "latents_rank00_shard002.safetensors", "latents_stats.pt", "prepare.json"]
    for tensors, metadata in shards.values():
        assert set(tensors) == {"latents", "latents_flip", "labels"}
        n = tensors["labels"].shape[0]
        assert tensors["latents"].dtype == tensors["latents_flip"].dtype == torch.float32
        assert tensors["labels"].dtype == torch.int64
        assert tensors["latents"].shape == tensors["latents_flip"].shape == (n, 32, 4, 4)
        assert metadata["total_size"] == str(n) and metadata["dtype"] == "torch.float32"
    assert [t["labels"].shape[0] for t, _ in shards.values()] == [7, 6, 3]
    labels = torch.cat([t["labels"] for t, _ in shards.values()])
    assert labels.tolist() == [0] * 6 + [1] * 5 + [2] * 5

    # image 7 (class 1, first of shard 1) by hand: crop, encode, noise from a generator seeded with seed + 7
    files, _ = prepare.scan_image_folder(str(data))
    assert files[7][0].endswith("01_green_square/0001.png")
    u8 = torch.from_numpy(np.array(adm_center_crop(load_rgb(files[7][0]), 64)))[None]
    x = vavae.uint8_to_images(u8)
    ae = vavae.load_autoencoder(str(ae_path))
    noise = torch.randn(2, 32, 4, 4, generator=torch.Generator().manual_seed(5 + 7))
    with torch.no_grad():
        posterior = ae.encode(torch.cat([x, x.flip(3)]))
    want = posterior.mean + posterior.std * noise
    shard1 = shards["latents_rank00_shard001.safetensors"][0]
    torch.testing.assert_close(shard1["latents"][0], want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shard1["latents_flip"][0], want[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shard1["latents"][0], posterior.mean[0], atol=1e-3)  # a sample, not the mode

    latents = torch.cat([t["latents"] for t, _ in shards.values()])
    stats = torch.load(out / "latents_stats.pt", weights_only=True)
    assert stats["mean"].shape == stats["std"].shape == (1, 32, 1, 1)
    torch.testing.assert_close(stats["mean"], latents.mean(dim=(0, 2, 3), keepdim=True), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats["std"], latents.std(dim=(0, 2, 3), keepdim=True), atol=1e-6, rtol=1e-5)

    # crash: shard 1 missing, half-written temporary files left, shard 2 cut short (a bad copy); the rerun removes the
    # temporary files and redoes shards 1 and 2 only, bit for bit
    names = list(shards)
    before = os.stat(out / names[0]).st_mtime_ns
    os.remove(out / names[1])
    (out / f".{names[1]}.tmp999").write_bytes(b"half")
    (out / ".latents_stats.pt.tmp998").write_bytes(b"half")
    (out / names[2]).write_bytes((out / names[2]).read_bytes()[:-100])
    run_prepare(args)
    log = capsys.readouterr().out
    assert "skipped 2 unreadable image(s)" in log  # still listed: read from the shards
    assert "removed 2 temporary file(s)" in log and f"{names[2]} is damaged" in log and f"{names[0]} is" not in log
    assert sorted(os.listdir(out)) == sorted(names + ["latents_stats.pt", "prepare.json"])
    assert os.stat(out / names[0]).st_mtime_ns == before
    again = read_shards(out)
    for name in names:  # (not byte for byte: safetensors orders the metadata keys differently on each save)
        assert again[name][1] == shards[name][1]
        for key in ("latents", "latents_flip", "labels"):
            assert torch.equal(again[name][0][key], shards[name][0][key])

    with pytest.raises(SystemExit, match=r"holds shards made with other settings \(seed differ"):
        run_prepare(args + ["--seed=6"])


def test_missing_inputs_are_clear_errors(tmp_path):
    save_tiny_autoencoder(tmp_path / "vavae.pt")
    with pytest.raises(SystemExit, match="VA-VAE checkpoint .*nope.pt does not exist"):
        run_prepare([f"--data_dir={tmp_path}", f"--vavae_path={tmp_path / 'nope.pt'}"])
    with pytest.raises(SystemExit, match="data folder .*missing does not exist"):
        run_prepare([f"--data_dir={tmp_path / 'missing'}", f"--vavae_path={tmp_path / 'vavae.pt'}"])


def test_two_ranks_write_the_same_latents(tmp_path, one_thread):
    data, ae_path = tmp_path / "data", tmp_path / "vavae.pt"
    prepare.make_demo_dataset(str(data), num_classes=2, images_per_class=5)
    save_tiny_autoencoder(ae_path)
    common = [f"--data_dir={data}", f"--vavae_path={ae_path}", "--image_size=64", "--shard_size=3", "--batch_size=2",
              "--num_workers=0"]
    run_prepare(common + [f"--out_dir={tmp_path / 'one'}"])
    result = torchrun("--nproc_per_node=2", "prepare.py", *common, f"--out_dir={tmp_path / 'two'}")
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = read_shards(tmp_path / "one"), read_shards(tmp_path / "two")
    # shard k of 4 (3+3+3+1 images) is written by rank k % 2 as its shard k // 2
    assert list(two) == ["latents_rank00_shard000.safetensors", "latents_rank00_shard001.safetensors",
                         "latents_rank01_shard000.safetensors", "latents_rank01_shard001.safetensors"]
    in_order = [two[f"latents_rank{k % 2:02d}_shard{k // 2:03d}.safetensors"][0] for k in range(4)]
    for key in ("latents", "latents_flip", "labels"):
        assert torch.equal(torch.cat([t[key] for t in in_order]), torch.cat([t[key] for t, _ in one.values()]))
    assert torch.equal(torch.load(tmp_path / "one" / "latents_stats.pt")["std"],
                       torch.load(tmp_path / "two" / "latents_stats.pt")["std"])


# -----------------------------------------------------------------------------
# bad inputs: one clear error line, out_dir untouched (fixtures and helpers in test_bad_inputs.py)

def other_settings_shards(out):
    (out / "prepare.json").write_text('{"seed": 1}')
    (out / "latents_rank00_shard000.safetensors").write_bytes(b"an earlier run's shard")


def shards_without_manifest(out):
    (out / "latents_rank00_shard000.safetensors").write_bytes(b"a shard from somewhere")


def shards_with_unreadable_manifest(out):
    (out / "prepare.json").write_text('{"seed": 1, ')
    (out / "latents_rank00_shard000.safetensors").write_bytes(b"an earlier run's shard")


@pytest.mark.parametrize("args, setup, pattern", [
    (["--no_such_option=1"], None, "unknown option --no_such_option"),
    (["--image_size=big"], None, "--image_size='big' is not a valid int"),
    (["--seed=1.5"], None, "--seed expects int"),
    (["{f}/nope.py"], None, "config file .*nope.py does not exist"),
    (["--image_size=0"], None, r"--image_size=0 is not allowed: it must be in \[16, 4096\]"),
    (["--image_size=100000"], None, r"--image_size=100000 is not allowed: it must be in \[16, 4096\]"),
    (["--image_size=40"], None, r"--image_size=40 must be a multiple of 16 \(the autoencoder's downsampling\)"),
    (["--shard_size=0"], None, "--shard_size=0 is not allowed: it must be >= 1"),
    (["--batch_size=0"], None, "--batch_size=0 is not allowed: it must be >= 1"),
    (["--num_workers=-1"], None, "--num_workers=-1 is not allowed: it must be >= 0"),
    (["--seed=-1"], None, r"--seed=-1 is not allowed: it must be in \[0, 1e18\]"),
    (["--timeout_minutes=0"], None, "--timeout_minutes=0.0 is not allowed: it must be > 0"),
    (["--allow_unsafe_checkpoint=None"], None, "--allow_unsafe_checkpoint=None is not allowed: it must be one of "
                                               "True, False"),
    (["--vavae_path={f}/nope.pt"], None, "VA-VAE checkpoint .*nope.pt does not exist"),
    (["--vavae_path={f}/truncated.pt"], None, "truncated.pt is not a readable checkpoint"),
    (["--vavae_path={f}/dit.pt"], None, "dit.pt has no autoencoder weights"),
    (["--vavae_path={f}/tensor.pt"], None, "tensor.pt holds a Tensor"),
    (["--vavae_path={f}/vavae_kw64.pt"], None, KW64_MISMATCH),
    (["--vavae_path={f}/pickled.pt"], None, "pickled Python objects"),
    (["--vavae_path={f}/vavae_nan.pt"], None, "vavae_nan.pt gives non-finite latents"),
    (["--data_dir={f}/missing"], None, "data folder .*missing does not exist"),
    (["--data_dir={f}/vavae.pt"], None, r"data folder .*vavae.pt is a file \(expected one subfolder per class\)"),
    (["--data_dir={f}/mixed"], None, "has no class subfolders"),
    (["--data_dir={f}/empty"], None, r"no images found under .*empty \(image files end in .jpg .jpeg .png"),
    (["--data_dir={f}/corrupt"], None, r"none of the 4 images of shard 0 could be read, e.g. .*0.png"),
    ([], other_settings_shards, "holds shards made with other settings"),
    ([], shards_without_manifest, r"holds shards but .*prepare.json is missing or unreadable \(.*No such file"),
    ([], shards_with_unreadable_manifest, r"prepare.json is missing or unreadable \(Expecting"),
    (["--out_dir={f}/vavae.pt/latents"], None, "could not create out_dir .*vavae.pt/latents: Not a directory"),
    (["--make_demo={f}/vavae.pt/demo"], None,
     "could not create make_demo .*vavae.pt/demo: Not a directory; choose another --make_demo"),
    (["--make_demo={out}"], None, r"--make_demo=.*out is not empty \(it holds earlier_result.txt\); choose a new"),
    (["--make_demo={tmp}/demo", "--demo_classes=11"], None, r"--demo_classes=11 is not allowed: it must be in \[1, 10"),
    (["--make_demo={tmp}/demo", "--demo_classes=0"], None, r"--demo_classes=0 is not allowed: it must be in \[1, 10"),
    (["--make_demo={tmp}/demo", "--demo_images_per_class=0"], None, "--demo_images_per_class=0 is not allowed"),
    (["--make_demo={tmp}/demo", "--demo_image_size=4"], None, r"--demo_image_size=4 is not allowed: it must be in \["),
])
def test_prepare(files, tmp_path, args, setup, pattern):
    out = fresh_out_dir(tmp_path)
    if setup:
        setup(out)
    args = [a.format(f=files, out=out, tmp=tmp_path) for a in args]
    expect_clear_error(lambda: run_prepare([f"--data_dir={files}/images", f"--vavae_path={files}/vavae.pt",
                                            f"--out_dir={out}", "--image_size=64", "--num_workers=0", *args]),
                       out, pattern)
    assert not os.path.exists(out / "latents_stats.pt") and not os.path.exists(tmp_path / "demo")
