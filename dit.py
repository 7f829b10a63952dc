"""LightningDiT and its rectified flow: the model, the training loss and the sampler, in one file.

Paper: "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion Models" (Yao et al., CVPR 2025).
The model is DiT (Peebles & Xie) with SwiGLU, RMSNorm, 2-D RoPE and optional qk-norm / shift-free adaLN. State-dict key
names match the official release, so its checkpoints load with strict=True.

Conventions of the release, kept here: t = 0 is noise and t = 1 is data; the model sees t in [0, 1] (not x1000);
the null (unconditional) label is `num_classes`.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from config.runtime import load_checkpoint

# name -> (depth, hidden_size, num_heads); the suffix /1 or /2 is the patch size
DIT_SIZES = {"B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "1p0B": (24, 1536, 24), "1p6B": (28, 1792, 28)}


def create_dit(name, depth=0, hidden_size=0, num_heads=0, **options):
    """create_dit("LightningDiT-XL/1", input_size=16, ...) -> LightningDiT of an official size; a non-zero depth,
    hidden_size or num_heads overrides the size's own (small models for experiments and tests)."""
    size, _, patch = name.removeprefix("LightningDiT-").partition("/")
    if size not in DIT_SIZES or patch not in ("1", "2"):
        names = [f"LightningDiT-{s}/{p}" for s in DIT_SIZES for p in (1, 2)]
        raise SystemExit(f"error: unknown model {name!r}; choose one of {', '.join(names)}")
    sizes = [given or default for given, default in zip((depth, hidden_size, num_heads), DIT_SIZES[size])]
    return LightningDiT(**dict(zip(("depth", "hidden_size", "num_heads"), sizes)), patch_size=int(patch), **options)


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 as the release does."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def modulate(x, shift, scale):
    x = x * (1 + scale.unsqueeze(1))
    return x if shift is None else x + shift.unsqueeze(1)


class Rope2D(nn.Module):
    """2-D axial rotary embedding (EVA-02 style, interleaved pairs): the first half of each head rotates with the
    token's row, the second half with its column. Buffers are named as in the release."""

    def __init__(self, head_dim, grid_size, theta=10000.0):
        super().__init__()
        half = head_dim // 2  # channels per axis
        freqs = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)
        angles = torch.arange(grid_size).float()[:, None] * freqs  # (grid, half/2)
        angles = angles.repeat_interleave(2, dim=-1)  # each frequency drives one (even, odd) pair
        rows = angles[:, None, :].expand(grid_size, grid_size, half)
        cols = angles[None, :, :].expand(grid_size, grid_size, half)
        angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
        self.register_buffer("freqs_cos", angles.cos())
        self.register_buffer("freqs_sin", angles.sin())

    def forward(self, x):
        pairs = x.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)  # (a, b) -> (-b, a)
        return x * self.freqs_cos + rotated * self.freqs_sin


class Attention(nn.Module):
    def __init__(self, dim, num_heads, use_qknorm=False, use_rmsnorm=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        norm = RMSNorm if use_rmsnorm else nn.LayerNorm
        self.q_norm = norm(self.head_dim) if use_qknorm else nn.Identity()
        self.k_norm = norm(self.head_dim) if use_qknorm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q).type_as(v), rope(k).type_as(v)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v, fused
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class SwiGLU(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class PatchEmbed(nn.Module):
    """p x p patches -> tokens, row-major (token n = h * grid + w)."""

    def __init__(self, patch_size, in_channels, dim):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t -> 256 sinusoidal features [cos | sin] -> MLP (as in DiT)."""

    def __init__(self, dim, frequency_dim=256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        angles = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1))


class LabelEmbedder(nn.Module):
    """Class label -> vector; row `num_classes` is the null label. In training, labels are dropped to the null label
    with probability `dropout_prob`, which teaches the unconditional model used by classifier-free guidance."""

    def __init__(self, num_classes, dim, dropout_prob):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (dropout_prob > 0), dim)

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class LightningDiTBlock(nn.Module):
    """adaLN-Zero transformer block: modulate, attend, gate, add; modulate, MLP, gate, add."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, use_qknorm=False, use_swiglu=True, use_rmsnorm=True,
                 wo_shift=False):
        super().__init__()
        norm = (lambda: RMSNorm(dim)) if use_rmsnorm else (lambda: nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
        self.norm1, self.norm2 = norm(), norm()
        self.attn = Attention(dim, num_heads, use_qknorm, use_rmsnorm)
        hidden = int(dim * mlp_ratio)
        # SwiGLU keeps the parameter count of a 4x GELU MLP with 2/3 of the width (official rounding)
        self.mlp = SwiGLU(dim, int(2 / 3 * hidden)) if use_swiglu else Mlp(dim, hidden)
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (4 if wo_shift else 6) * dim))

    def forward(self, x, c, rope=None):
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            shift_msa = shift_mlp = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    def __init__(self, dim, patch_size, out_channels, use_rmsnorm=True):
        super().__init__()
        self.norm_final = RMSNorm(dim) if use_rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_pos_embed_2d(dim, grid_size):
    """Fixed 2-D sin-cos table (grid*grid, dim): first half of the channels encodes the column, second half the row
    (the DiT/MAE convention). Computed in float64 and cast, as the release does with numpy."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    pos = torch.arange(grid_size, dtype=torch.float64)

    def embed(coords):  # (N,) -> (N, dim/2) = [sin | cos]
        angles = coords[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = pos.repeat_interleave(grid_size), pos.repeat(grid_size)
    return torch.cat([embed(cols), embed(rows)], dim=1).float()


# ----------------------------------------------------------------------------------------------------------------------
# The model

class LightningDiT(nn.Module):
    """Velocity model v(x_t, t, y) on a (C, H, W) latent. Defaults are the released configuration of XL/1 on
    the 16x16x32 VA-VAE latents."""

    def __init__(self, input_size=16, patch_size=1, in_channels=32, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=False, use_qknorm=False,
                 use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False):
        super().__init__()
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.num_classes, self.hidden_size, self.depth = num_classes, hidden_size, depth
        grid = input_size // patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # a frozen Parameter, not a buffer, because the release counts and stores it that way
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid, hidden_size), requires_grad=False)
        self.feat_rope = Rope2D(hidden_size // num_heads, grid) if use_rope else None
        self.blocks = nn.ModuleList([
            LightningDiTBlock(hidden_size, num_heads, mlp_ratio, use_qknorm, use_swiglu, use_rmsnorm, wo_shift)
            for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, use_rmsnorm)
        self.initialize_weights()

    def initialize_weights(self):
        """DiT initialisation: xavier linears, zero biases, zero adaLN and output layers (each block starts as the
        identity and the model outputs 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.hidden_size, self.input_size // self.patch_size)[None])
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))  # the patch conv initialised like a linear layer
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [block.adaLN_modulation[-1] for block in self.blocks] + [
                self.final_layer.adaLN_modulation[-1], self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, y):
        """x: (B, C, H, W) latents, t: (B,) times in [0, 1], y: (B,) labels -> (B, C, H, W) velocity."""
        B, _, H, W = x.shape
        p = self.patch_size
        tokens = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c, self.feat_rope)
        out = self.final_layer(tokens, c)  # (B, T, p*p*C_out)
        out = out.view(B, H // p, W // p, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        out = out.reshape(B, self.out_channels, H, W)
        return out[:, :self.in_channels]  # learn_sigma: the release drops the variance half

    def forward_flops(self):
        """Matmul FLOPs of one forward pass for one image (2 per multiply-add). XL/1: 237.3 GFLOP."""
        D, T = self.hidden_size, (self.input_size // self.patch_size) ** 2
        mlp = self.blocks[0].mlp
        mlp_macs = sum(m.weight.numel() for m in mlp.modules() if isinstance(m, nn.Linear))
        per_block = T * (4 * D * D + mlp_macs + 2 * T * D) + self.blocks[0].adaLN_modulation[-1].weight.numel()
        embed = T * self.x_embedder.proj.weight.numel() + sum(m.weight.numel() for m in self.t_embedder.mlp[::2])
        final = T * self.final_layer.linear.weight.numel() + self.final_layer.adaLN_modulation[-1].weight.numel()
        return 2 * (self.depth * per_block + embed + final)


def load_dit(path, allow_unsafe=False):
    """A LightningDiT from our train_dit.py checkpoint (its EMA weights), an official release checkpoint
    (`ema` entry, `model` entry or a bare state dict, `module.` prefixes stripped); architecture read off the keys."""
    checkpoint = load_checkpoint(path, allow_unsafe)
    if not isinstance(checkpoint, dict):
        raise SystemExit(f"error: {path} holds a {type(checkpoint).__name__}, not LightningDiT weights (a state dict or "
                         "a checkpoint dict)")
    state_dict = checkpoint.get("ema", checkpoint.get("model", checkpoint))
    state_dict = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    if "x_embedder.proj.weight" not in state_dict:
        raise SystemExit(f"error: {path} holds no LightningDiT weights (no x_embedder.proj.weight)")
    model = LightningDiT(**dit_args_from_state_dict(state_dict))
    load_state_dict_strict(model, state_dict, path)
    return model.eval()


def dit_args_from_state_dict(sd):
    hidden_size, in_channels, patch_size, _ = sd["x_embedder.proj.weight"].shape
    depth = sum(1 for k in sd if k.startswith("blocks.") and k.endswith(".adaLN_modulation.1.weight"))
    heads_by_width = {h: n for _, h, n in DIT_SIZES.values()}
    use_rope = "feat_rope.freqs_cos" in sd
    num_heads = hidden_size // sd["feat_rope.freqs_cos"].shape[1] if use_rope else heads_by_width.get(hidden_size,
                                                                                                       hidden_size // 64)
    use_swiglu = "blocks.0.mlp.w12.weight" in sd
    mlp_hidden = sd["blocks.0.mlp.w3.weight"].shape[1] * 3 / 2 if use_swiglu else sd["blocks.0.mlp.fc1.weight"].shape[0]
    return dict(
        input_size=math.isqrt(sd["pos_embed"].shape[1]) * patch_size, patch_size=patch_size, in_channels=in_channels,
        hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=round(mlp_hidden / hidden_size * 2) / 2,
        num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - 1,
        learn_sigma=sd["final_layer.linear.weight"].shape[0] == 2 * in_channels * patch_size ** 2,
        use_qknorm="blocks.0.attn.q_norm.weight" in sd, use_swiglu=use_swiglu, use_rope=use_rope,
        use_rmsnorm="blocks.0.norm1.weight" in sd,
        wo_shift=sd["blocks.0.adaLN_modulation.1.weight"].shape[0] == 4 * hidden_size)


def load_state_dict_strict(model, state_dict, source):
    """load_state_dict(strict=True) whose error names the keys and shapes that differ."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in own.items() if k in state_dict and state_dict[k].shape != v.shape]
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:6]) + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
        problems = [f"{label}: {show(keys)}" for label, keys in
                    (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
        raise SystemExit(f"error: {source} does not fit this model (another model size or options?); "
                         + "; ".join(problems))
    model.load_state_dict(state_dict)


# ----------------------------------------------------------------------------------------------------------------------
# Rectified flow: training loss

def sample_timesteps(batch_size, device, generator=None):
    """Logit-normal t: sigmoid of N(0, 1), as released (use_lognorm)."""
    return torch.sigmoid(torch.randn(batch_size, device=device, generator=generator))


def rectified_flow_loss(model, x1, y, t, x0):
    """Per-sample losses on the straight path from noise x0 (t=0) to data x1 (t=1).

    x_t = t x1 + (1 - t) x0, target velocity u = x1 - x0. Returns (mse, cos), each (B,): mean squared error and
    mean over positions of 1 - cos(v, u) along channels (the release's direction loss; train.py adds them 1:1)."""
    t_ = t.view(-1, *[1] * (x1.dim() - 1))
    xt = t_ * x1 + (1 - t_) * x0
    u = x1 - x0
    v = model(xt, t, y)
    mse = (v.float() - u).pow(2).mean(dim=(1, 2, 3))
    cos = (1 - F.cosine_similarity(v.float(), u, dim=1, eps=1e-8)).mean(dim=(1, 2))
    return mse, cos


# ----------------------------------------------------------------------------------------------------------------------
# Rectified flow: sampler

def time_grid(num_steps, timestep_shift):
    """num_steps points from 0 to 1, warped by t -> s t / (1 + (s - 1) t); s < 1 spends more steps near the noise."""
    t = torch.linspace(0, 1, num_steps)
    return timestep_shift * t / (1 + (timestep_shift - 1) * t)


def guided_velocity(model, x, t, y, cfg_scale, guidance="legacy3"):
    """Classifier-free guidance: v = v_null + s (v_cond - v_null). At scale 1 the unconditional pass is not run.

    guidance="legacy3" guides output channels 0-2 only and keeps the conditional velocity elsewhere: the official
    code does this by accident (inherited from DiT's 4-channel SD-VAE), and its FIDs depend on it.
    guidance="all" guides every channel (standard CFG)."""
    if guidance not in ("legacy3", "all"):
        raise ValueError(f"guidance must be 'legacy3' or 'all', got {guidance!r}")
    if cfg_scale == 1.0:
        return model(x, t, y)
    null = torch.full_like(y, model.num_classes)
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])).chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([guided[:, :3], cond[:, 3:]], dim=1) if guidance == "legacy3" else guided


@torch.no_grad()
def sample(model, z, y, num_steps=250, timestep_shift=0.3, cfg_scale=1.0, cfg_interval_start=0.0, guidance="legacy3",
           method="euler", return_trajectory=False):
    """Integrate dx/dt = v(x, t, y) from noise z at t=0 to data at t=1 on the shifted time grid.

    euler (the release): num_steps - 1 model calls, never at t=1. heun: two calls per step, the second at its end.
    Guidance only acts where t >= cfg_interval_start (the guidance interval), compared in float32 as the release does
    (a float32 time tensor against the Python float); elsewhere one conditional pass.
    Returns the final latents, or all num_steps states on the grid if return_trajectory."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")

    def velocity(x, time, scale):
        return guided_velocity(model, x, torch.full((x.shape[0],), time, device=x.device), y, scale, guidance)

    grid = time_grid(num_steps, timestep_shift).tolist()  # host floats (float32 values): no device sync per step
    start = torch.tensor(cfg_interval_start, dtype=torch.float32).item()  # 0.11 -> 0.10999999940..., as the release
    x, trajectory = z, [z]
    for t, t_next in zip(grid[:-1], grid[1:]):
        scale = cfg_scale if t >= start else 1.0  # the guidance interval
        dt = t_next - t
        v = velocity(x, t, scale)
        if method == "heun":
            v = (v + velocity(x + dt * v, t_next, scale)) / 2
        x = x + dt * v
        if return_trajectory:
            trajectory.append(x)
    return torch.stack(trajectory) if return_trajectory else x
