"""dit.py against the official release (../shared/golden, fp32 CPU) and its own promises."""
import os

import pytest
import torch

import dit
from conftest import GOLDEN

ATOL = 1e-5  # the official code itself moves by up to ~4.5e-6 between thread counts (golden README)


def golden(name):
    path = os.path.join(GOLDEN, name)
    if not os.path.exists(path):
        pytest.skip(f"golden file {path} not found")
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def model():
    g = golden("dit_model.pt")
    m = dit.LightningDiT(**dit.dit_args_from_state_dict(g["state_dict"])).eval()
    dit.load_state_dict_strict(m, g["state_dict"], "golden")
    return m


def test_architecture_read_off_the_keys_matches_official_config():
    g = golden("dit_model.pt")
    args = dit.dit_args_from_state_dict(g["state_dict"])
    for key, value in args.items():
        assert g["config"][key] == value, key
    m = dit.LightningDiT(**args)
    assert sum(p.numel() for p in m.parameters()) == g["num_params"] == 1_748_704
    assert list(m.state_dict()) == list(g["state_dict"])  # official key names, official order


def test_xl1_parameter_count_and_flops():
    with torch.device("meta"):
        xl = dit.create_dit("LightningDiT-XL/1")
    assert sum(p.numel() for p in xl.parameters()) == 675_256_736
    assert abs(xl.forward_flops() / 1e9 - 237.3) < 0.1  # the FLOP count quoted for MFU


@pytest.mark.parametrize("name", [f"LightningDiT-{s}/{p}" for s in dit.DIT_SIZES for p in (1, 2)])
def test_every_official_size_builds(name):
    with torch.device("meta"):
        m = dit.create_dit(name, use_qknorm=True, wo_shift=True)
    depth, hidden, heads = dit.DIT_SIZES[name.split("-")[1].split("/")[0]]
    assert len(m.blocks) == depth and m.hidden_size == hidden and m.blocks[0].attn.num_heads == heads
    assert m.blocks[0].adaLN_modulation[1].out_features == 4 * hidden


def test_unknown_size_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown model 'LightningDiT-XXL/1'"):
        dit.create_dit("LightningDiT-XXL/1")


def test_options_round_trip_through_the_keys():
    for options in [dict(use_qknorm=True), dict(wo_shift=True), dict(use_swiglu=False, use_rmsnorm=False),
                    dict(use_rope=False, learn_sigma=True), dict(patch_size=2, use_qknorm=True, use_rmsnorm=False)]:
        m = dit.LightningDiT(input_size=8, hidden_size=64, depth=2, num_heads=2, num_classes=10, **options)
        args = dit.dit_args_from_state_dict(m.state_dict())
        for key, value in options.items():
            assert args[key] == value, (options, key)
        out = m.eval()(torch.randn(2, 32, 8, 8), torch.rand(2), torch.tensor([1, 10]))
        assert out.shape == (2, 32, 8, 8)


def test_fresh_model_outputs_zero_as_adaln_zero_promises():
    m = dit.LightningDiT(input_size=8, hidden_size=64, depth=2, num_heads=2, num_classes=10).eval()
    assert torch.equal(m(torch.randn(2, 32, 8, 8), torch.rand(2), torch.tensor([0, 3])), torch.zeros(2, 32, 8, 8))


def test_forward_and_intermediates_match_official(model):
    g = golden("dit_model.pt")
    seen = {}
    hooks = [getattr(model, n).register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
             for n in ("x_embedder", "t_embedder", "y_embedder", "final_layer")]
    hooks += [b.register_forward_hook(lambda mod, i, o, k=k: seen.__setitem__(f"block_{k}", o))
              for k, b in enumerate(model.blocks)]
    with torch.no_grad():
        out = model(g["x"], g["t"], g["y"])
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, g["out"], atol=ATOL, rtol=0)
    for name, value in g["intermediates"].items():
        torch.testing.assert_close(seen[name.removesuffix("_out")], value, atol=ATOL, rtol=0, msg=name)


@pytest.mark.parametrize("where", ["below", "above", "at"])
def test_guidance_matches_official_forward_with_cfg(model, where):
    """The official forward_with_cfg returns 2n rows; inference keeps the first n, which we compute from n rows."""
    g = golden("dit_model.pt")
    n, t = g["cfg_n"], g[f"cfg_t_{where}"]
    start = g["cfg_interval_start"]
    scale = g["cfg_scale"] if t[0] >= start else 1.0  # the interval decision sample() makes
    assert (scale != 1.0) == g[f"cfg_guided_{where}"]
    with torch.no_grad():
        out = dit.guided_velocity(model, g["cfg_x"][:n], t[:n], g["cfg_y"][:n], scale, "legacy3")
    torch.testing.assert_close(out, g[f"cfg_out_{where}"][:n], atol=ATOL, rtol=0)


def test_guidance_all_channels_and_bad_mode(model):
    g = golden("dit_model.pt")
    x, t, y = g["cfg_x"][:2], g["cfg_t_above"][:2], g["cfg_y"][:2]
    with torch.no_grad():
        cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), torch.tensor([404, 321, 1000, 1000])).chunk(2)
        out = dit.guided_velocity(model, x, t, y, 4.0, "all")
    torch.testing.assert_close(out, uncond + 4.0 * (cond - uncond), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="guidance must be"):
        dit.guided_velocity(model, x, t, y, 4.0, "some")


def test_transport_loss_matches_official(model):
    g = golden("transport_loss.pt")
    t_ = g["t"].view(-1, 1, 1, 1)
    torch.testing.assert_close(t_ * g["x1"] + (1 - t_) * g["x0"], g["xt"], atol=0, rtol=0)
    with torch.no_grad():
        mse, cos = dit.rectified_flow_loss(model, g["x1"], g["y"], g["t"], g["x0"])
    torch.testing.assert_close(mse, g["loss_mse_per_sample"], rtol=1e-5, atol=0)
    torch.testing.assert_close(cos, g["loss_cos_per_sample"], rtol=1e-5, atol=0)
    torch.testing.assert_close(mse.mean() + cos.mean(), g["loss_total"], rtol=1e-5, atol=0)


def test_time_grids_and_guidance_interval_match_official():
    g = golden("timestep_grids.pt")
    for key, entry in g["grids"].items():
        grid = dit.time_grid(entry["num_steps"], entry["timestep_shift"])
        assert torch.equal(grid, entry["grid"]), key  # bit-exact
        for start, interval in entry["cfg_interval"].items():
            guided = grid[:-1] >= interval["cfg_interval_start"]
            assert torch.equal(guided, interval["guided_step"])
            assert int((~guided).sum()) == interval["steps_without_guidance"]


def test_sampler_trajectories_match_official(model):
    g = golden("sampler.pt")
    run = g["runs"]["dit_model.pt"]
    n = 2
    common = dict(num_steps=g["num_steps"], timestep_shift=g["timestep_shift"], return_trajectory=True)
    plain = dit.sample(model, run["cfg_z"][:n], run["plain_y"], cfg_scale=1.0, **common)
    torch.testing.assert_close(plain, run["plain_trajectory"], atol=ATOL, rtol=0)
    guided = dit.sample(model, run["cfg_z"][:n], run["cfg_y"][:n], cfg_scale=g["cfg_scale"],
                        cfg_interval_start=g["cfg_interval_start"], **common)
    torch.testing.assert_close(guided, run["cfg_trajectory"][:, :n], atol=ATOL, rtol=0)
    torch.testing.assert_close(guided[-1], run["cfg_final_kept"], atol=ATOL, rtol=0)


def test_skipping_the_unconditional_pass_changes_nothing(model):
    """Outside the interval we run only the conditional half; running both halves and keeping the conditional one
    must give the same numbers (to the float32 floor: a batch of 4 instead of 2 changes BLAS blocking, ~2e-6)."""
    g = golden("dit_model.pt")
    x, t, y = g["cfg_x"][:2], g["cfg_t_below"][:2], g["cfg_y"][:2]
    with torch.no_grad():
        skipped = dit.guided_velocity(model, x, t, y, 1.0)
        both = model(torch.cat([x, x]), torch.cat([t, t]), torch.tensor([404, 321, 1000, 1000]))[:2]
    torch.testing.assert_close(skipped, both, atol=ATOL, rtol=0)


class LinearField(torch.nn.Module):
    """v(x, t) = -x: the exact flow is x(t) = x(0) exp(-t)."""
    num_classes = 1

    def forward(self, x, t, y):
        return -x


def test_heun_is_second_order_and_euler_first():
    z = torch.ones(1, 4, 2, 2)
    exact = torch.exp(torch.tensor(-1.0))
    errors = {m: [(dit.sample(LinearField(), z, torch.zeros(1, dtype=torch.long), num_steps=n, timestep_shift=1.0,
                              method=m)[0, 0, 0, 0] - exact).abs().item() for n in (11, 21)] for m in ("euler", "heun")}
    assert 1.8 < errors["euler"][0] / errors["euler"][1] < 2.2  # halving the step halves the error
    assert 3.5 < errors["heun"][0] / errors["heun"][1] < 4.5  # ... and quarters it
    with pytest.raises(ValueError, match="method must be"):
        dit.sample(LinearField(), z, torch.zeros(1, dtype=torch.long), num_steps=3, method="rk4")


def test_load_dit_reads_official_layouts(tmp_path):
    g = golden("dit_model.pt")
    sd = g["state_dict"]
    layouts = {"ema.pt": {"ema": sd, "model": {}, "opt": {}}, "bare.pt": sd,
               "model.pt": {"model": {"module." + k: v for k, v in sd.items()}}}
    for name, content in layouts.items():
        torch.save(content, tmp_path / name)
        m = dit.load_dit(str(tmp_path / name))
        assert not m.training
        with torch.no_grad():
            torch.testing.assert_close(m(g["x"], g["t"], g["y"]), g["out"], atol=ATOL, rtol=0)


def test_checkpoint_of_another_size_names_the_keys(tmp_path):
    small = dit.LightningDiT(input_size=16, hidden_size=192, depth=1, num_heads=3)
    with pytest.raises(SystemExit, match=r"unexpected: blocks\.1\..*"):
        dit.load_state_dict_strict(small, golden("dit_model.pt")["state_dict"], "golden")
    wide = dit.LightningDiT(input_size=16, hidden_size=128, depth=2, num_heads=2)
    with pytest.raises(SystemExit, match=r"shape mismatch: pos_embed \(1, 256, 192\) vs model \(1, 256, 128\)"):
        dit.load_state_dict_strict(wide, golden("dit_model.pt")["state_dict"], "golden")
    torch.save({"weights": 1}, tmp_path / "x.pt")
    with pytest.raises(SystemExit, match="no LightningDiT weights"):
        dit.load_dit(str(tmp_path / "x.pt"))
