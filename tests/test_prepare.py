"""prepare.py: ADM crops of awkward images, folder scanning, the demo dataset, and the latent shards."""
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
from conftest import torchrun


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
    got = np.asarray(prepare.adm_center_crop(prepare.load_rgb(path), size))
    want = reference_crop(path, size)
    assert got.shape == want.shape == (size, size, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_crop_geometry_by_hand():
    # 700x300 -> 64: box-halve twice (350x150, 175x75), bicubic to round(175*64/75)=149 x 64, crop from x=42
    ramp = np.tile(np.arange(700, dtype=np.uint16)[None, :] // 3, (300, 1)).astype(np.uint8)
    image = Image.fromarray(ramp).convert("RGB")
    halved = image.resize((350, 150), Image.BOX).resize((175, 75), Image.BOX)
    expected = np.asarray(halved.resize((149, 64), Image.BICUBIC))[:, 42:106]
    np.testing.assert_array_equal(np.asarray(prepare.adm_center_crop(image, 64)), expected)
    tiny = Image.new("RGB", (20, 30))  # upscaled: 64 x round(30*3.2)=96, crop from y=16
    assert prepare.adm_center_crop(tiny, 64).size == (64, 64)


def test_load_rgb_rejects_broken_files(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:len(data) // 2])
    (tmp_path / "text.png").write_text("not an image")
    for name in ("cut.jpg", "text.png"):
        with pytest.raises(Exception):
            prepare.load_rgb(str(tmp_path / name))


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
    module = importlib.reload(prepare)  # fresh module constants for every run
    module.main(args)


def read_shards(folder):
    shards = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                shards[name] = ({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
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
    u8 = torch.from_numpy(np.array(prepare.adm_center_crop(prepare.load_rgb(files[7][0]), 64)))[None]
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

    # crash: shard 1 missing, a half-written temporary file left; the rerun redoes only shard 1, bit for bit
    names = list(shards)
    before = {n: os.stat(out / n).st_mtime_ns for n in names}
    os.remove(out / names[1])
    (out / (names[1] + ".tmp999")).write_bytes(b"half")
    run_prepare(args)
    assert "skipped 2 unreadable image(s)" in capsys.readouterr().out  # still listed: read from the shards
    assert sorted(os.listdir(out)) == sorted(names + ["latents_stats.pt", "prepare.json"])
    assert os.stat(out / names[0]).st_mtime_ns == before[names[0]]
    assert os.stat(out / names[2]).st_mtime_ns == before[names[2]]
    again = read_shards(out)[names[1]][0]
    for key in ("latents", "latents_flip", "labels"):
        assert torch.equal(again[key], shards[names[1]][0][key])

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
