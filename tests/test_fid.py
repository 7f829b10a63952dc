"""fid.py: the FID Inception against torch-fidelity's numbers, TF1 resize by hand, metrics against hand-computed values.

Reference numbers below come from torch-fidelity 0.4.0 ('inception-v3-compat', TF1 resize, uint8 input) with the
shared weights plus a zero fc, on the four golden ImageNet crops (vavae.pt then discriminator.pt x_uint8); the
sFID layer read there with a forward hook on Mixed_6d.branch1x1, first 7 channels, flattened H, W, C.
Only 4 images go through the network per test run (CLI test: 2 + 2 more).
"""
import json
import math
import os
import runpy
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ASSETS, GOLDEN, ROOT
from config.runtime import adm_center_crop
from test_bad_inputs import expect_clear_error, files, fresh_out_dir, run_script, write_png  # noqa: F401
import fid

WEIGHTS = os.path.join(ASSETS, "pt_inception-2015-12-05.pth")
POOL_FIRST6 = [[0.0925148, 0.0626383, 0.0664622, 0.1483741, 0.3742048, 0.0936643],
               [0.0314268, 0.1311282, 0.3270885, 0.1696442, 0.3486851, 0.3338154],
               [0.0417458, 0.4016531, 0.2008668, 0.3656101, 0.0492257, 0.6013154],
               [0.6832073, 0.1628481, 0.0359484, 0.0716244, 0.0909745, 1.1947261]]
POOL_SUM = [390.7474565, 547.5538533, 339.3051821, 804.5284138]
POOL_SQ = [175.0030667, 328.6842942, 162.7625581, 893.4169968]
POOL_ARGMAX = [1643, 2028, 997, 639]
SPATIAL_SUM = [358.2311673, 563.7165815, 572.3484391, 517.6832881]
SPATIAL_SQ = [428.8847377, 761.9250547, 720.8378459, 583.274134]
SPATIAL_AT = ([0, 1, 100, 1000, 2022], [[1.8535128, 0, 0, 0, 0], [0, 0.1523887, 0, 0.0455159, 0],
                                        [0, 0.0870881, 0, 0, 0.0666314], [0, 1.3835118, 2.1232238, 0, 0]])
# FID / sFID of images {0, 1} vs {2, 3} from torch-fidelity features, exact for rank-1 covariances:
# |mu1 - mu2|^2 + |v1|^2 + |v2|^2 - 2 |v1.v2| with v = (f_a - f_b) / sqrt(2)
FID_01_VS_23, SFID_01_VS_23 = 685.2379270593674, 1423.1898352412688


def golden_images():
    paths = [os.path.join(GOLDEN, f) for f in ("vavae.pt", "discriminator.pt")]
    if not all(os.path.exists(p) for p in paths):
        pytest.skip(f"golden files {paths} not found")
    return np.concatenate([torch.load(p, weights_only=True)["x_uint8"].numpy() for p in paths])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One pass of the 4 golden images (batches of 3 + 1) through a model whose fc has a non-zero bias."""
    if not os.path.exists(WEIGHTS):
        pytest.skip(f"Inception weights {WEIGHTS} not found")
    images = golden_images()
    state = torch.load(WEIGHTS, weights_only=True)
    gen = torch.Generator().manual_seed(0)
    fc = {"fc.weight": torch.randn(1008, 2048, generator=gen) * 0.1, "fc.bias": torch.randn(1008, generator=gen)}
    path = str(tmp_path_factory.mktemp("inception") / "with_fc.pth")
    torch.save(dict(state, **fc), path)
    model = fid.load_inception(path)
    stem_inputs = []
    hook = model.Conv2d_1a_3x3.register_forward_pre_hook(lambda m, args: stem_inputs.append(args[0].clone()))
    features = fid.inception_features(model, images, batch_size=3)
    hook.remove()
    return dict(images=images, features=features, stem_input=torch.cat(stem_inputs), fc=fc)


# --- network ------------------------------------------------------------------------------------------------

def test_pool3_matches_torch_fidelity(run):
    pool = run["features"]["pool"].astype(np.float64)
    assert run["features"]["pool"].dtype == np.float32 and pool.shape == (4, 2048)
    np.testing.assert_allclose(pool[:, :6], POOL_FIRST6, atol=2e-6)
    np.testing.assert_allclose(pool.sum(1), POOL_SUM, rtol=1e-6)
    np.testing.assert_allclose((pool ** 2).sum(1), POOL_SQ, rtol=1e-6)
    assert pool.argmax(1).tolist() == POOL_ARGMAX


def test_spatial_features_are_adm_mixed_6_conv(run):
    spatial = run["features"]["spatial"].astype(np.float64)
    assert spatial.shape == (4, 7 * 17 * 17)
    np.testing.assert_allclose(spatial.sum(1), SPATIAL_SUM, rtol=1e-6)
    np.testing.assert_allclose((spatial ** 2).sum(1), SPATIAL_SQ, rtol=1e-6)
    np.testing.assert_allclose(spatial[:, SPATIAL_AT[0]], SPATIAL_AT[1], atol=2e-6)


def test_logits_are_pool3_times_fc_weight_without_bias(run):
    # ADM's Inception Score reads the graph's softmax weights and leaves out their bias
    pool, logits = run["features"]["pool"], run["features"]["logits"]
    expected = pool.astype(np.float64) @ run["fc"]["fc.weight"].double().numpy().T
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    assert logits.shape == (4, 1008)


def test_network_input_is_tf1_resize_then_scaled(run):
    # independent of fid.py: TF1 legacy ResizeBilinear (float32 source = dst * in/out), then (x - 128) / 128
    images = run["images"].astype(np.float32)
    scale = np.float32(256) / np.float32(299)
    src = np.arange(299, dtype=np.float32) * scale
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, 255)
    frac = (src - lo).astype(np.float32)[None, :, None, None]
    rows = images[:, lo] + (images[:, hi] - images[:, lo]) * frac
    frac = frac.reshape(1, 1, 299, 1)
    resized = rows[:, :, lo] + (rows[:, :, hi] - rows[:, :, lo]) * frac
    expected = (resized - 128) / 128
    np.testing.assert_allclose(run["stem_input"].permute(0, 2, 3, 1).numpy(), expected, atol=1e-6, rtol=0)


def test_load_inception_without_fc_gives_no_logits():
    if not os.path.exists(WEIGHTS):
        pytest.skip(f"Inception weights {WEIGHTS} not found")
    model = fid.load_inception(WEIGHTS)
    assert model.fc is None and not model.training
    assert all(not p.requires_grad for p in model.parameters())


# --- TF1 resize ---------------------------------------------------------------------------------------------

def test_resize_tf1_hand_computed():
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]])[None, None]
    # 2 -> 4: sources 0, 0.5, 1, 1.5; index 1.5 reads rows/columns 1 and min(2, 1) = 1
    expected = [[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]]
    assert fid.resize_bilinear_tf1(x, 4)[0, 0].tolist() == expected
    # 4 -> 2: scale 2, sources 0 and 2, so it samples pixels (0, 0), (0, 2), (2, 0), (2, 2)
    y = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert fid.resize_bilinear_tf1(y, 2)[0, 0].tolist() == [[0, 2], [8, 10]]
    z = torch.rand(1, 3, 5, 5)
    assert torch.equal(fid.resize_bilinear_tf1(z, 5), z)


def naive_tf1_resize(img, size):
    """Pixel by pixel, as in TF's resize_bilinear_op.cc (legacy scaler), float32."""
    h, w = img.shape
    out = np.zeros((size, size), np.float32)
    for i in range(size):
        sy = np.float32(i) * (np.float32(h) / np.float32(size))
        y0, ly = int(math.floor(sy)), np.float32(sy - math.floor(sy))
        y1 = min(y0 + 1, h - 1)
        for j in range(size):
            sx = np.float32(j) * (np.float32(w) / np.float32(size))
            x0, lx = int(math.floor(sx)), np.float32(sx - math.floor(sx))
            x1 = min(x0 + 1, w - 1)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * lx
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * lx
            out[i, j] = top + (bottom - top) * ly
    return out


@pytest.mark.parametrize("size", [4, 7, 29])
def test_resize_tf1_matches_naive_loop(size):
    img = np.random.default_rng(size).integers(0, 256, (17, 11)).astype(np.float32)
    got = fid.resize_bilinear_tf1(torch.from_numpy(img)[None, None], size)[0, 0].numpy()
    np.testing.assert_allclose(got, naive_tf1_resize(img, size), atol=1e-4, rtol=0)


# --- Frechet distance ---------------------------------------------------------------------------------------

def reference_frechet(mu1, s1, mu2, s2):
    # tr (S1 S2)^1/2 from the eigenvalues of the (non-symmetric) product: real, non-negative up to rounding
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig.real.clip(min=0)).sum())


@pytest.mark.parametrize("rank", [64, 40, 5])
def test_frechet_distance_matches_float64_reference(rank):
    rng = np.random.default_rng(rank)
    d = 64
    a, b = rng.standard_normal((d, rank)), rng.standard_normal((d, rank))
    s1, s2 = a @ a.T + 1e-9 * np.eye(d), b @ b.T * 0.5 + 1e-9 * np.eye(d)  # rank < d: near-singular
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert math.isfinite(got)
    assert got == pytest.approx(reference_frechet(mu1, s1, mu2, s2), rel=1e-6)


def test_frechet_distance_of_sample_statistics():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 32)) @ rng.standard_normal((32, 32))
    y = rng.standard_normal((200, 32)) * 2 + 1
    (mu1, s1), (mu2, s2) = fid.feature_statistics(x), fid.feature_statistics(y)
    got = fid.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(reference_frechet(mu1, s1, mu2, s2), rel=1e-9)
    assert got == pytest.approx(fid.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-8


def test_frechet_distance_closed_form_for_diagonal_covariances():
    var1, var2 = np.array([1.0, 4.0, 9.0, 0.0]), np.array([4.0, 4.0, 1.0, 2.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    # |mu1 - mu2|^2 + sum (sqrt(v1) - sqrt(v2))^2 = (1 + 4) + (1 + 0 + 4 + 2.25)
    assert fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(12.25, abs=1e-12)


def test_feature_statistics_hand_computed():
    mu, sigma = fid.feature_statistics(np.array([[0.0, 0.0], [2.0, 2.0], [1.0, 4.0]], np.float32))
    np.testing.assert_allclose(mu, [1.0, 2.0])
    np.testing.assert_allclose(sigma, [[1.0, 1.0], [1.0, 4.0]])  # unbiased: divided by N - 1 = 2
    assert mu.dtype == sigma.dtype == np.float64


# --- Inception Score, precision/recall ----------------------------------------------------------------------

def test_inception_score_hand_computed():
    ln3 = math.log(3)
    # p = (3/4, 1/4) and (1/4, 3/4): marginal (1/2, 1/2), KL = 3/4 ln(3/2) + 1/4 ln(1/2) for both
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    logits = np.array([[ln3, 0.0], [0.0, ln3], [0.0, 0.0], [5.0, 5.0]])
    assert fid.inception_score(logits[:2]) == pytest.approx(math.exp(kl), rel=1e-12)
    # one split of 4: marginal still (1/2, 1/2), uniform rows add KL 0
    assert fid.inception_score(logits) == pytest.approx(math.exp(kl / 2), rel=1e-12)
    # splits of 2 (ADM: split_size images each), averaged
    assert fid.inception_score(logits, split_size=2) == pytest.approx((math.exp(kl) + 1) / 2, rel=1e-12)


def test_precision_recall_hand_computed():
    real = np.array([0.0, 1, 2, 3, 10])[:, None]
    fake = np.array([0.5, 2.5, 6, 7, -20])[:, None]
    # k=1 squared radii: real 1, 1, 1, 1, 49; fake 4, 4, 1, 1, 420.25.
    # precision: -20 is in no real ball; recall: 10 is in no fake ball (9 > 1 from 7, 900 > 420.25 from -20)
    assert fid.precision_recall(real, fake, k=1) == (0.8, 0.8)
    # k=3: real radii 9, 4, 4, 9, 81 (own point is the 0-th neighbour); fake 6 is at exactly 9 from real 3: inside
    assert fid.precision_recall(real, fake, k=3) == (0.8, 1.0)
    # small batches give the same answer
    assert fid.precision_recall(real, fake, k=3, batch_size=2) == (0.8, 1.0)
    # a ball includes its boundary: -1 is exactly 1 = radius from real 0 and in no other ball (k=1);
    # -1.5 is outside; 5, 5.5 are inside real 10's ball (49). Fake radii are all 0.25: no real point is inside.
    edge = np.array([-1.0, -1.5, 5, 5.5])[:, None]
    assert fid.precision_recall(real, edge, k=1) == (0.75, 0.0)
    assert fid.precision_recall(edge, real, k=1) == (0.0, 0.75)  # roles swapped: recall side


def test_evaluate_combines_what_the_inputs_have():
    real, fake = np.array([0.0, 1, 2, 3, 10])[:, None], np.array([0.5, 2.5, 6, 7, -20])[:, None]
    ref = {"mu": np.zeros(1), "sigma": np.eye(1), "pool": real}
    sample = {"mu": np.ones(1), "sigma": 4 * np.eye(1), "mu_s": np.zeros(2), "sigma_s": np.eye(2), "pool": fake,
              "logits": np.array([[math.log(3), 0.0], [0.0, math.log(3)]])}
    metrics, why = fid.evaluate(sample, ref)
    assert metrics["fid"] == pytest.approx(1 + (2 - 1) ** 2) and metrics["sfid"] is None  # ref has no mu_s
    assert why == {"sfid": "both inputs need spatial statistics: images, or mu_s and sigma_s",
                   "class_accuracy": "the samples have no labels: arr_1, or a subfolder per class"}
    assert metrics["inception_score"] == pytest.approx(1.5 ** 0.75 * 0.5 ** 0.25, rel=1e-12)
    assert (metrics["precision"], metrics["recall"]) == (0.8, 1.0)  # k = 3, as test_precision_recall_hand_computed
    assert fid.evaluate({**sample, "pool": fake[:3]}, ref)[0]["precision"] is None  # 3 images: too few for k = 3


def test_pairwise_distances_fall_back_to_float32_on_overflow():
    u = torch.tensor([[300.0, 0.0], [1.0, 1.0]])
    v = torch.tensor([[0.0, 0.0]])
    d = fid.pairwise_sq_distances(u, v)  # 90000 overflows float16 (max 65504)
    assert d.dtype == torch.float32 and d[:, 0].tolist() == [90000.0, 2.0]
    # in range it is float16 arithmetic, as ADM: 100.03 rounds to 100 there, so the distance is 10000, not 10006
    w = torch.tensor([[100.03]])
    assert fid.pairwise_sq_distances(w, torch.zeros(1, 1)).item() == float(torch.tensor(100.03).half() ** 2)


# --- PSNR / SSIM --------------------------------------------------------------------------------------------

def test_psnr_hand_computed():
    a = np.zeros((2, 2, 2, 3), np.uint8)
    b = a.copy()
    b[0] = 5  # MSE 25
    got = fid.psnr(a, b)
    assert got[0] == pytest.approx(20 * math.log10(255 / 5), rel=1e-12) and got[1] == math.inf


def naive_ssim(a, b):
    a, b = (np.pad(x.astype(np.float64), ((5, 5), (5, 5), (0, 0)), mode="reflect") for x in (a, b))
    g = np.exp(-((np.arange(11) - 5) / 1.5) ** 2 / 2)
    w = np.outer(g, g) / g.sum() ** 2
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    h, wd = a.shape[0] - 10, a.shape[1] - 10
    total = 0.0
    for i in range(h):
        for j in range(wd):
            pa, pb = a[i:i + 11, j:j + 11], b[i:i + 11, j:j + 11]
            ma, mb = np.einsum("ij,ijc->c", w, pa), np.einsum("ij,ijc->c", w, pb)
            va = np.einsum("ij,ijc->c", w, pa * pa) - ma ** 2
            vb = np.einsum("ij,ijc->c", w, pb * pb) - mb ** 2
            cov = np.einsum("ij,ijc->c", w, pa * pb) - ma * mb
            total += (((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2))).sum()
    return total / (h * wd * 3)


def test_ssim_hand_computed():
    a, b = np.full((1, 12, 12, 3), 100, np.uint8), np.full((1, 12, 12, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2  # flat images: no variance, SSIM is the luminance term alone
    assert fid.ssim(a, b)[0] == pytest.approx((2 * 100 * 150 + c1) / (100 ** 2 + 150 ** 2 + c1), rel=1e-12)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (2, 14, 13, 3), dtype=np.uint8)
    y = np.clip(x.astype(int) + rng.integers(-40, 40, x.shape), 0, 255).astype(np.uint8)
    got = fid.ssim(x, y)
    np.testing.assert_allclose(got, [naive_ssim(x[i], y[i]) for i in range(2)], rtol=1e-10)
    np.testing.assert_allclose(fid.ssim(x, x), 1.0, rtol=1e-12)


# --- inputs, CLI and errors ---------------------------------------------------------------------------------

def fid_cli(*args):
    run_script("fid.py", [f"--inception_weights={WEIGHTS}", *args])


def needs_weights():
    if not os.path.exists(WEIGHTS):
        pytest.skip(f"Inception weights {WEIGHTS} not found")


def test_cli_stats_then_metrics_match_torch_fidelity(tmp_path, capsys):
    # reference: a folder of PNGs (golden images 0, 1) -> stats file; samples: an ADM .npz (images 2, 3)
    needs_weights()
    images = golden_images()
    folder = tmp_path / "ref"
    (folder / "class_a").mkdir(parents=True)
    for i in range(2):
        Image.fromarray(images[i]).save(folder / "class_a" / f"{i}.png")
    np.savez(tmp_path / "samples.npz", arr_0=images[2:])
    fid_cli(f"--samples={folder}", f"--save_stats={tmp_path / 'ref_stats.npz'}", "--batch_size=1")
    with np.load(tmp_path / "ref_stats.npz") as stats:
        assert sorted(stats.files) == ["mu", "mu_s", "pool", "sigma", "sigma_s"]  # one class folder: no labels
        assert stats["sigma"].shape == (2048, 2048) and stats["sigma_s"].shape == (2023, 2023)
        np.testing.assert_allclose(stats["pool"][:, :6], POOL_FIRST6[:2], atol=2e-6)
    fid_cli(f"--samples={tmp_path / 'samples.npz'}", f"--reference={tmp_path / 'ref_stats.npz'}",
            f"--out_json={tmp_path / 'metrics.json'}", "--batch_size=1")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["fid"] == pytest.approx(FID_01_VS_23, rel=1e-6)
    assert metrics["sfid"] == pytest.approx(SFID_01_VS_23, rel=1e-6)
    # no fc in the shared weights: no IS; 2 images are too few for 3 neighbours; unlabelled samples
    assert metrics["inception_score"] is None and metrics["precision"] is None and metrics["num_samples"] == 2
    assert metrics["not_computed"] == {
        "inception_score": "these Inception weights have no fc layer",
        "precision": "both inputs need the pool_3 features of more than 3 images",
        "recall": "both inputs need the pool_3 features of more than 3 images",
        "class_accuracy": "the samples have no labels: arr_1, or a subfolder per class"}
    out = capsys.readouterr().out
    assert "IS n/a" not in out and "inception_score n/a (these Inception weights have no fc layer)" in out
    assert "ref (rank 0 of 1): 1/2 images," in out and "images/s" in out and " left" in out  # progress, 1st batch


def test_cli_needs_samples_and_reference(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["fid.py", "--samples=x.npz"])
    expect_error(lambda: runpy.run_path(os.path.join(ROOT, "fid.py"), run_name="__main__"), "--reference")


def test_npz_images_are_streamed_in_slices(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (5, 4, 3, 3), dtype=np.uint8)
    np.savez(tmp_path / "s.npz", arr_0=x, arr_1=np.arange(5))
    source = fid.open_input(str(tmp_path / "s.npz"))
    assert source["n"] == 5 and source["stats"]["labels"].tolist() == [0, 1, 2, 3, 4]
    got = list(source["batches"](1, 5, 3))
    assert [len(b) for b in got] == [3, 1] and np.array_equal(np.concatenate(got), x[1:])


class PixelFeatures(torch.nn.Module):
    """A stand-in for the Inception network: the first 4 pixel values are the 'features'."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images):
        x = images.flatten(1)[:, :4].float()
        return x, x, None


def test_folders_read_every_format_and_crop_other_sizes(tmp_path, capsys):
    rng = np.random.default_rng(0)
    pixels = {name: rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
              for name, (w, h) in {"a.png": (16, 16), "b.webp": (16, 16), "c.bmp": (16, 16), "d.tif": (40, 24),
                                   "e.jpg": (20, 33), "f.ppm": (16, 16)}.items()}
    for name, array in pixels.items():
        Image.fromarray(array).save(tmp_path / name, **({"lossless": True} if name.endswith("webp") else {}))
    source = fid.open_input(str(tmp_path), size=16)
    assert source["n"] == 6 and "labels" not in source["stats"]  # no class subfolders: unlabelled
    got = np.concatenate(list(source["batches"](0, 6, 4)))
    for i, name in enumerate(sorted(pixels)):
        image = Image.open(tmp_path / name).convert("RGB")
        want = np.asarray(image if image.size == (16, 16) else adm_center_crop(image, 16))
        assert np.array_equal(got[i], want), name
    assert np.array_equal(got[0], pixels["a.png"]) and np.array_equal(got[2], pixels["c.bmp"])  # as they are
    assert source["cropped"] == 2
    features = fid.read_input(fid.open_input(str(tmp_path), size=16), PixelFeatures(), 0, 1, "cpu")
    np.testing.assert_array_equal(features["pool"], got.reshape(6, -1)[:, :4])
    out = capsys.readouterr().out
    assert out.count("were not 16x16") == 1 and f"2 of 6 images of {tmp_path} were not 16x16" in out


def test_sixteen_bit_pngs_read_as_their_eight_bit_copies(tmp_path):
    # before the shared reader, 16-bit greyscale PNGs were clipped to near-white: FID 327 against these copies
    needs_weights()
    gray = np.random.default_rng(0).integers(0, 256, (3, 64, 64)).astype(np.uint8)
    for i, g in enumerate(gray):
        (tmp_path / "16").mkdir(exist_ok=True), (tmp_path / "8").mkdir(exist_ok=True)
        Image.fromarray(g.astype(np.uint16) * 257).save(tmp_path / "16" / f"{i}.png")
        Image.fromarray(g).save(tmp_path / "8" / f"{i}.png")
    assert Image.open(tmp_path / "16" / "0.png").mode.startswith("I")  # really 16-bit on disk
    fid_cli(f"--samples={tmp_path / '16'}", f"--reference={tmp_path / '8'}", "--image_size=64",
            f"--out_json={tmp_path / 'm.json'}")
    assert abs(json.loads((tmp_path / "m.json").read_text())["fid"]) < 1e-3


def test_a_folder_of_odd_sized_photos_scores_against_an_adm_npz(tmp_path, capsys):
    """The reference recipe: photos of any size, ADM-center-cropped to image_size, against an ADM sample batch."""
    needs_weights()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(90, 64), (64, 130), (200, 150), (71, 64), (64, 64), (128, 96)]):
        (tmp_path / "photos" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / "photos" / f"class{i % 2}"
                                                                             / f"{i}.jpg")
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8),
             arr_1=np.arange(6) % 2)
    fid_cli(f"--samples={tmp_path / 'samples.npz'}", f"--reference={tmp_path / 'photos'}", "--image_size=64",
            f"--out_json={tmp_path / 'm.json'}")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 < metrics["fid"] < 1000 and metrics["num_reference"] == 6 and 0 <= metrics["class_accuracy"] <= 1
    assert f"5 of 6 images of {tmp_path / 'photos'} were not 64x64: ADM-center-cropped" in capsys.readouterr().out


def test_class_accuracy_hand_computed():
    # classes 0: {0, 0.5}, 1: {3, 3.5}, 2: {10}; k = 5: every sample has two votes for class 0 and two for class 1,
    # weighted 1.05, 1.04, ..., 1.01 from the nearest on. 1.6: 0.5 (1.1), 3 (1.4), 0 (1.6), 3.5 (1.9): class 0 by
    # 2.08 to 2.06; 1.9: 3 (1.1), 0.5 (1.4), 3.5 (1.6), 0 (1.9): class 1; 9.0: 10, 3.5, 3, 0.5, 0: class 1 by 2.07
    # to 2.03; 0.1: class 0. Plain counts with the first class on ties would say 0, 0, 0, 0.
    ref, labels = np.array([[0.0], [0.5], [3.0], [3.5], [10.0]]), np.array([0, 0, 1, 1, 2])
    samples = np.array([[1.6], [1.9], [9.0], [0.1]])
    assert fid.class_accuracy(ref, labels, samples, np.array([0, 1, 1, 0])) == 1.0
    assert fid.class_accuracy(ref, labels, samples, np.array([0, 1, 2, 0])) == 0.75
    assert fid.class_accuracy(ref, labels, samples, np.array([0, 1, 2, 0]), k=1) == 1.0  # 9.0 is nearest to 10
    assert fid.class_accuracy(ref, labels, samples, np.array([1, 0, 0, 1])) == 0.0


def test_evaluate_says_why_class_accuracy_is_missing():
    base = {"mu": np.zeros(1), "sigma": np.eye(1), "pool": np.arange(6.0)[:, None]}
    labelled = dict(base, labels=np.array([0, 0, 0, 1, 1, 1]))
    assert fid.evaluate(labelled, labelled)[0]["class_accuracy"] == 1.0
    for sample, ref, reason in [(base, labelled, "the samples have no labels"),
                                (labelled, base, "the reference has no labels"),
                                (labelled, dict(labelled, labels=np.zeros(6, int)), "some sample labels are no class"),
                                (labelled, dict(labelled, pool=labelled["pool"][:4], labels=labelled["labels"][:4]),
                                 "the reference has fewer than 5 images")]:
        metrics, why = fid.evaluate(sample, ref)
        assert metrics["class_accuracy"] is None and why["class_accuracy"].startswith(reason), why


def test_class_accuracy_of_labelled_images_and_of_shuffled_labels(tmp_path):
    """The reference: a labelled demo folder (4 classes of 6 images); the samples: the same images in an ADM .npz
    with their labels in arr_1. Their own image is among the 5 neighbours: ~100%; labels shuffled: chance (25%)."""
    needs_weights()
    import prepare
    folder = prepare.make_demo_dataset(str(tmp_path / "ref"), num_classes=4, images_per_class=6, size=64)
    fid_cli(f"--samples={folder}", f"--save_stats={tmp_path / 'ref.npz'}", "--image_size=64")
    files = fid.open_input(folder)["files"]
    labels = np.array([int(os.path.basename(os.path.dirname(f))[:2]) for f in files])  # classes 00_..., 03_...
    np.savez(tmp_path / "samples.npz", arr_0=np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]),
             arr_1=labels)
    fid_cli(f"--samples={tmp_path / 'samples.npz'}", f"--reference={tmp_path / 'ref.npz'}",
            f"--out_json={tmp_path / 'm.json'}")
    metrics = json.loads((tmp_path / "m.json").read_text())
    with np.load(tmp_path / "ref.npz") as ref:
        assert ref["labels"].tolist() == labels.tolist()  # the folder's classes, saved with the stats
        pool = ref["pool"]
    print(f"class accuracy of the labelled images themselves: {metrics['class_accuracy']:.3f}")
    assert metrics["class_accuracy"] >= 0.95 and abs(metrics["fid"]) < 1e-3
    shuffled = [fid.class_accuracy(pool, labels, pool, np.random.default_rng(seed).permutation(labels))
                for seed in range(20)]
    print(f"with shuffled labels: mean {np.mean(shuffled):.3f} over 20 shuffles")
    assert 0.1 < np.mean(shuffled) < 0.4


def expect_error(fn, *words):
    with pytest.raises(SystemExit) as e:
        fn()
    message = str(e.value.code)
    assert message.startswith("error:") and all(w in message for w in words), message


def test_errors_for_bad_images(tmp_path):
    model = torch.nn.Linear(1, 1)  # never reached: inputs are checked first
    expect_error(lambda: fid.inception_features(model, np.zeros((2, 8, 8, 3), np.float32)), "uint8")
    expect_error(lambda: fid.inception_features(model, np.zeros((2, 3, 8, 8), np.uint8)), "N x H x W x 3")
    expect_error(lambda: fid.psnr(np.zeros((1, 4, 4, 3), np.uint8), np.zeros((1, 4, 5, 3), np.uint8)), "differ")
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((3, 8, 8, 3), np.float32))
    expect_error(lambda: fid.open_input(str(tmp_path / "floats.npz")), "uint8", "float32")
    (tmp_path / "one").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one" / "a.png")
    expect_error(lambda: fid.read_input(str(tmp_path / "one"), model, 0, 1, "cpu"), "at least 2")


def test_errors_for_bad_statistics_and_inputs(tmp_path):
    expect_error(lambda: fid.feature_statistics(np.zeros((1, 5))), "at least 2")
    expect_error(lambda: fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4)), "dimensions")
    expect_error(lambda: fid.frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2)), "NaN")
    expect_error(lambda: fid.precision_recall(np.zeros((5, 3)), np.zeros((5, 4))), "dimensions")
    expect_error(lambda: fid.precision_recall(np.zeros((3, 2)), np.zeros((5, 2))), "k=3")
    np.savez(tmp_path / "bad.npz", sigma=np.eye(2))
    expect_error(lambda: fid.read_input(str(tmp_path / "bad.npz"), None, 0, 1, "cpu"), "mu and sigma")
    np.savez(tmp_path / "half.npz", mu=np.zeros(2), sigma=np.eye(2), mu_s=np.zeros(2))
    expect_error(lambda: fid.read_input(str(tmp_path / "half.npz"), None, 0, 1, "cpu"), "mu_s with sigma_s")
    np.savez(tmp_path / "other.npz", features=np.zeros((4, 2)))
    expect_error(lambda: fid.read_input(str(tmp_path / "other.npz"), None, 0, 1, "cpu"), "neither", "features")
    expect_error(lambda: fid.read_input(str(tmp_path / "missing.npz"), None, 0, 1, "cpu"), "does not exist")
    (tmp_path / "image.png").write_bytes(b"")
    expect_error(lambda: fid.read_input(str(tmp_path / "image.png"), None, 0, 1, "cpu"), "neither a folder")
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    stats = fid.read_input(str(tmp_path / "stats.npz"), None, 0, 1, "cpu")
    assert sorted(stats) == ["mu", "sigma"]


def test_errors_for_missing_or_wrong_weights(tmp_path, monkeypatch):
    expect_error(lambda: fid.load_inception(str(tmp_path / "nope.pth")), "do not exist", fid.inception_url)

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    expect_error(lambda: fid.load_inception(None), "--inception_weights", fid.inception_url)
    (tmp_path / "text.pth").write_text("not a checkpoint")
    expect_error(lambda: fid.load_inception(str(tmp_path / "text.pth")), "not a readable checkpoint")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    expect_error(lambda: fid.load_inception(str(tmp_path / "wrong.pth")), "not an FID Inception")


# --- reconstruction metrics of a tokenizer ------------------------------------------------------------------

def test_reconstruction_metrics_match_a_direct_computation(tmp_path, monkeypatch):
    """5 images of assorted sizes through a tiny random VA-VAE: the CLI's PSNR, SSIM and LPIPS equal the same steps
    done by hand (torchvision resize + center crop, posterior sample with noise seeded by image index); an identity
    "autoencoder" gives rFID ~0, PSNR inf, SSIM 1, LPIPS 0."""
    if not os.path.exists(WEIGHTS):
        pytest.skip(f"Inception weights {WEIGHTS} not found")
    import vavae  # before torchvision: its fix lets torchvision import next to a CPU-only torch
    import torchvision.transforms.functional as TF
    rng = np.random.default_rng(0)
    folder = tmp_path / "val" / "class_a"
    folder.mkdir(parents=True)
    for i, (w, h) in enumerate([(40, 32), (32, 48), (37, 37), (64, 40), (32, 32)]):
        yy, xx = np.mgrid[0:h, 0:w] / 6.0
        pixels = np.stack([np.sin(xx + i), np.cos(yy), np.sin(xx * yy / 9)], -1) * 90 + rng.normal(128, 8, (h, w, 3))
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    ae = vavae.AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=())  # f2
    torch.save({"autoencoder": ae.state_dict(), "autoencoder_kwargs": ae.kwargs}, tmp_path / "ae.pt")
    lpips = vavae.LPIPS("random").eval()
    torch.save(lpips.state_dict(), tmp_path / "lpips.pth")  # heads and backbone: nothing to download

    def cli(out_json, *args):
        monkeypatch.setattr(sys, "argv", ["fid.py", f"--inception_weights={WEIGHTS}", f"--samples={tmp_path / 'val'}",
                                          "--image_size=32", "--seed=3", f"--out_json={out_json}", *args])
        runpy.run_path(os.path.join(ROOT, "fid.py"), run_name="__main__")
        return json.loads(out_json.read_text())

    metrics = cli(tmp_path / "ae.json", f"--reconstruct_with={tmp_path / 'ae.pt'}",
                  f"--lpips_weights={tmp_path / 'lpips.pth'}")
    x = torch.stack([TF.center_crop(TF.resize(TF.to_tensor(Image.open(folder / f"{i}.png")), 32), 32)
                     for i in range(5)]) * 2 - 1
    with torch.no_grad():
        posterior = ae.encode(x)
        noise = torch.stack([torch.randn(32, 16, 16, generator=torch.Generator().manual_seed(3 + i)) for i in range(5)])
        recon = ae.decode(posterior.mean + posterior.std * noise)
        want_lpips = lpips(recon, x).mean().item()
    a, b = vavae.images_to_uint8(x).numpy(), vavae.images_to_uint8(recon).numpy()
    mse = ((a.astype(np.float64) - b) ** 2).reshape(5, -1).mean(1)
    assert metrics["psnr"] == pytest.approx(np.mean(20 * np.log10(255 / np.sqrt(mse))), rel=1e-9)
    assert metrics["ssim"] == pytest.approx(fid.ssim(a, b).mean(), rel=1e-9)
    assert metrics["lpips"] == pytest.approx(want_lpips, rel=1e-5)
    assert 0 < metrics["ssim"] < 0.5 and metrics["rfid"] > 10  # an untrained autoencoder reconstructs nothing
    assert metrics["num_images"] == 5 and metrics["reconstruct_with"] == str(tmp_path / "ae.pt")
    grid = np.asarray(Image.open(tmp_path / "ae.reconstructions.png"))  # next to ae.json: crops over reconstructions
    assert np.array_equal(grid, np.concatenate([np.concatenate(list(images), 1) for images in (a, b)]))

    class Identity(torch.nn.Module):
        def encode(self, x):
            return types.SimpleNamespace(mean=x, std=torch.zeros_like(x))  # the posterior sample is x itself

        def decode(self, z):
            return z
    monkeypatch.setattr(vavae, "load_autoencoder", lambda *args: Identity())
    metrics = cli(tmp_path / "identity.json", f"--reconstruct_with={tmp_path / 'ae.pt'}",
                  f"--lpips_weights={tmp_path / 'lpips.pth'}", "--batch_size=2")
    assert abs(metrics["rfid"]) < 1e-3 and metrics["psnr"] == math.inf  # round-off of rank-4 covariances in 2048-d
    assert metrics["ssim"] == pytest.approx(1.0, abs=1e-12) and metrics["lpips"] == 0.0
    grid = np.asarray(Image.open(tmp_path / "identity.reconstructions.png"))
    assert grid.shape == (64, 5 * 32, 3) and np.array_equal(grid[:32], grid[32:])
    assert np.array_equal(grid[:32, :32], a[0])


# -----------------------------------------------------------------------------
# bad inputs: one clear error line, out_dir untouched (fixtures and helpers in test_bad_inputs.py)

@pytest.fixture(scope="module")
def fid_files(files):
    """An untrained FID Inception weights file (same shapes as the real one, no download), ADM .npz files (good and
    broken), stats files (good and broken)."""
    torch.save(fid.FIDInception(with_fc=False).state_dict(), files / "inception.pth")
    images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    np.savez(files / "samples.npz", arr_0=images)
    (files / "samples_truncated.npz").write_bytes((files / "samples.npz").read_bytes()[:400])
    (files / "zero_bytes.npz").write_bytes(b"")
    np.savez(files / "floats.npz", arr_0=images.astype(np.float32))
    np.savez(files / "fortran.npz", arr_0=np.asfortranarray(images))
    for name, labels in [("labels_short", np.arange(3)), ("labels_float", np.zeros(4)),
                         ("labels_neg", -np.ones(4, int))]:
        np.savez(files / f"{name}.npz", arr_0=images, arr_1=labels)
    np.savez(files / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(files / "stats_nan.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    np.savez(files / "stats_8.npz", mu=np.zeros(8), sigma=np.eye(8))  # not Inception's width
    np.savez(files / "stats_int.npz", mu=np.zeros(2048, int), sigma=np.eye(2048))
    np.savez(files / "sigma_only.npz", sigma=np.eye(4))
    np.savez(files / "half.npz", mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023))
    (files / "folder.npz").mkdir()
    (files / "one" / "x").mkdir(parents=True)
    write_png(files / "one" / "x" / "a.png", 0)
    return files


NET = "--inception_weights={f}/inception.pth"  # the cases that get as far as the network; the others keep the base
RECON = ["--reference=", "--samples={f}/images"]
IMAGES = "--samples={f}/samples.npz"  # samples that need the network: a bad reference must stop it loading


@pytest.mark.parametrize("args, pattern", [
    # settings and their rules
    (["--no_such_option=1"], "unknown option --no_such_option"),
    (["--batch_size=big"], "--batch_size='big' is not a valid int"),
    (["--batch_size=0"], "--batch_size=0 is not allowed: it must be >= 1"),
    (["--batch_size=-5"], "--batch_size=-5 is not allowed: it must be >= 1"),
    (["--image_size=0"], "--image_size=0 is not allowed: it must be >= 1"),
    (["--seed=-1"], "--seed=-1 is not allowed: it must be >= 0"),
    (["--timeout_minutes=0"], "--timeout_minutes=0 is not allowed: it must be > 0"),
    (["--allow_unsafe_checkpoint=1"], "--allow_unsafe_checkpoint expects bool"),
    # what to do: options that contradict or do nothing
    (["--reference="], "pass --samples=PATH and --reference=PATH"),
    (["--save_stats={f}/new.npz"], "--save_stats writes the statistics of --samples .* ignore --reference"),
    (["--save_stats={f}/new.txt", "--reference="], "--save_stats=.*new.txt must end in .npz"),
    (["--lpips_weights={f}/vavae.pt"], "--lpips_weights is used only with --reconstruct_with"),
    (["--reconstruct_with={f}/vavae.pt", "--samples={f}/images"], "--reconstruct_with compares .* drop --reference"),
    # outputs: checked first, written atomically
    (["--save_stats={f}/no_folder/s.npz", "--reference="], "could not write .*s.npz: its folder does not exist"),
    (["--out_json={f}/vavae.pt/metrics.json"], "could not write .*metrics.json: its folder does not exist"),
    (["--save_stats={f}/folder.npz", "--reference="], r"could not write .*folder.npz \(Is a directory"),
    # inputs: existence, kind, enough images, .npz headers, stats keys, shapes and values
    (["--samples={f}/nope"], "input .*nope' does not exist"),
    ([IMAGES, "--reference={f}/nope.npz"], "input .*nope.npz' does not exist"),
    (["--samples={f}/images", "--reference={f}/samples_truncated.npz"], "samples_truncated.npz is not a readable"),
    (["--samples={f}/vavae.pt"], "neither a folder of images nor an .npz file"),
    (["--samples={f}/empty"], "empty holds 0 images .*FID needs at least 2"),
    (["--samples={f}/one"], "one holds 1 images .*FID needs at least 2"),
    ([NET, "--samples={f}/mixed"], "c.png is not a readable image .*replace it"),
    (["--samples={f}/samples_truncated.npz"], "samples_truncated.npz is not a readable .npz .*write it again"),
    (["--samples={f}/zero_bytes.npz"], "zero_bytes.npz is not a readable .npz .*write it again"),
    (["--samples={f}/floats.npz"], "arr_0 must be uint8 N x H x W x 3 .*got float32"),
    (["--samples={f}/fortran.npz"], "arr_0 is stored in Fortran order"),
    (["--samples={f}/labels_short.npz"], r"arr_1 is int64 \(3,\), it must be integers >= 0 of shape \(4,\)"),
    (["--samples={f}/labels_float.npz"], r"arr_1 is float64 \(4,\), it must be integers >= 0"),
    (["--samples={f}/labels_neg.npz"], r"arr_1 is int64 \(4,\), it must be integers >= 0"),
    ([IMAGES, "--reference={f}/stats_nan.npz"], r"stats_nan.npz: mu is float64 \(2048,\), it must be finite floats"),
    ([IMAGES, "--reference={f}/stats_8.npz"], r"stats_8.npz: mu is float64 \(8,\), it must be .* shape \(2048,\)"),
    ([IMAGES, "--reference={f}/stats_int.npz"], r"stats_int.npz: mu is int64 \(2048,\), it must be finite floats"),
    ([IMAGES, "--reference={f}/sigma_only.npz"], "needs mu and sigma"),
    ([IMAGES, "--reference={f}/half.npz"], "needs mu and sigma .*mu_s with sigma_s"),
    # Inception weights: only loaded once every input passed
    (["--samples={f}/samples.npz"], "truncated.pt is not a readable checkpoint"),
    (["--samples={f}/samples.npz", "--inception_weights={f}/nope.pth"], "Inception weights .*nope.pth do not exist"),
    (["--samples={f}/samples.npz", "--inception_weights={f}/vavae.pt"], "vavae.pt is not an FID Inception-v3 state"),
    (["--samples={f}/samples.npz", "--inception_weights={f}/tensor.pt"], "tensor.pt is not an FID Inception-v3 st"),
    (["--samples={f}/samples.npz", "--inception_weights={f}/pickled.pt"], "pickled.pt holds pickled Python objects"),
    # a tokenizer's reconstructions: its files are loaded before the network
    ([*RECON, "--reconstruct_with={f}/nope.pt"], "checkpoint .*nope.pt does not exist"),
    ([*RECON, "--reconstruct_with={f}/dit.pt"], "dit.pt has no autoencoder weights"),
    ([*RECON, "--reconstruct_with={f}/vavae.pt", "--samples={f}/samples.npz"],
     "--reconstruct_with needs --samples to be a folder of images"),
    ([*RECON, "--reconstruct_with={f}/vavae.pt", "--lpips_weights={f}/nope.pth"], "LPIPS weights .* not exist"),
    ([*RECON, "--reconstruct_with={f}/vavae.pt"], "truncated.pt is not a readable checkpoint"),
    ([*RECON, NET, "--reconstruct_with={f}/vavae.pt", "--samples={f}/corrupt"], r"0.png is not a readable image"),
])
def test_fid(fid_files, tmp_path, args, pattern):
    """Every input is checked before the Inception network loads: the base weights are a broken file, so a case
    that loaded them too early would stop with another message."""
    out = fresh_out_dir(tmp_path)
    (out / "metrics.json").write_text("{}")
    args = [a.format(f=fid_files, out=out) for a in args]
    base = [f"--inception_weights={fid_files}/truncated.pt", f"--samples={fid_files}/stats.npz",
            f"--reference={fid_files}/stats.npz", f"--out_json={out}/metrics.json", "--image_size=64"]
    expect_clear_error(lambda: run_script("fid.py", [*base, *args]), out, pattern)
