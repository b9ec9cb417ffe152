"""Mesh export on CPU: the opacity field, marching cubes, clean-up, colours, files read back by trimesh."""
import json
import math
import os
import stat

import numpy as np
import pytest
import torch

from export.gaussian_field import opacity_grid
from export.mesh import MeshOptions, export_mesh, find_source, main, mesh_from_gaussians, obj_texture_size
from export.mesh_render import rasterize, render_mesh
from gaussian_renderer.types import GaussianTensors
from scene.camera_sampler import orbit_cameras
from scene.gaussian_model import GaussianModel, rgb_to_sh
from scene.ply_format import save_gaussian_ply


def _column(height: float = 1.2, radius: float = 0.25, per_axis: int = 6) -> GaussianTensors:
    """A tall (along world z) column of opaque Gaussians: red bottom half, blue top half."""
    zs = torch.linspace(-height / 2, height / 2, 4 * per_axis)
    xy = torch.linspace(-radius, radius, per_axis)
    grid = torch.stack(torch.meshgrid(xy, xy, zs, indexing="ij"), dim=-1).reshape(-1, 3)
    means = grid[grid[:, :2].norm(dim=1) <= radius + 1e-6]
    n = means.shape[0]
    colors = torch.where((means[:, 2] > 0)[:, None], torch.tensor([0.1, 0.2, 0.9]), torch.tensor([0.9, 0.1, 0.1]))
    return GaussianTensors(means=means, quats=torch.tensor([1.0, 0, 0, 0]).expand(n, 4).contiguous(),
                           scales=torch.full((n, 3), 0.06), opacities=torch.full((n,), 0.95),
                           sh_coeffs=rgb_to_sh(colors)[:, None], sh_degree=0)


def test_opacity_field_of_one_gaussian_matches_the_formula():
    gaussian = GaussianTensors(means=torch.zeros(1, 3), quats=torch.tensor([[1.0, 0, 0, 0]]),
                               scales=torch.tensor([[0.1, 0.15, 0.2]]), opacities=torch.tensor([0.8]),
                               sh_coeffs=torch.zeros(1, 1, 3), sh_degree=0)
    grid = opacity_grid(gaussian, 21)  # 3 sigma = 10 voxels: within max_radius, nothing cut
    index = torch.stack(torch.meshgrid(*[torch.arange(21.0)] * 3, indexing="ij"), dim=-1)
    x = grid.to_world(index)
    m = (x / torch.tensor([0.1, 0.15, 0.2])).square().sum(-1)
    expected = torch.where(m <= 9.0, 0.8 * torch.exp(-0.5 * m), torch.zeros(()))
    assert torch.allclose(grid.values, expected, atol=1e-5)
    assert float(grid.values.max()) == pytest.approx(0.8, abs=0.05)


def test_rasterizer_covers_a_square_exactly_and_keeps_the_nearest_face():
    cams = orbit_cameras(torch.tensor([4.0]), torch.tensor([90.0]), torch.tensor([0.0]),
                         torch.tensor([math.radians(40.0)]), 32, 32)
    # camera on +y looking at the origin: a square in the x-z plane at y = 0, another behind it.
    square = torch.tensor([[-0.5, 0.0, -0.5], [0.5, 0.0, -0.5], [0.5, 0.0, 0.5], [-0.5, 0.0, 0.5]])
    vertices = torch.cat([square, square * torch.tensor([2.0, 1.0, 2.0]) - torch.tensor([0.0, 1.0, 0.0])])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    colors = torch.cat([torch.tensor([[1.0, 0, 0]]).expand(4, 3), torch.tensor([[0, 0, 1.0]]).expand(4, 3)])
    rgb, mask = render_mesh(vertices, faces, colors, cams, torch.ones(3))
    focal = 16 / math.tan(math.radians(20.0))
    half = 0.5 * focal / 4.0  # projected half-width of the front square, pixels
    expected_front = (2 * round(half)) ** 2
    front = (rgb[0, 0] > 0.99) & (rgb[0, 2] < 0.01)
    assert abs(int(front.sum()) - expected_front) <= 4 * 2 * round(half)  # up to a pixel row per edge
    assert bool(front[16, 16]) and float(mask[0, 0, 16, 16]) == 1.0
    frags = rasterize(vertices, faces, cams)
    assert float(frags.depth[0, 16, 16]) == pytest.approx(4.0, rel=1e-4)
    assert torch.allclose(frags.bary[frags.face >= 0].sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("bake_views", [0, 4])
def test_mesh_of_a_column_is_closed_coloured_and_renders_like_the_splats(bake_views):
    column = _column()
    mesh = mesh_from_gaussians(column, MeshOptions(resolution=48, faces=3000, bake_views=bake_views, bake_size=96))
    assert 0 < len(mesh.faces) <= 3100
    extent = np.ptp(mesh.vertices, axis=0)
    assert extent[2] > 2.0 * extent[0]  # tall along the training world's z
    top, bottom = mesh.vertices[:, 2] > 0.3, mesh.vertices[:, 2] < -0.3
    assert mesh.colors[top].mean(0)[2] > 0.7 and mesh.colors[bottom].mean(0)[0] > 0.7
    cams = orbit_cameras(torch.full((4,), 3.5), torch.full((4,), 80.0), torch.arange(4) * 90.0,
                         torch.full((4,), 0.6), 48, 48)
    from gaussian_renderer import render

    splat = render(column, cams, torch.ones(3), backend="torch")
    _, mask = render_mesh(torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.faces),
                          torch.from_numpy(mesh.colors), cams, torch.ones(3))
    gs, ms = splat.alpha > 0.5, mask > 0.5
    assert float((gs & ms).sum() / (gs | ms).sum()) > 0.8


def test_baked_colours_come_from_the_views_that_see_the_surface():
    from export.mesh import vertex_normals
    from export.mesh_bake import bake_views, rendered_colors

    mesh = mesh_from_gaussians(_column(), MeshOptions(resolution=40, faces=2000, bake_views=0))
    normals = vertex_normals(mesh.vertices, mesh.faces)
    cams = bake_views(mesh.vertices, 4, 64)
    assert len(cams) == 16 and bool((cams.polar_deg == 45.0).any())
    colors, seen = rendered_colors(_column(), mesh.vertices, normals, mesh.vertices, mesh.faces, cams, 0.05)
    assert seen.mean() > 0.9
    top, bottom = seen & (mesh.vertices[:, 2] > 0.3), seen & (mesh.vertices[:, 2] < -0.3)
    assert colors[top].mean(0)[2] > 0.7 and colors[bottom].mean(0)[0] > 0.7
    # a point hidden inside the column is seen by no view
    _, hidden = rendered_colors(_column(), np.zeros((1, 3), np.float32), np.array([[1.0, 0.0, 0.0]], np.float32),
                                mesh.vertices, mesh.faces, cams, 0.05)
    assert not hidden[0]


def test_small_floaters_are_dropped():
    column = _column()
    offsets = 0.02 * torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    floater = GaussianTensors(means=torch.tensor([0.0, 0.0, 1.2]) + offsets,
                              quats=torch.tensor([1.0, 0, 0, 0]).expand(8, 4), scales=torch.full((8, 3), 0.03),
                              opacities=torch.full((8,), 0.95), sh_coeffs=torch.zeros(8, 1, 3), sh_degree=0)
    both = GaussianTensors(*(torch.cat([getattr(column, f), getattr(floater, f)])
                             for f in ("means", "quats", "scales", "opacities", "sh_coeffs")), sh_degree=0)
    kept = mesh_from_gaussians(both, MeshOptions(resolution=48, faces=0, bake_views=0))
    assert kept.vertices[:, 2].max() < 0.9
    with_floater = mesh_from_gaussians(both, MeshOptions(resolution=48, faces=0, min_component=0.0, bake_views=0))
    assert with_floater.vertices[:, 2].max() > 1.1


def test_glb_opens_in_trimesh_upright_with_vertex_colours(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    files = export_mesh(_column(), tmp_path / "mesh", MeshOptions(resolution=40, faces=2000, bake_views=0), {"step": 7})
    for path in [files["glb"], files["obj"], files["obj"].with_suffix(".mtl")]:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    scene = trimesh.load(files["glb"])
    assert scene.metadata["up_axis"] == "+Y" and scene.metadata["step"] == 7
    mesh = next(iter(scene.geometry.values()))
    size = mesh.bounds[1] - mesh.bounds[0]
    assert size[1] > 2.0 * max(size[0], size[2])  # the tall axis is glTF's +Y
    colors = mesh.visual.vertex_attributes["color"][:, :3].astype(float) / 255.0  # COLOR_0, linear
    up = mesh.vertices[:, 1]
    assert colors[up > 0.3].mean(0)[2] > 0.7 and colors[up < -0.3].mean(0)[0] > 0.7  # blue top, red bottom
    assert colors[up > 0.3].mean(0)[1] < 0.1  # sRGB 0.2 green stored as linear 0.033
    assert b"KHR_materials_unlit" in files["glb"].read_bytes()[:4096]
    obj = trimesh.load(files["obj"], process=False)
    assert obj.faces.shape == mesh.faces.shape and np.allclose(obj.bounds, mesh.bounds, atol=1e-4)


def test_the_default_obj_carries_its_colours_in_a_texture_its_mtl_names(tmp_path):
    """Blender and three.js's OBJLoader ignore "v x y z r g b" once a material is used: the OBJ written by
    default (texture=0, per-vertex colours in the GLB) has UVs and a map_Kd texture with the colours."""
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("xatlas")
    files = export_mesh(_column(), tmp_path, MeshOptions(resolution=32, faces=1500, bake_views=2, bake_size=64))
    mtl = (tmp_path / "mesh.mtl").read_text().splitlines()
    (texture_name,) = [line.split()[1] for line in mtl if line.startswith("map_Kd ")]
    assert "Kd 1 1 1" in mtl and (tmp_path / texture_name).is_file()
    text = files["obj"].read_text()
    assert "mtllib mesh.mtl" in text and "\nvt " in text and "\nusemtl " in text
    obj = trimesh.load(files["obj"], process=False)
    image = np.asarray(obj.visual.material.image.convert("RGB")).astype(float) / 255.0
    assert image.shape[0] == obj_texture_size(len(obj.faces))
    rows = np.clip(((1.0 - obj.visual.uv[:, 1]) * image.shape[0]).astype(int), 0, image.shape[0] - 1)
    cols = np.clip((obj.visual.uv[:, 0] * image.shape[1]).astype(int), 0, image.shape[1] - 1)
    colors, up = image[rows, cols], obj.vertices[:, 1]
    assert colors[up > 0.3].mean(0)[2] > 0.7 and colors[up < -0.3].mean(0)[0] > 0.7  # blue top, red bottom
    glb = next(iter(trimesh.load(files["glb"]).geometry.values()))
    assert "color" in glb.visual.vertex_attributes  # the GLB keeps its per-vertex colours (COLOR_0) ...
    assert getattr(glb.visual.material, "baseColorTexture", None) is None  # ... and has no texture


def test_obj_texture_size_gives_each_face_about_64_texels():
    assert [obj_texture_size(f) for f in (0, 1000, 1024, 1025, 4096, 4097, 50000)] == [256, 256, 256, 512, 512,
                                                                                       1024, 1024]


def test_command_meshes_an_interrupted_run_from_its_newest_state(tmp_path, capsys):
    run = tmp_path / "run"
    model = GaussianModel(0)
    column = _column()
    model = GaussianModel.from_points(column.means, torch.full_like(column.means, 0.5), 0)
    with torch.no_grad():
        model._opacity.fill_(3.0)
        model._scaling.fill_(math.log(0.06))
    save_gaussian_ply(model, run / "point_cloud" / "iteration_100" / "point_cloud.ply", up_axis="-y")
    old = GaussianModel.from_points(torch.randn(30, 3), torch.rand(30, 3), 0)
    save_gaussian_ply(old, run / "point_cloud" / "iteration_50" / "point_cloud.ply")
    assert find_source(run) == (run / "point_cloud" / "iteration_100" / "point_cloud.ply", 100)
    assert main([str(run), "--resolution", "40", "--faces", "1500", "--bake-views", "0"]) == 0
    written = json.loads(capsys.readouterr().out)
    trimesh = pytest.importorskip("trimesh")
    mesh = trimesh.load(written["glb"], force="mesh")
    size = mesh.bounds[1] - mesh.bounds[0]
    assert size[1] > 2.0 * size[0]  # the -y PLY was read back into the world before export


def test_browser_check_pixel_test_tells_upright_from_upside_down_and_empty(tmp_path):
    from PIL import Image

    from bench.browser_check import inspect

    img = np.full((64, 64, 3), 255, np.uint8)
    img[8:32, 24:36] = (30, 40, 230)  # blue top
    img[32:56, 24:36] = (230, 30, 30)  # red bottom
    Image.fromarray(img).save(tmp_path / "up.png")
    Image.fromarray(img[::-1].copy()).save(tmp_path / "down.png")
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.ascontiguousarray(img.transpose(1, 0, 2))).save(tmp_path / "lying.png")
    up = inspect(tmp_path / "up.png", test_object=True)
    assert up["ok"] and (up["silhouette_height"], up["silhouette_width"]) == (48, 12)
    assert not inspect(tmp_path / "down.png", test_object=True)["ok"]
    assert not inspect(tmp_path / "empty.png", test_object=True)["ok"]
    assert not inspect(tmp_path / "lying.png", test_object=True)["ok"]


def test_baked_texture_carries_the_colours_in_glb_and_obj(tmp_path):
    trimesh = pytest.importorskip("trimesh")
    pytest.importorskip("xatlas")
    files = export_mesh(_column(), tmp_path, MeshOptions(resolution=32, faces=1500, texture=256, bake_views=2,
                                                         bake_size=64))
    assert (tmp_path / "mesh.mtl").read_text().count("Kd 1 1 1") == 1
    for loaded in (next(iter(trimesh.load(files["glb"]).geometry.values())), trimesh.load(files["obj"], process=False)):
        material = loaded.visual.material
        texture = material.baseColorTexture if hasattr(material, "baseColorTexture") else material.image
        image = np.asarray(texture.convert("RGB")).astype(float) / 255.0
        uv = loaded.visual.uv
        rows = np.clip(((1.0 - uv[:, 1]) * image.shape[0]).astype(int), 0, image.shape[0] - 1)
        cols = np.clip((uv[:, 0] * image.shape[1]).astype(int), 0, image.shape[1] - 1)
        colors = image[rows, cols]
        up = loaded.vertices[:, 1]
        assert colors[up > 0.3].mean(0)[2] > 0.7 and colors[up < -0.3].mean(0)[0] > 0.7  # blue top, red bottom
