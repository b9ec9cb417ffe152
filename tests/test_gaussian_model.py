"""Tests of scene/gaussian_model.py (initialisation, activations, lr schedules, the edits densification
uses, gradient edits, bit-exact checkpoint resume) and of its PLY layout in scene/ply_format.py.
The densification rules are tested in tests/test_densification.py."""
from __future__ import annotations

import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from scene.densification import DensificationStrategy
from scene.gaussian_model import (
    SCALE_NOISE_STD,
    SH_C0,
    GaussianModel,
    exponential_lr,
)
from scene.ply_format import load_gaussian_ply, save_gaussian_ply


def optim_cfg(**overrides) -> SimpleNamespace:
    """The bagel OptimizationParams values used by the model."""
    values = dict(
        position_lr_init=1.6e-4, position_lr_final=1.6e-6, feature_lr=5e-3, feature_lr_final=3e-3,
        opacity_lr=0.05, scaling_lr=5e-3, scaling_lr_final=1e-3, rotation_lr=1e-3,
        rotation_lr_final=2e-4, iterations=5000, percent_dense=0.003,
    )
    values.update(overrides)
    return SimpleNamespace(**values)


def random_model(n: int = 20, sh_degree: int = 0, seed: int = 0) -> GaussianModel:
    g = torch.Generator().manual_seed(seed)
    xyz = torch.rand(n, 3, generator=g) - 0.5
    rgb = torch.rand(n, 3, generator=g)
    model = GaussianModel.from_points(xyz, rgb, max_sh_degree=sh_degree)
    with torch.no_grad():
        for tensor in model.params().values():
            tensor.add_(0.1 * torch.randn(tensor.shape, generator=g))
    return model


def toy_loss(model: GaussianModel) -> torch.Tensor:
    gs = model.gaussian_tensors()
    return (
        (gs.means - 0.2).square().sum()
        + (gs.sh_coeffs - 0.3).square().sum()
        + gs.opacities.sum()
        + gs.scales.sum()
        + gs.quats[:, 1:].square().sum()
    )


def step_with_toy_loss(model: GaussianModel) -> None:
    model.optimizer.zero_grad(set_to_none=True)
    toy_loss(model).backward()
    model.optimizer.step()


# ---------------------------------------------------------------------- initialisation


def test_from_points_knn_scales_match_brute_force():
    g = torch.Generator().manual_seed(1)
    xyz = torch.rand(50, 3, generator=g, dtype=torch.float64)
    rgb = torch.rand(50, 3, generator=g)
    model = GaussianModel.from_points(xyz, rgb, max_sh_degree=1)

    d2 = torch.cdist(xyz, xyz).square()
    d2.fill_diagonal_(float("inf"))
    mean3 = d2.topk(3, largest=False).values.mean(dim=1).clamp_min(1e-7)
    expected = torch.log(torch.sqrt(mean3)).float()
    assert torch.allclose(model._scaling, expected[:, None].expand(50, 3), atol=1e-6)
    assert torch.allclose(model._features_dc[:, 0], (rgb - 0.5) / SH_C0)
    assert model._features_rest.shape == (50, 3, 3) and not model._features_rest.any()
    assert torch.equal(model._rotation, torch.tensor([[1.0, 0, 0, 0]]).expand(50, 4))
    assert torch.allclose(model.opacities, torch.full((50,), 0.1))
    assert model.num_points == 50 and model.active_sh_degree == 0


def test_from_points_duplicate_points_clamped_and_bad_shapes():
    xyz = np.zeros((5, 3))
    model = GaussianModel.from_points(xyz, np.full((5, 3), 0.5), max_sh_degree=0)
    assert torch.allclose(model._scaling, torch.full((5, 3), math.log(math.sqrt(1e-7))))
    with pytest.raises(ValueError, match=r"xyz must be \[N, 3\]"):
        GaussianModel.from_points(np.zeros((5, 2)), np.zeros((5, 3)), 0)
    with pytest.raises(ValueError, match="differ in length"):
        GaussianModel.from_points(np.zeros((5, 3)), np.zeros((4, 3)), 0)


# ---------------------------------------------------------------------- activations


def test_gaussian_tensors_activations_and_sh_degree():
    model = random_model(sh_degree=2)
    gs = model.gaussian_tensors()
    assert gs.sh_degree == 0 and gs.sh_coeffs.shape == (20, 1, 3)
    assert torch.equal(gs.scales, torch.exp(model._scaling))
    assert gs.opacities.shape == (20,)
    assert torch.equal(gs.opacities, torch.sigmoid(model._opacity[:, 0]))
    assert torch.allclose(gs.quats.norm(dim=-1), torch.ones(20))
    assert torch.allclose(gs.quats, model._rotation / model._rotation.norm(dim=-1, keepdim=True))
    model.one_up_sh_degree()
    gs = model.gaussian_tensors()
    assert gs.sh_degree == 1 and gs.sh_coeffs.shape == (20, 4, 3)
    assert torch.equal(gs.sh_coeffs[:, 1:], model._features_rest[:, :3])
    model.one_up_sh_degree()
    model.one_up_sh_degree()
    assert model.active_sh_degree == 2
    assert model.gaussian_tensors(sh_degree=0).sh_coeffs.shape == (20, 1, 3)
    with pytest.raises(ValueError, match="sh_degree"):
        model.gaussian_tensors(sh_degree=3)


def test_scale_noise_is_the_official_multiplicative_noise():
    model = random_model()
    noise = torch.randn(20, 3, generator=torch.Generator().manual_seed(3))
    noise[0, 0] = -1e6  # clamped at zero
    scales = model.gaussian_tensors(scale_noise=noise).scales
    s = torch.exp(model._scaling)
    expected = torch.clamp_min(s + noise * math.sqrt(0.2) * s / 4, 0.0)
    assert SCALE_NOISE_STD == pytest.approx(math.sqrt(0.2) / 4)
    assert torch.allclose(scales, expected) and scales[0, 0] == 0
    with pytest.raises(ValueError, match="scale_noise"):
        model.gaussian_tensors(scale_noise=torch.zeros(3))


# ---------------------------------------------------------------------- learning rates


def test_exponential_lr_endpoints_and_midpoint():
    assert exponential_lr(0, 1e-2, 1e-4, 100) == pytest.approx(1e-2, rel=1e-12)
    assert exponential_lr(100, 1e-2, 1e-4, 100) == pytest.approx(1e-4, rel=1e-12)
    assert exponential_lr(50, 1e-2, 1e-4, 100) == pytest.approx(1e-3, rel=1e-12)
    assert exponential_lr(500, 1e-2, 1e-4, 100) == pytest.approx(1e-4, rel=1e-12)
    assert exponential_lr(-1, 1e-2, 1e-4, 100) == 0.0
    with pytest.raises(ValueError, match="max_steps"):
        exponential_lr(0, 1e-2, 1e-4, 0)


def test_optimizer_groups_and_schedule():
    model = random_model()
    model.setup_optimizer(optim_cfg(), spatial_lr_scale=3.5)
    groups = {g["name"]: g for g in model.optimizer.param_groups}
    assert list(groups) == ["xyz", "f_dc", "f_rest", "opacity", "scaling", "rotation"]
    assert model.optimizer.defaults["eps"] == 1e-15 and model.optimizer.defaults["betas"] == (0.9, 0.999)
    for name, tensor in model.params().items():
        assert groups[name]["params"][0] is tensor
    lrs = model.update_learning_rate(0)
    assert lrs == pytest.approx(
        {"xyz": 1.6e-4 * 3.5, "f_dc": 5e-3, "f_rest": 2.5e-4, "opacity": 0.05, "scaling": 5e-3, "rotation": 1e-3}
    )
    lrs = model.update_learning_rate(5000)
    assert lrs == pytest.approx(
        {"xyz": 1.6e-6 * 3.5, "f_dc": 3e-3, "f_rest": 2.5e-4, "opacity": 0.05, "scaling": 1e-3, "rotation": 2e-4}
    )
    assert groups["xyz"]["lr"] == pytest.approx(1.6e-6 * 3.5)
    assert model.update_learning_rate(2500)["scaling"] == pytest.approx(math.sqrt(5e-3 * 1e-3))
    with pytest.raises(ValueError, match="spatial_lr_scale"):
        model.setup_optimizer(optim_cfg(), 0.0)


# ---------------------------------------------------------------------- PLY


def assert_same_params(a: GaussianModel, b: GaussianModel) -> None:
    for name, tensor in a.params().items():
        assert torch.equal(tensor, b.params()[name]), name


def test_ply_round_trip_and_channel_major_f_rest(tmp_path):
    model = random_model(n=7, sh_degree=1)
    with torch.no_grad():
        model._features_rest.copy_(torch.arange(7 * 3 * 3, dtype=torch.float32).reshape(7, 3, 3))
    path = tmp_path / "pc" / "point_cloud.ply"
    save_gaussian_ply(model, path)
    vertex = PlyData.read(str(path))["vertex"]
    names = [p.name for p in vertex.properties]
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[9:] == [f"f_rest_{i}" for i in range(9)] + ["opacity", "scale_0", "scale_1", "scale_2",
                                                            "rot_0", "rot_1", "rot_2", "rot_3"]
    assert all(p.val_dtype == "f4" for p in vertex.properties)
    # channel-major: f_rest_{c * (K - 1) + k} = features_rest[:, k, c]
    assert np.array_equal(vertex["f_rest_1"], model._features_rest[:, 1, 0].detach().numpy())
    assert np.array_equal(vertex["f_rest_3"], model._features_rest[:, 0, 1].detach().numpy())
    assert list(tmp_path.joinpath("pc").iterdir()) == [path]  # no temporary file left

    loaded = load_gaussian_ply(path)
    assert loaded.max_sh_degree == 1 and loaded.active_sh_degree == 1
    assert_same_params(model, loaded)


def test_ply_padded_to_degree_3(tmp_path):
    model = random_model(n=5, sh_degree=1)
    with torch.no_grad():
        model._features_rest.copy_(torch.arange(1, 5 * 3 * 3 + 1, dtype=torch.float32).reshape(5, 3, 3))
    path = tmp_path / "padded.ply"
    save_gaussian_ply(model, path, pad_sh_degree=3)
    vertex = PlyData.read(str(path))["vertex"]
    assert sum(p.name.startswith("f_rest_") for p in vertex.properties) == 45
    assert np.array_equal(vertex["f_rest_16"], model._features_rest[:, 1, 1].detach().numpy())
    assert not np.any(vertex["f_rest_3"]) and not np.any(vertex["f_rest_44"])

    same = load_gaussian_ply(path, max_sh_degree=1)
    assert_same_params(model, same)
    full = load_gaussian_ply(path)
    assert full.max_sh_degree == 3
    assert torch.equal(full._features_rest[:, :3], model._features_rest)
    assert not full._features_rest[:, 3:].any()
    with pytest.raises(ValueError, match="pad_sh_degree"):
        save_gaussian_ply(model, path, pad_sh_degree=0)


def test_ply_round_trip_at_sh_degree_0_without_padding(tmp_path):
    """A degree-0 PLY has no f_rest columns at all (regression: loading it failed on an empty stack)."""
    model = random_model(n=6, sh_degree=0)
    path = tmp_path / "dc_only.ply"
    save_gaussian_ply(model, path)
    vertex = PlyData.read(str(path))["vertex"]
    assert not any(p.name.startswith("f_rest_") for p in vertex.properties)
    same = load_gaussian_ply(path)
    assert same.max_sh_degree == 0 and same._features_rest.shape == (6, 0, 3)
    assert_same_params(model, same)
    lifted = load_gaussian_ply(path, max_sh_degree=2)
    assert lifted._features_rest.shape == (6, 8, 3) and not lifted._features_rest.any()


def test_load_ply_rejects_inconsistent_sh_columns(tmp_path):
    names = ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "f_rest_0", "f_rest_1", "opacity",
             "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    vertices = np.zeros(3, dtype=[(n, "f4") for n in names])
    path = tmp_path / "bad.ply"
    PlyData([PlyElement.describe(vertices, "vertex")]).write(str(path))
    with pytest.raises(ValueError, match="2 f_rest columns match no SH degree"):
        load_gaussian_ply(path)
    with pytest.raises(FileNotFoundError):
        load_gaussian_ply(tmp_path / "missing.ply")


# ---------------------------------------------------------------------- edits densification uses


def test_append_keeps_moments_of_old_gaussians_and_zeroes_new_ones():
    model = random_model(n=4, sh_degree=1)
    model.setup_optimizer(optim_cfg(), 1.0)
    step_with_toy_loss(model)
    before = {name: t.detach().clone() for name, t in model.params().items()}
    moments = {name: model.optimizer.state[t]["exp_avg"].clone() for name, t in model.params().items()}
    extra = {name: torch.full((2,) + t.shape[1:], 7.0) for name, t in before.items()}
    model.append(extra)
    assert model.num_points == 6
    for name, tensor in model.params().items():
        assert torch.equal(tensor[:4], before[name]) and torch.equal(tensor[4:], extra[name]), name
        state = model.optimizer.state[tensor]
        assert torch.equal(state["exp_avg"][:4], moments[name]) and not state["exp_avg"][4:].any(), name
        assert state["step"] == 1 and model.optimizer.param_groups[list(model.params()).index(name)]["params"][0] \
            is tensor
    with pytest.raises(ValueError, match="every parameter group"):
        model.append({"xyz": torch.zeros(1, 3)})
    step_with_toy_loss(model)  # the optimizer works on the new tensors


def test_keep_selects_gaussians_with_their_moments():
    model = random_model(n=5)
    model.setup_optimizer(optim_cfg(), 1.0)
    step_with_toy_loss(model)
    mask = torch.tensor([True, False, True, False, True])
    xyz, moment = model.means.detach().clone(), model.optimizer.state[model.means]["exp_avg_sq"].clone()
    model.keep(mask)
    assert model.num_points == 3
    assert torch.equal(model.means, xyz[mask])
    assert torch.equal(model.optimizer.state[model.means]["exp_avg_sq"], moment[mask])
    with pytest.raises(ValueError, match=r"mask must be bool \[N=3\]"):
        model.keep(torch.ones(3))
    with pytest.raises(ValueError, match=r"mask must be bool \[N=3\]"):
        model.keep(torch.ones(4, dtype=torch.bool))


def test_replace_requires_the_same_shape():
    model = random_model(n=3)
    model.replace({"scaling": torch.zeros(3, 3)})
    assert torch.equal(model.scales, torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"replace: scaling must keep its shape \(3, 3\), got \(2, 3\)"):
        model.replace({"scaling": torch.zeros(2, 3)})


# ---------------------------------------------------------------------- gradient edits


def test_reset_opacity_caps_and_zeroes_moments():
    model = random_model(n=4)
    with torch.no_grad():
        model._opacity.copy_(torch.tensor([[-6.0], [0.0], [3.0], [-4.0]]))
    model.setup_optimizer(optim_cfg(), 1.0)
    step_with_toy_loss(model)
    xyz_moment = model.optimizer.state[model._means]["exp_avg"].clone()
    before = model._opacity.detach().clone()
    model.reset_opacity()
    expected = torch.minimum(torch.sigmoid(before[:, 0]), torch.tensor(0.01))
    assert torch.allclose(model.opacities, expected)
    assert model._opacity[0, 0] == before[0, 0]  # already below 0.01: unchanged bit for bit
    assert (model.opacities[1:] - 0.01).abs().max() < 1e-8
    state = model.optimizer.state[model._opacity]
    assert not state["exp_avg"].any() and not state["exp_avg_sq"].any() and state["step"] == 1
    assert torch.equal(model.optimizer.state[model._means]["exp_avg"], xyz_moment)
    assert model.optimizer.param_groups[3]["params"][0] is model._opacity


def test_clip_gradients_per_tensor():
    model = random_model(n=4)
    model._means.grad = torch.full((4, 3), 10.0)
    model._features_dc.grad = torch.full((4, 1, 3), 0.1)
    model.clip_gradients(2.0)
    assert model._means.grad.norm() == pytest.approx(2.0, rel=1e-5)
    assert torch.equal(model._features_dc.grad, torch.full((4, 1, 3), 0.1))  # its own norm is < 2
    assert model._opacity.grad is None


def test_scale_colors_scales_sh_and_zeroes_moments():
    model = random_model(n=4, sh_degree=1)
    model.setup_optimizer(optim_cfg(), 1.0)
    step_with_toy_loss(model)
    dc, rest = model._features_dc.detach().clone(), model._features_rest.detach().clone()
    model.scale_colors(0.8)
    assert torch.allclose(model._features_dc, dc * 0.8) and torch.allclose(model._features_rest, rest * 0.8)
    for tensor in (model._features_dc, model._features_rest):
        assert not model.optimizer.state[tensor]["exp_avg"].any()
    assert model.optimizer.state[model._means]["exp_avg"].any()


# ---------------------------------------------------------------------- checkpoints


def strategy() -> DensificationStrategy:
    return DensificationStrategy(grad_threshold=0.01, min_opacity=0.1, percent_dense=0.07, extent=4.0,
                                 max_screen_size=20, densify_until_iter=100, densify_from_iter=2,
                                 densification_interval=3, opacity_reset_interval=1000, stats_all_cameras=True)


def train_steps(model: GaussianModel, densification: DensificationStrategy, steps: range) -> None:
    """Toy training with densification at step 3 (the split children draw from the global generator)."""
    for step in steps:
        model.update_learning_rate(step)
        model.optimizer.zero_grad(set_to_none=True)
        toy_loss(model).backward()
        model.clip_gradients(0.5)
        g = torch.Generator().manual_seed(100 + step)
        n = model.num_points
        torch.manual_seed(step)
        counts = densification.step_post_backward(model, step, torch.randn(2, n, 2, generator=g) * 1e-3,
                                                  torch.randint(0, 3, (2, n), generator=g), 64, 64)
        if step == 3:
            assert min(counts.values()) > 0
        model.optimizer.step()


def test_checkpoint_resume_is_bit_exact():
    cfg = optim_cfg(iterations=10)
    a, a_densify = random_model(n=30, sh_degree=1, seed=4), strategy()
    a.setup_optimizer(cfg, 1.0)
    train_steps(a, a_densify, range(1, 7))

    b, b_densify = random_model(n=30, sh_degree=1, seed=4), strategy()
    b.setup_optimizer(cfg, 1.0)
    train_steps(b, b_densify, range(1, 5))
    b.one_up_sh_degree()
    buffer = io.BytesIO()
    torch.save({"model": b.state_dict(), "densification": b_densify.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert set(saved["model"]) == {"version", "max_sh_degree", "active_sh_degree", "spatial_lr_scale",
                                   "lr_schedule", "params", "optimizer"}  # the model's state only
    c, c_densify = GaussianModel(max_sh_degree=1), strategy()
    c.load_state_dict(saved["model"])
    c_densify.load_state_dict(saved["densification"])
    assert c.active_sh_degree == 1 and c.num_points == b.num_points
    c.active_sh_degree = 0  # a had no SH step-up
    train_steps(c, c_densify, range(5, 7))

    assert_same_params(a, c)
    a_stats, c_stats = a_densify.state_dict(), c_densify.state_dict()
    for name in ("grad2d", "count", "max_radii"):
        assert a_stats[name].shape == (a.num_points,) and torch.equal(a_stats[name], c_stats[name]), name
    for group_a, group_c in zip(a.optimizer.param_groups, c.optimizer.param_groups):
        assert group_a["lr"] == group_c["lr"]
        state_a, state_c = a.optimizer.state[group_a["params"][0]], c.optimizer.state[group_c["params"][0]]
        for key in state_a:
            assert torch.equal(state_a[key], state_c[key]), (group_a["name"], key)
    with pytest.raises(ValueError, match="max_sh_degree"):
        GaussianModel(max_sh_degree=0).load_state_dict(a.state_dict())


def test_a_version_1_state_with_densification_statistics_still_loads():
    """States written before densification moved out (python -m export.mesh reads old runs' checkpoints)."""
    model = random_model(n=5, sh_degree=1)
    old = {**model.state_dict(), "version": 1, "percent_dense": 0.01, "xyz_gradient_accum": torch.zeros(5),
           "denom": torch.zeros(5), "max_radii2D": torch.zeros(5)}
    loaded = GaussianModel(max_sh_degree=1)
    loaded.load_state_dict(old)
    assert_same_params(model, loaded)
    with pytest.raises(ValueError, match="unsupported GaussianModel checkpoint version 3"):
        loaded.load_state_dict({**old, "version": 3})
