"""Tests of scene/initialisation.py: primitive shapes, PLY input, Point-E post-processing and errors, reproducibility
(Shap-E: tests/test_text_to_3d_init.py; mesh files: tests/test_mesh_init.py)."""
from __future__ import annotations

import builtins
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

import scene.initialisation as init
from scene.gaussian_model import SH_C0, GaussianModel
from scene.initialisation import POINTE_MISSING, initial_points
from scene.ply_format import save_gaussian_ply


def camera_cfg(**overrides) -> SimpleNamespace:
    values = dict(init_shape="sphere", init_num_pts=2000, init_prompt="a bagel.", init_path=None,
                  use_pointe_rgb=False, radius_range=[5.2, 5.5])
    values.update(overrides)
    return SimpleNamespace(**values)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


BOXES = {
    "box": ([-0.5, -0.5, -0.5], [0.5, 0.5, 0.5]),
    "rectangle_x": ([-0.3, -0.6, -0.25], [0.3, 0.6, 0.25]),
    "rectangle_z": ([-0.4, -0.3, -0.6], [0.4, 0.3, 0.6]),
}


@pytest.mark.parametrize("shape", sorted(BOXES))
def test_box_shapes_fill_their_bounds(shape):
    xyz, rgb = initial_points(camera_cfg(init_shape=shape), generator())
    low, high = torch.tensor(BOXES[shape][0]), torch.tensor(BOXES[shape][1])
    assert xyz.shape == rgb.shape == (2000, 3) and xyz.dtype == torch.float32
    assert (xyz >= low).all() and (xyz <= high).all()
    span = xyz.amax(0) - xyz.amin(0)
    assert (span > 0.95 * (high - low)).all()


def test_sphere_and_scene_radii_and_grey_colours():
    xyz, rgb = initial_points(camera_cfg(init_shape="sphere"), generator())
    radius = xyz.norm(dim=1)
    assert xyz.shape == (2000, 3) and radius.max() <= 0.5 and radius.max() > 0.49
    # official sampling: r ~ U(0, 0.5), so the median radius is 0.25 (uniform in volume would give 0.40)
    assert abs(radius.median().item() - 0.25) < 0.02
    assert (rgb >= 0.5).all() and (rgb <= 0.5 + SH_C0 / 255 + 1e-7).all()

    xyz, _ = initial_points(camera_cfg(init_shape="scene"), generator())
    radius = xyz.norm(dim=1)
    assert (radius >= 16.5 - 1e-5).all() and (radius < 17.5).all()


def test_same_seed_same_points_other_seed_different():
    for shape in ("sphere", "box"):
        a = initial_points(camera_cfg(init_shape=shape), generator(3))
        b = initial_points(camera_cfg(init_shape=shape), generator(3))
        c = initial_points(camera_cfg(init_shape=shape), generator(4))
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])


def test_ply_point_cloud_input(tmp_path):
    xyz = np.random.default_rng(0).random((10, 3)).astype("f4")
    rgb = np.arange(30, dtype="u1").reshape(10, 3) * 8
    vertices = np.empty(10, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                   ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, name in enumerate("xyz"):
        vertices[name] = xyz[:, i]
    for i, name in enumerate(("red", "green", "blue")):
        vertices[name] = rgb[:, i]
    path = tmp_path / "cloud.ply"
    PlyData([PlyElement.describe(vertices, "vertex")]).write(str(path))
    points, colours = initial_points(camera_cfg(init_shape="ply", init_path=str(path)), generator())
    assert torch.equal(points, torch.from_numpy(xyz))
    assert torch.allclose(colours, torch.from_numpy(rgb / 255.0).float())


def test_ply_round_trip_through_a_3dgs_ply(tmp_path):
    xyz, rgb = initial_points(camera_cfg(init_shape="box", init_num_pts=50), generator())
    model = GaussianModel.from_points(xyz, rgb, max_sh_degree=0)
    path = tmp_path / "point_cloud.ply"
    save_gaussian_ply(model, path, pad_sh_degree=3)
    points, colours = initial_points(camera_cfg(init_shape="ply", init_path=str(path)), generator())
    assert torch.equal(points, xyz)
    assert torch.allclose(colours, rgb, atol=1e-6)
    again = GaussianModel.from_points(points, colours, max_sh_degree=0)
    assert torch.allclose(again._features_dc, model._features_dc, atol=1e-5)
    assert torch.equal(again._scaling, model._scaling)


def test_ply_errors(tmp_path):
    missing = tmp_path / "nope.ply"
    with pytest.raises(FileNotFoundError, match="GenerateCamParams.init_path"):
        initial_points(camera_cfg(init_shape="ply", init_path=str(missing)), generator())
    with pytest.raises(ValueError, match="GenerateCamParams.init_path"):
        initial_points(camera_cfg(init_shape="ply", init_path=None), generator())
    vertices = np.zeros(3, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    path = tmp_path / "uncoloured.ply"
    PlyData([PlyElement.describe(vertices, "vertex")]).write(str(path))
    xyz, rgb = initial_points(camera_cfg(init_shape="ply", init_path=str(path)), generator())  # grey, a warning
    assert xyz.shape == rgb.shape == (3, 3) and (rgb - 0.5).abs().max() < 0.01


def test_pointe_missing_points_to_the_readme(monkeypatch):
    real_import = builtins.__import__

    def no_point_e(name, *args, **kwargs):
        if name == "point_e" or name.startswith("point_e."):
            raise ImportError("No module named 'point_e'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_point_e)
    with pytest.raises(RuntimeError, match="submodules/README.md") as info:
        initial_points(camera_cfg(init_shape="pointe", init_num_pts=100000), generator())
    assert str(info.value) == POINTE_MISSING


def test_unknown_shapes_are_rejected():
    with pytest.raises(ValueError, match="init_shape must be one of"):
        initial_points(camera_cfg(init_shape="torus"), generator())
    with pytest.raises(ValueError, match="init_num_pts"):
        initial_points(camera_cfg(init_num_pts=0), generator())


def test_pointe_post_processing(monkeypatch):
    """Point-E itself is mocked: check the mirror, the z shift and the shared 20-point ball."""
    coords = torch.tensor([[0.1, 0.2, 0.3], [-0.2, 0.0, 0.1]], dtype=torch.float64)
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    monkeypatch.setitem(sys.modules, "point_e", types.ModuleType("point_e"))
    monkeypatch.setattr(init, "_run_pointe", lambda prompt, gen: (coords.clone(), colours.clone()))
    xyz, rgb = initial_points(camera_cfg(init_shape="pointe", init_num_pts=100000), generator())
    assert xyz.shape == rgb.shape == (40, 3)
    centres = torch.tensor([[0.1, -0.2, 0.45], [-0.2, 0.0, 0.25]])
    offsets = xyz.reshape(2, 20, 3) - centres[:, None]
    assert offsets.norm(dim=-1).max() <= 0.05 + 1e-6
    assert torch.allclose(offsets[0], offsets[1], atol=1e-6)  # the same ball around every point
    assert (rgb - 0.5).abs().max() < 0.002  # grey unless use_pointe_rgb
    _, rgb = initial_points(camera_cfg(init_shape="pointe", init_num_pts=100000, use_pointe_rgb=True), generator())
    assert torch.allclose(rgb.reshape(2, 20, 3), colours.float()[:, None].expand(2, 20, 3), atol=1e-4)
