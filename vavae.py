"""VA-VAE: the LDM f16 KL autoencoder aligned to a vision foundation model, and the losses that train it.

Paper: "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models" (Yao et al., CVPR 2025).
The autoencoder is the LDM / VQGAN-KL one, unchanged: images (B,3,256,256) in [-1,1] <-> latents (B,32,16,16).
What VA-VAE adds is a training loss, the VF loss (section 3.2): the latent, projected to the foundation model's
width, must have the same patch-to-patch similarity structure as DINOv2's features (marginal distance-matrix
similarity) and point the same way at every patch (marginal cosine similarity), each with a margin that leaves
room for reconstruction.

This file holds the models and losses; train_vavae.py is the training loop. Module and parameter names follow the
released checkpoints (vavae-imagenet256-f16d32-dinov2.pt, taming-transformers LPIPS and PatchGAN), so their
weights load as they are.
"""
import os
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import torchvision  # noqa: F401
except RuntimeError as e:  # CUDA torchvision wheel next to CPU torch: declare its two missing op schemas
    if "torchvision::nms" not in str(e):
        raise
    _lib = torch.library.Library("torchvision", "FRAGMENT")
    for _op in ("nms", "qnms"):
        _lib.define(_op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401
import timm

from config.runtime import explain, load_checkpoint

AUTOENCODER_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


# ----------------------------------------------------------------------------------------------------------------------
# autoencoder (LDM AutoencoderKL, as released)

def group_norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 shortcut when the width changes."""

    def __init__(self, in_channels, out_channels, dropout):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1 convs for q, k, v and the output."""

    def __init__(self, channels):
        super().__init__()
        self.norm = group_norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (layer(y).reshape(b, 1, c, h * w).transpose(2, 3) for layer in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(c)) v
        return x + self.proj_out(y.transpose(2, 3).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM pads right/bottom only


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def resolution_level(blocks, attentions):
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attentions)
    return level


class Encoder(nn.Module):
    """Image -> 2*z_channels moments at 1/2^(levels-1) resolution; attention where the side is in attn_resolutions."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution, in_channels, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        width, side = ch, resolution
        for i, mult in enumerate(ch_mult):
            blocks, attentions = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(width, ch * mult, dropout))
                width = ch * mult
                if side in attn_resolutions:
                    attentions.append(AttnBlock(width))
            level = resolution_level(blocks, attentions)
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(width)
                side //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
            ResnetBlock(width, width, dropout), AttnBlock(width), ResnetBlock(width, width, dropout))
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """z_channels latent -> image; the mirror of Encoder with one more resnet block per level."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, dropout, resolution, out_ch, z_channels):
        super().__init__()
        width, side = ch * ch_mult[-1], resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1, self.mid.attn_1, self.mid.block_2 = (
            ResnetBlock(width, width, dropout), AttnBlock(width), ResnetBlock(width, width, dropout))
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            blocks, attentions = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(width, ch * ch_mult[i], dropout))
                width = ch * ch_mult[i]
                if side in attn_resolutions:
                    attentions.append(AttnBlock(width))
            level = resolution_level(blocks, attentions)
            if i != 0:
                level.upsample = Upsample(width)
                side *= 2
            self.up.insert(0, level)  # up[0] is the full-resolution level, as in the checkpoints
        self.norm_out = group_norm(width)
        self.conv_out = nn.Conv2d(width, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)), logvar clamped to [-30, 20] as released."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) per sample, summed over channels and positions."""
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class AutoencoderKL(nn.Module):
    """LDM f16 KL autoencoder; the defaults are the released VA-VAE f16d32 (69,836,067 parameters)."""

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,), z_channels=32,
                 embed_dim=32, resolution=256, in_channels=3, out_ch=3, dropout=0.0):
        super().__init__()
        self.kwargs = dict(ch=ch, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks,
                           attn_resolutions=tuple(attn_resolutions), z_channels=z_channels, embed_dim=embed_dim,
                           resolution=resolution, in_channels=in_channels, out_ch=out_ch, dropout=dropout)
        shared = dict(ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn_resolutions,
                      dropout=dropout, resolution=resolution, z_channels=z_channels)
        self.encoder = Encoder(in_channels=in_channels, **shared)
        self.decoder = Decoder(out_ch=out_ch, **shared)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        self.downsample_factor = 2 ** (len(ch_mult) - 1)

    def encode(self, x):
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))


def load_autoencoder(path, allow_unsafe=False):
    """An AutoencoderKL in eval mode on the CPU, from any of:

    - a train_vavae.py checkpoint ('autoencoder' + 'autoencoder_kwargs'; its EMA weights when it has them),
    - the released vavae-imagenet256-f16d32-dinov2.pt (a 'state_dict' that also holds loss.* and foundation_model.*),
    - a bare state dict. Without stored kwargs the default architecture is used, with `ch` read from the weights."""
    checkpoint = load_checkpoint(path, allow_unsafe)
    if not isinstance(checkpoint, dict):
        raise SystemExit(f"error: {path} holds a {type(checkpoint).__name__}, not a state dict or checkpoint dict")
    kwargs = checkpoint.get("autoencoder_kwargs", {})
    state = checkpoint.get("autoencoder_ema") or checkpoint.get("autoencoder") or checkpoint.get("state_dict")
    state = state or checkpoint
    state = {k: v for k, v in state.items() if k.startswith(AUTOENCODER_PREFIXES)}
    if "encoder.conv_in.weight" not in state:
        raise SystemExit(f"error: {path} has no autoencoder weights (no encoder.conv_in.weight); expected a "
                         "train_vavae.py checkpoint, the released VA-VAE file or an AutoencoderKL state_dict")
    kwargs = {"ch": state["encoder.conv_in.weight"].shape[0], **kwargs}
    model = AutoencoderKL(**kwargs)
    load_weights(model, state, path, f"({kwargs})")
    return model.eval()


def load_weights(module, state, source, hint=""):
    """module.load_state_dict(state), strict; a mismatch is one error line naming the keys and shapes that differ."""
    own = module.state_dict()
    problems = {"missing": [k for k in own if k not in state], "unexpected": [k for k in state if k not in own],
                "shape mismatch": [f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                                   for k, v in own.items() if k in state and state[k].shape != v.shape]}
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:3])}" for label, keys in problems.items() if keys]
    if problems:
        raise SystemExit(f"error: {source} does not fit {type(module).__name__}{hint}: {'; '.join(problems)}")
    module.load_state_dict(state)


def images_to_uint8(x):
    """(B,3,H,W) floats in ~[-1,1] -> (B,H,W,3) uint8, exactly as the release converts decoded images."""
    return torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)


def uint8_to_images(u8):
    """(B,H,W,3) uint8 -> (B,3,H,W) float32 in [-1,1] (ToTensor then Normalize(0.5, 0.5)), contiguous."""
    return ((u8.float() / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2).contiguous()


def normalize_latents(z, mean, std):
    return (z - mean) / std


def denormalize_latents(z, mean, std):
    return z * std + mean


# ----------------------------------------------------------------------------------------------------------------------
# vision foundation model: frozen features the latent is aligned to

class FoundationModel(nn.Module):
    """A frozen timm ViT returning its patch tokens as a (B, C, grid, grid) feature map.

    Fed as released: the [-1,1] image resized (bilinear) to `image_size`, without ImageNet mean/std normalisation
    (a release quirk: DINOv2 was trained on normalised images; imagenet_norm=True normalises).
    DINOv2 ViT-L/14 at 224 px and MAE ViT-L/16 at 256 px both give the 16x16 grid of a 256 px f16 latent.
    weights: "hub" (timm / Hugging Face download), a local weights file, or "random" (tests only)."""

    def __init__(self, name="vit_large_patch14_dinov2.lvd142m", weights="hub", image_size=224, imagenet_norm=False,
                 allow_unsafe=False, **timm_kwargs):
        super().__init__()
        if weights not in ("hub", "random") and not os.path.isfile(weights):
            raise SystemExit(f"error: foundation model weights {weights} do not exist "
                             "(give a local file, 'hub' to download through timm, or 'random' for tests)")
        if not timm.is_model(name):
            raise SystemExit(f"error: unknown foundation model {name!r}; give a timm model name, e.g. "
                             "vit_large_patch14_dinov2.lvd142m (DINOv2) or vit_large_patch16_224.mae (MAE)")
        overlay = None
        if weights not in ("hub", "random"):  # read here, not by timm, whose torch.load would unpickle anything
            if weights.endswith(".safetensors"):
                from safetensors.torch import load_file
                state = load_file(weights)
            else:
                state = load_checkpoint(weights, allow_unsafe)
            state = state.get("model", state.get("state_dict", state)) if isinstance(state, dict) else state
            if not isinstance(state, dict):
                raise SystemExit(f"error: {weights} holds a {type(state).__name__}, not a state dict of {name}")
            overlay = dict(state_dict=state)  # timm still maps the official DINOv2 / MAE key names onto its own
        try:
            self.model = timm.create_model(name, pretrained=weights != "random", pretrained_cfg_overlay=overlay,
                                           dynamic_img_size=True, num_classes=0, **timm_kwargs)
        except Exception as e:  # noqa: BLE001 -- timm's download, or its own torch.load of a local file
            if weights == "random":
                raise
            source = "the hub" if overlay is None else weights
            raise SystemExit(f"error: could not load the {name} weights from {source} ({explain(e)}); give "
                             "--vf_weights=a local weights file of that model") from None
        self.model.requires_grad_(False)
        self.image_size, self.imagenet_norm = image_size, imagenet_norm
        self.grid = image_size // self.model.patch_embed.patch_size[0]
        self.feature_dim = self.model.num_features
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode=True):
        return super().train(False)  # frozen, always in eval mode

    @torch.no_grad()
    def forward(self, x):
        if self.imagenet_norm:
            x = ((x + 1) / 2 - self.mean) / self.std
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        tokens = self.model.forward_features(x)[:, self.model.num_prefix_tokens:]  # drop the class token
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)


# ----------------------------------------------------------------------------------------------------------------------
# VF loss (paper section 3.2)

def mdms_loss(z_proj, f, margin):
    """Marginal distance-matrix similarity: the patch-to-patch cosine-similarity matrices of the latent and
    of the features should agree; differences below the margin m2 are free. Mean over b, i, j (diagonal included)."""
    z_hat = F.normalize(z_proj.flatten(2), dim=1)  # (B, C, N): unit vector per position
    f_hat = F.normalize(f.flatten(2), dim=1)
    sim_z, sim_f = z_hat.transpose(1, 2) @ z_hat, f_hat.transpose(1, 2) @ f_hat  # (B, N, N)
    return F.relu((sim_z - sim_f).abs() - margin).mean()


def mcos_loss(z_proj, f, margin):
    """Marginal cosine similarity: each latent position should point like its feature, up to margin m1."""
    return F.relu(1 - margin - F.cosine_similarity(f, z_proj, dim=1, eps=1e-8)).mean()


class VFLoss(nn.Module):
    """L_vf = L_mcos + L_mdms on the sampled latent, projected to the feature width by a bias-free 1x1 conv.

    `linear_proj` is the released name; the release projects the latent up ("reverse_proj") rather than the
    features down, so the foundation features stay untouched."""

    def __init__(self, embed_dim, feature_dim, cos_margin=0.5, distmat_margin=0.25):
        super().__init__()
        self.linear_proj = nn.Conv2d(embed_dim, feature_dim, 1, bias=False)
        self.cos_margin, self.distmat_margin = cos_margin, distmat_margin

    def forward(self, z, f):
        if z.shape[-2:] != f.shape[-2:]:
            raise ValueError(f"foundation features are on a {tuple(f.shape[-2:])} grid but the latent is "
                             f"{tuple(z.shape[-2:])}: choose the foundation image size so that it matches")
        z_proj = self.linear_proj(z)
        return mdms_loss(z_proj, f, self.distmat_margin) + mcos_loss(z_proj, f, self.cos_margin)


def adaptive_weight(nll_grad, loss, last_layer, max_weight):
    """||grad L_nll|| / ||grad L|| at `last_layer` (the paper's adaptive weighting, taming's GAN weight); clamped and
    detached as released.

    nll_grad is the reconstruction loss's gradient at the same layer, computed once by the caller."""
    grad = torch.autograd.grad(loss, last_layer, retain_graph=True)[0]
    return torch.clamp(nll_grad.norm() / (grad.norm() + 1e-4), 0.0, max_weight).detach()


# ----------------------------------------------------------------------------------------------------------------------
# LPIPS perceptual distance (Zhang et al. 2018), with taming-transformers' module names

def lin_head(channels):
    head = nn.Module()
    head.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))
    return head


class LPIPS(nn.Module):
    """VGG16 features of both images, unit-normalised over channels at each position; their squared difference
    is weighted by a learned 1x1 conv per stage, averaged over space and summed over the 5 stages. Returns (B,1,1,1).

    weights: a file with the linear heads lin0..lin4 (the vgg.pth of the `lpips` package or taming), optionally
    with the backbone (net.*); or a checkpoint holding loss.perceptual_loss.* (the released VA-VAE one).
    Without net.* the backbone is torchvision's ImageNet VGG16 (downloaded). "random": untrained (tests only)."""

    def __init__(self, weights="random", allow_unsafe=False):
        super().__init__()
        state = {}
        if weights != "random":
            if not os.path.isfile(weights):
                raise SystemExit(f"error: LPIPS weights {weights} do not exist; use the vgg.pth of the `lpips` package "
                                 "(lpips/weights/v0.1/vgg.pth), taming's vgg.pth or the released VA-VAE checkpoint")
            state = load_checkpoint(weights, allow_unsafe)
            state = state.get("state_dict", state)
            keep = tuple(f"lin{i}." for i in range(5)) + ("net.", "scaling_layer.")
            state = {k.removeprefix("loss.perceptual_loss."): v for k, v in state.items()}
            state = {k: v for k, v in state.items() if k.startswith(keep)}
            if not any(k.startswith("lin") for k in state):
                raise SystemExit(f"error: {weights} is not an LPIPS weights file (no lin0..lin4 heads)")
        self.scaling_layer = nn.Module()  # LPIPS's input shift and scale (ImageNet statistics in [-1,1] units)
        self.scaling_layer.register_buffer("shift", torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1))
        self.scaling_layer.register_buffer("scale", torch.tensor([.458, .448, .450]).view(1, 3, 1, 1))
        if weights == "random" or any(k.startswith("net.") for k in state):
            features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
        else:
            try:
                features = torchvision.models.vgg16(weights=torchvision.models.VGG16_Weights.IMAGENET1K_V1).features
            except Exception as e:  # noqa: BLE001 -- offline, proxy, HTTP errors: all mean "no backbone"
                raise SystemExit(f"error: could not get torchvision's VGG16 weights for LPIPS ({explain(e)}); "
                                 f"put vgg16-397923af.pth into the torch hub cache or use LPIPS weights "
                                 "that include the backbone (net.*)") from None
        self.net = nn.Module()  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 outputs
        for i, (start, end) in enumerate([(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]):
            setattr(self.net, f"slice{i + 1}", nn.Sequential(OrderedDict(
                (str(j), features[j]) for j in range(start, end))))
        for i, channels in enumerate((64, 128, 256, 512, 512)):
            setattr(self, f"lin{i}", lin_head(channels))
        if weights != "random":
            try:
                missing, unexpected = self.load_state_dict(state, strict=False)
            except RuntimeError as e:  # shape mismatches
                raise SystemExit(f"error: {weights} is not an LPIPS weights file: {e}") from None
            missing = [k for k in missing if k.startswith("lin")]  # backbone from torchvision, constants from above
            if missing or unexpected:
                raise SystemExit(f"error: {weights} is not an LPIPS weights file: missing {missing}, "
                                 f"unexpected {unexpected[:5]}")
        self.requires_grad_(False)

    def forward(self, x, y):
        scale = self.scaling_layer
        hx, hy = (x - scale.shift) / scale.scale, (y - scale.shift) / scale.scale
        distance = 0
        for i in range(5):
            stage = getattr(self.net, f"slice{i + 1}")
            hx, hy = stage(hx), stage(hy)
            diff = (unit_channels(hx) - unit_channels(hy)) ** 2
            distance = distance + getattr(self, f"lin{i}").model(diff).mean([2, 3], keepdim=True)
        return distance


def unit_channels(x, eps=1e-10):
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


# ----------------------------------------------------------------------------------------------------------------------
# PatchGAN discriminator (taming-transformers NLayerDiscriminator, BatchNorm)

class NLayerDiscriminator(nn.Module):
    """Real/fake logits per patch: (B,1,30,30) for a 256 image, each logit seeing a 70x70 window."""

    def __init__(self, input_nc=3, ndf=64, n_layers=3):
        super().__init__()
        layers, width = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)], ndf
        for n in range(1, n_layers + 1):
            out = ndf * min(2 ** n, 8)
            layers += [nn.Conv2d(width, out, 4, stride=2 if n < n_layers else 1, padding=1, bias=False),
                       nn.BatchNorm2d(out), nn.LeakyReLU(0.2, True)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x):
        return self.main(x)


def weights_init(module):
    """taming's init: conv weights N(0, 0.02) (biases keep PyTorch's default), BatchNorm weight N(1, 0.02), bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(logits_real, logits_fake):
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())
