"""Export axis conventions: exact rotations of Gaussians (means, orientations, SH) and PLY up axes."""
import os
import stat

import pytest
import torch
from plyfile import PlyData

from scene.gaussian_model import GaussianModel, quat_to_rotmat
from scene.orientation import UP_AXES, rotate_gaussians, rotmat_to_quat, world_to_export
from scene.ply_format import load_gaussian_ply, save_gaussian_ply
from scene.spherical_harmonics import spherical_harmonics


def _random_rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.sign(torch.det(q))


@pytest.mark.parametrize("up_axis", UP_AXES)
def test_export_rotation_puts_up_and_front_where_the_convention_says(up_axis):
    rot = world_to_export(up_axis)
    assert torch.det(rot).item() == pytest.approx(1.0)
    up, front = rot @ torch.tensor([0.0, 0.0, 1.0]), rot @ torch.tensor([0.0, 1.0, 0.0])
    expected_up = {"y": [0.0, 1.0, 0.0], "-y": [0.0, -1.0, 0.0], "z": [0.0, 0.0, 1.0]}[up_axis]
    assert up.tolist() == expected_up
    assert front.tolist() == ([0.0, 1.0, 0.0] if up_axis == "z" else [0.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="up_axis"):
        world_to_export("x")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotmat_to_quat_inverts_quat_to_rotmat(seed):
    rot = _random_rotation(seed)
    assert torch.allclose(quat_to_rotmat(rotmat_to_quat(rot)[None])[0], rot, atol=1e-12)
    for axis in UP_AXES:
        r = world_to_export(axis)
        assert torch.allclose(quat_to_rotmat(rotmat_to_quat(r)[None])[0], r, atol=1e-6)


def test_rotated_gaussians_look_the_same_from_rotated_directions():
    """Colour f'(R d) == f(d) for degree-3 SH and covariances R Sigma R^T."""
    g = torch.Generator().manual_seed(0)
    rot = _random_rotation(3)
    means = torch.randn(6, 3, generator=g, dtype=torch.float64)
    quats = torch.randn(6, 4, generator=g, dtype=torch.float64)
    sh = torch.randn(6, 16, 3, generator=g, dtype=torch.float64)
    new_means, new_quats, new_sh = rotate_gaussians(means, quats, sh, rot)
    dirs = torch.nn.functional.normalize(torch.randn(6, 3, generator=g, dtype=torch.float64), dim=-1)
    assert torch.allclose(spherical_harmonics(3, dirs @ rot.T, new_sh), spherical_harmonics(3, dirs, sh), atol=1e-10)
    assert torch.allclose(new_means, means @ rot.T)
    assert torch.allclose(quat_to_rotmat(new_quats), rot @ quat_to_rotmat(quats), atol=1e-12)


def test_ply_records_its_up_axis_round_trips_and_is_world_readable(tmp_path):
    model = GaussianModel.from_points(torch.randn(40, 3), torch.rand(40, 3), max_sh_degree=2)
    with torch.no_grad():
        model._features_rest.normal_(generator=torch.Generator().manual_seed(1))
    path = tmp_path / "out.ply"
    save_gaussian_ply(model, path, pad_sh_degree=3, up_axis="-y")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    ply = PlyData.read(str(path))
    assert "up_axis -y" in ply.comments
    # In the file the training world's +z (up) is -y: the highest Gaussian has the lowest file y.
    top = int(model.means[:, 2].argmax())
    assert ply["vertex"]["y"][top] == pytest.approx(-float(model.means[top, 2]))
    loaded = load_gaussian_ply(path, max_sh_degree=2)
    assert torch.allclose(loaded.means, model.means, atol=1e-6)
    assert torch.allclose(loaded.features, model.features, atol=1e-5)
    assert torch.allclose(quat_to_rotmat(loaded.quats), quat_to_rotmat(model.quats), atol=1e-5)


def test_ply_without_a_recorded_axis_uses_the_given_one(tmp_path):
    model = GaussianModel.from_points(torch.randn(10, 3), torch.rand(10, 3), max_sh_degree=0)
    ours, path = tmp_path / "ours.ply", tmp_path / "foreign.ply"
    save_gaussian_ply(model, ours, up_axis="-y")
    ply = PlyData.read(str(ours))
    ply.comments = []
    ply.write(str(path))
    as_world = load_gaussian_ply(path)
    assert torch.allclose(as_world.means, model.means @ world_to_export("-y").T, atol=1e-6)
    assert torch.allclose(load_gaussian_ply(path, file_up_axis="-y").means, model.means, atol=1e-6)


def test_turntable_views_are_upright():
    """The evaluation ring (turntable video, test views) has the world's +z at the top of the image:
    the snowman's small head (z = 0.15) is drawn above its large body (z = -0.3)."""
    from types import SimpleNamespace

    from gaussian_renderer import render
    from guidance.analytic_prior import procedural_scene
    from scene.camera_sampler import evaluation_ring

    cfg = SimpleNamespace(image_w=48, image_h=48, default_polar=90.0, default_radius=3.0, default_fovy=0.6)
    out = render(procedural_scene("snowman"), evaluation_ring(cfg, 4, False), torch.ones(3), backend="torch")
    coverage = out.alpha[:, 0].sum(dim=2)  # [B, H] covered pixels per image row
    top, bottom = coverage[:, :24].sum(1), coverage[:, 24:].sum(1)
    assert bool((bottom > 1.5 * top).all()) and bool((top > 0).all())
