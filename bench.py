"""Time the hot loops on random weights and synthetic data: a LightningDiT training step, a guided sampling step,
VA-VAE encode / decode / training step and the FID Inception network. Speed does not depend on the weights' values.

    python bench.py                                     # XL/1, batch 64; on a GPU: bf16 autocast, compiled
    python bench.py --batch_size=128 --parts=train
    TORCHDYNAMO_DISABLE=1 python bench.py --parts= --official_repo=.official ...   # side by side (on a CPU)

Each line gives milliseconds per call (median of `iters` after `warmup` calls, the device synchronised around each),
images/s, MFU against the device's dense bf16 peak where known, and peak memory. BENCHMARKS.md holds the results.
--official_repo: a folder holding the release's models/ (github.com/hustvl/LightningDiT at commit 2725fed, exported
as BENCHMARKS.md shows; never part of this project); its LightningDiT gets our weights (strict load: the key names are
the same) and the same batch, and both are timed forward + backward, interleaved. The release decorates its forward
methods with @torch.compile, so on a CPU run it with TORCHDYNAMO_DISABLE=1 and compare against our eager model.
"""
import importlib.util
import os
import resource
import statistics
import sys
import time
import types
from contextlib import nullcontext

import torch
from torch.utils.flop_counter import FlopCounterMode

from config.runtime import compile_and_autocast, configure, fail
from dit import create_dit, dit_args_from_state_dict, guided_velocity, rectified_flow_loss, sample_timesteps, time_grid

# what to time
parts = "train,sample,vavae,inception"  # text; comma-separated subset (empty: only the --official_repo comparison)
warmup = 3  # >= 0; untimed calls first (compilation, allocator, cudnn autotuning)
iters = 10  # >= 1; timed calls; the median is reported
# LightningDiT (train_dit.py's defaults)
model_name = "LightningDiT-XL/1"  # text; B, L, XL, 1p0B, 1p6B; /1 or /2 is the patch size
depth = 0  # >= 0; non-zero depth, hidden_size, num_heads override the size's own
hidden_size = 0  # >= 0
num_heads = 0  # >= 0
latent_size = 16  # >= 1; latents are latent_channels x latent_size x latent_size
latent_channels = 32  # >= 1
batch_size = 64  # >= 1; images per training step and per sampling call
ema_decay = 0.9999  # [0, 1)
# sampling (config/sample_800ep.py): one timed call, scaled to a whole run with its step counts
cfg_scale = 6.7  # >= 0
num_steps = 250  # >= 2; time points; Euler makes num_steps - 1 model calls
timestep_shift = 0.3  # > 0
cfg_interval_start = 0.125  # [0, 1]; guidance only where t >= this
# VA-VAE (train_vavae.py's defaults; foundation model and LPIPS untrained: same speed, nothing to download)
vae_ch = 128  # >= 32; a multiple of 32 (GroupNorm's groups)
image_size = 256  # >= 16; a multiple of 16
vae_batch_size = 16  # >= 1
vf_model = "vit_large_patch14_dinov2.lvd142m"  # text; timm name of the foundation model
vf_image_size = 224  # >= 1
# FID Inception
inception_weights = ""  # path; a local .pth (fid.py's formats); empty: untrained network of the same shape
inception_batch_size = 100  # >= 1
# system
official_repo = ""  # path; a folder holding the release's models/ (see the docstring); empty: no comparison
compile = None  # True | False | None; torch.compile as train_dit.py / train_vavae.py do; None: on CUDA only
bf16 = None  # True | False | None; bf16 autocast; None: on CUDA only
peak_flops = 0.0  # >= 0; per-device peak FLOP/s for MFU; 0: look the GPU up in PEAK_BF16_FLOPS
seed = 0  # >= 0
config = configure(globals())

# dense bf16 peaks; the same table as train_dit.py (a script, so not importable)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "4090": 165e12}
PARTS = ("train", "sample", "vavae", "inception")


def throughput(flops_per_image, seconds, images, peak):
    """(images/s, model FLOP utilisation or None) of `images` processed in `seconds` at `flops_per_image` each."""
    images_per_second = images / seconds
    return images_per_second, (flops_per_image * images_per_second / peak if peak and flops_per_image else None)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def elapsed(fn):
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def timed(fn):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # peak memory of this part alone (with what stays resident)
    for _ in range(warmup):
        fn()
    return statistics.median(elapsed(fn) for _ in range(iters))


def count_flops(fn):
    """Matmul / conv / attention FLOPs of one eager call, as torch's FlopCounterMode counts them."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_memory():
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB max RSS of the process"


def report(name, seconds, images, flops_per_image):
    images_per_second, mfu = throughput(flops_per_image, seconds, images, peak_flops)
    print(f"{name:<26} {seconds * 1e3:10.2f} ms {images_per_second:10.1f} images/s   MFU "
          f"{'n/a' if mfu is None else f'{mfu:.1%}'}   peak memory {peak_memory()}", flush=True)


def optional(module_name):
    """A project module another stage may not have yet; None (and a line saying so) when it is absent."""
    try:
        return importlib.import_module(module_name)
    except ImportError as e:
        print(f"{module_name}: skipped ({e})")
        return None


def load_official(repo):
    """The release's LightningDiT class from `repo`/models (its file imports timm, einops and fairscale)."""
    import vavae  # noqa: F401 -- its torchvision fix lets the release's `import timm` work next to a CPU torch
    if importlib.util.find_spec("fairscale") is None:  # rmsnorm.py imports model-parallel layers it never uses
        for name in ("fairscale", "fairscale.nn", "fairscale.nn.model_parallel",
                     "fairscale.nn.model_parallel.initialize", "fairscale.nn.model_parallel.layers"):
            sys.modules[name] = types.ModuleType(name)
        layers = sys.modules["fairscale.nn.model_parallel.layers"]
        layers.ColumnParallelLinear = layers.ParallelEmbedding = layers.RowParallelLinear = None
    sys.path.insert(0, os.path.abspath(repo))
    from models.lightningdit import LightningDiT
    return LightningDiT


# ----------------------------------------------------------------------------------------------------------------------
# setup

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
use_compile, autocast = compile_and_autocast(device, compile, bf16)
if device.type == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the scripts run
    name = torch.cuda.get_device_name(device)
    peak_flops = peak_flops or next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), 0.0)
else:
    models = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")] \
        if os.path.exists("/proc/cpuinfo") else []
    name = f"{models[0] if models else 'CPU'}, {torch.get_num_threads()} threads"
selected = [part for part in parts.split(",") if part]  # --parts= (nothing) with --official_repo: only that
if not set(selected) <= set(PARTS):
    fail(f"--parts={parts} names unknown parts; choose from {','.join(PARTS)}")
if official_repo and not os.path.isfile(os.path.join(official_repo, "models", "lightningdit.py")):  # before any timing
    fail(f"--official_repo={official_repo} is not a checkout of hustvl/LightningDiT (no models/lightningdit.py); "
         "export the release's models/ folder into it as BENCHMARKS.md shows")
if "vavae" in selected and (vae_ch % 32 or image_size % 16):
    fail(f"--vae_ch ({vae_ch}) must be a multiple of 32 (GroupNorm has 32 groups) and --image_size ({image_size}) "
         "a multiple of 16")
peak = f"peak {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else "peak unknown (no MFU)"
print(f"device: {name}; torch {torch.__version__}; bf16 autocast {not isinstance(autocast, nullcontext)}; "
      f"compile {use_compile}; {peak}")
print("config:", config)
torch.manual_seed(seed)

# ----------------------------------------------------------------------------------------------------------------------
# LightningDiT: a training step as train_dit.py takes it, and one guided velocity as the sampler calls it

dit_args = dict(depth=depth, hidden_size=hidden_size, num_heads=num_heads, input_size=latent_size,
                in_channels=latent_channels)
if "train" in selected or "sample" in selected or official_repo:
    raw_model = create_dit(model_name, **dit_args).to(device)
    ema = create_dit(model_name, **dit_args).to(device).eval().requires_grad_(False)
    model = torch.compile(raw_model) if use_compile else raw_model
    flops = raw_model.forward_flops()
    x1 = torch.randn(batch_size, latent_channels, latent_size, latent_size, device=device)
    y = torch.randint(0, raw_model.num_classes, (batch_size,), device=device)
    print(f"{model_name} (depth {raw_model.depth}, width {raw_model.hidden_size}): "
          f"{sum(p.numel() for p in raw_model.parameters()):,} parameters, {flops / 1e9:.2f} GFLOP per forward")

if "train" in selected:
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")

    def train_step():
        t = sample_timesteps(batch_size, device)
        with autocast:
            mse, cos = rectified_flow_loss(model, x1, y, t, torch.randn_like(x1))
            loss = mse.mean() + cos.mean()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(raw_model.parameters()), 1 - ema_decay)
        optimizer.zero_grad(set_to_none=True)

    report(f"dit train step (B={batch_size})", timed(train_step), batch_size, 3 * flops)

if "sample" in selected:
    t = torch.full((batch_size,), 0.5, device=device)
    seconds = {}
    for scale in (cfg_scale, 1.0):  # guidance runs a batch of 2B; scale 1 (outside the interval) runs B
        with torch.no_grad(), autocast:
            seconds[scale] = timed(lambda: guided_velocity(ema, x1, t, y, scale))
        report(f"dit sample step cfg={scale}", seconds[scale], batch_size, (2 if scale != 1.0 else 1) * flops)
    calls = num_steps - 1  # Euler never calls the model at t = 1
    guided = sum(s >= cfg_interval_start for s in time_grid(num_steps, timestep_shift).tolist()[:-1])
    skipping = guided * seconds[cfg_scale] + (calls - guided) * seconds[1.0]
    for label, run in (("skipping the unconditional half", skipping),
                       ("guiding every step", calls * seconds[cfg_scale])):
        print(f"{num_steps}-step Euler, {label} ({guided} of {calls} calls guided): {run:.2f} s per batch, "
              f"{batch_size / run:.2f} images/s", flush=True)

if official_repo:
    Official = load_official(official_repo)
    ours = create_dit(model_name, **dit_args).to(device).eval()
    with torch.no_grad():  # DiT's zero init makes the output 0: move every weight off it so the outputs mean something
        for p in ours.parameters():
            p.add_(0.02 * torch.randn_like(p))
    theirs = Official(**dit_args_from_state_dict(ours.state_dict())).to(device).eval()  # eval: no label dropout
    theirs.load_state_dict(ours.state_dict(), strict=True)
    t = torch.rand(batch_size, device=device)
    with torch.no_grad(), autocast:
        output = ours(x1, t, y).float()
        difference = (output - theirs(x1, t, y).float()).abs().max().item()
    ours_run = torch.compile(ours) if use_compile else ours  # theirs compiles through its own decorators

    def forward_backward(net):
        with autocast:
            loss = net(x1, t, y).float().square().mean()
        loss.backward()
        net.zero_grad(set_to_none=True)

    for _ in range(warmup):
        forward_backward(ours_run)
        forward_backward(theirs)
    times = [(elapsed(lambda: forward_backward(ours_run)), elapsed(lambda: forward_backward(theirs)))
             for _ in range(iters)]  # interleaved, so that drifting machine load hits both alike
    ours_ms, theirs_ms = (statistics.median(column) * 1e3 for column in zip(*times))
    print(f"forward+backward (B={batch_size}), median of {iters}: ours {ours_ms:.1f} ms, official {theirs_ms:.1f} ms, "
          f"official / ours = {theirs_ms / ours_ms:.2f}; max |output difference| {difference:.2e} "
          f"(max |output| {output.abs().max().item():.2f})", flush=True)

# ----------------------------------------------------------------------------------------------------------------------
# VA-VAE: encode, decode, and a training step as train_vavae.py takes it once the GAN is on

if "vavae" in selected and (vavae := optional("vavae")):
    vae = vavae.AutoencoderKL(ch=vae_ch).to(device)
    discriminator = vavae.NLayerDiscriminator().to(device)
    lpips = vavae.LPIPS("random").to(device).train()  # train mode (dropout on) as train_vavae.py runs it
    foundation = vavae.FoundationModel(vf_model, "random", vf_image_size).to(device)
    if foundation.grid != image_size // vae.downsample_factor:
        fail(f"{vf_model} at --vf_image_size={vf_image_size} gives a {foundation.grid}x{foundation.grid} token grid "
             f"but --image_size={image_size} gives {image_size // vae.downsample_factor}x"
             f"{image_size // vae.downsample_factor} latents; set --vf_image_size to match")
    vf_loss = vavae.VFLoss(vae.embed_dim, foundation.feature_dim).to(device)
    optimizer_ae = torch.optim.Adam(list(vae.parameters()) + list(vf_loss.parameters()), lr=1e-4, betas=(0.5, 0.9))
    optimizer_disc = torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))
    images = torch.rand(vae_batch_size, 3, image_size, image_size, device=device) * 2 - 1
    decoder_last, encoder_last = vae.decoder.conv_out.weight, vae.encoder.conv_out.weight

    def vae_train_step():  # train_vavae.py's loss weights: KL 1e-6, GAN 0.5, VF 0.1 (times the adaptive weights)
        with autocast:
            posterior = vae.encode(images)
            z = posterior.sample()
            recon = vae.decode(z)
            nll = ((images - recon).abs() + lpips(images, recon)).sum() / vae_batch_size
            kl = posterior.kl().sum() / vae_batch_size
            discriminator.requires_grad_(False)
            g_loss = -discriminator(recon).mean()
            discriminator.requires_grad_(True)
            vf = vf_loss(z, foundation(images))
        nll_grad_dec, nll_grad_enc = torch.autograd.grad(nll, [decoder_last, encoder_last], retain_graph=True)
        d_weight = vavae.adaptive_weight(nll_grad_dec, g_loss, decoder_last, 1e4) * 0.5
        w_vf = vavae.adaptive_weight(nll_grad_enc, vf, encoder_last, 1e8) * 0.1
        (nll + 1e-6 * kl + d_weight * g_loss + w_vf * vf).backward()
        with autocast:
            d_loss = vavae.hinge_d_loss(discriminator(images), discriminator(recon.detach()))
        d_loss.backward()
        optimizer_ae.step()
        optimizer_disc.step()
        optimizer_ae.zero_grad(set_to_none=False)
        optimizer_disc.zero_grad(set_to_none=False)

    def encode():
        return vae.encode(images).sample()

    z = encode().detach()
    with torch.no_grad():
        flops_encode, flops_decode = count_flops(encode), count_flops(lambda: vae.decode(z))
    flops_train = count_flops(vae_train_step)  # counted eagerly, before compiling
    if use_compile:  # in place, as train_vavae.py
        for module in (vae.encoder, vae.decoder, discriminator, lpips, foundation):
            module.compile()
    print(f"VA-VAE (ch={vae_ch}, {image_size} px): {sum(p.numel() for p in vae.parameters()):,} parameters; "
          f"foundation model {vf_model} at {vf_image_size} px")
    with torch.no_grad(), autocast:
        report(f"vavae encode (B={vae_batch_size})", timed(encode), vae_batch_size, flops_encode / vae_batch_size)
        report(f"vavae decode (B={vae_batch_size})", timed(lambda: vae.decode(z)), vae_batch_size,
               flops_decode / vae_batch_size)
    report(f"vavae train step (B={vae_batch_size})", timed(vae_train_step), vae_batch_size,
           flops_train / vae_batch_size)

# ----------------------------------------------------------------------------------------------------------------------
# FID Inception: features of uint8 images through fid.py's own entry point (batches, copy back to the host)

if "inception" in selected and (fid := optional("fid")):
    inception = fid.load_inception(inception_weights, device) if inception_weights else \
        fid.FIDInception(with_fc=True).eval().requires_grad_(False).to(device)
    pixels = torch.randint(0, 256, (inception_batch_size, image_size, image_size, 3), dtype=torch.uint8, device=device)
    with torch.no_grad():
        flops_inception = count_flops(lambda: inception(pixels))
    report(f"inception features (B={inception_batch_size})",
           timed(lambda: fid.inception_features(inception, pixels, batch_size=inception_batch_size)),
           inception_batch_size, flops_inception / inception_batch_size)
