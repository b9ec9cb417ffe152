"""The faster final outputs (issue 20) give the mesh the code before them gave: same vertices, faces, colours
and texture on the same Gaussians."""
import math
from pathlib import Path

import numpy as np
import torch

from export.gaussian_field import opacity_grid
from export.mesh import MeshOptions, _mesh_and_sources, mesh_from_gaussians
from export.mesh_bake import bake_views, baked_colors, rendered_colors
from export.mesh_colors import color_sources, vertex_normals
from export.mesh_render import depth_buffer, rasterize
from export.mesh_texture import bake_texture
from gaussian_renderer.types import GaussianTensors
from scene.camera_sampler import orbit_cameras
from scene.gaussian_model import rgb_to_sh

REFERENCE_OPTIONS = MeshOptions(resolution=40, faces=1500, bake_views=3, bake_size=64, texture=128)


def reference_asset(n: int = 1500) -> GaussianTensors:
    """A small trained-looking asset: Gaussians on a torus (radii 0.6, 0.25), flattened onto its surface,
    varied colours, opacities 0.6-1, and 5% large faint ones (the kind a trained asset has)."""
    g = torch.Generator().manual_seed(0)
    u, v = 2 * math.pi * torch.rand(n, generator=g), 2 * math.pi * torch.rand(n, generator=g)
    normal = torch.stack([u.cos() * v.cos(), u.sin() * v.cos(), v.sin()], dim=-1)  # [n, 3]
    means = 0.6 * torch.stack([u.cos(), u.sin(), torch.zeros(n)], dim=-1) + 0.25 * normal
    scales = 0.06 * torch.exp(0.3 * torch.randn(n, 3, generator=g))
    faint = torch.rand(n, generator=g) < 0.05
    scales[faint] *= 4.0
    opacity = torch.where(faint, 0.05 + 0.3 * torch.rand(n, generator=g), 0.6 + 0.4 * torch.rand(n, generator=g))
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    colors = 0.5 + 0.4 * torch.stack([u.sin(), v.cos(), (u + v).sin()], dim=-1)
    return GaussianTensors(means=means, quats=quats, scales=scales, opacities=opacity,
                           sh_coeffs=rgb_to_sh(colors)[:, None], sh_degree=0)


REFERENCE = Path(__file__).parent / "data" / "mesh" / "reference_mesh_47d3703.npz"


def _exported_meshes(gaussians: GaussianTensors, options: MeshOptions):
    """The coloured mesh and the textured mesh, as export_mesh makes them (one bake for both)."""
    mesh, sources = _mesh_and_sources(gaussians, options)
    return mesh, bake_texture(gaussians, mesh.vertices, mesh.faces, options, sources)


def test_mesh_and_texture_equal_those_of_the_code_before_the_speed_up():
    """Known answer: tests/data/mesh/make_reference_mesh.py ran the code of commit 47d3703 on this asset."""
    ref = np.load(REFERENCE)
    gaussians = reference_asset()
    grid = opacity_grid(gaussians, REFERENCE_OPTIONS.resolution)
    np.testing.assert_allclose(grid.values.numpy(), ref["grid"], rtol=0, atol=1e-6)
    mesh, textured = _exported_meshes(gaussians, REFERENCE_OPTIONS)
    np.testing.assert_array_equal(mesh.faces, ref["faces"])
    np.testing.assert_allclose(mesh.vertices, ref["vertices"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(mesh.colors, ref["colors"], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(textured.faces, ref["tex_faces"])
    np.testing.assert_allclose(textured.uv, ref["uv"], rtol=0, atol=1e-6)
    assert np.abs(textured.image.astype(int) - ref["image"]).max() <= 1  # 8-bit texels: a rounding step at most
    assert (textured.image != ref["image"]).mean() < 1e-3


def test_the_texture_reuses_the_vertex_bake_because_xatlas_keeps_the_triangles():
    """The shared bake is valid: the UV-split mesh has the same triangles, corner by corner, so the same
    z-buffer, and colours from the shared renders equal colours from renders made afresh."""
    gaussians = reference_asset()
    options = REFERENCE_OPTIONS
    mesh, sources = _mesh_and_sources(gaussians, options)
    bake = sources.bake
    textured = bake_texture(gaussians, mesh.vertices, mesh.faces, options, sources)
    np.testing.assert_array_equal(textured.vertices[textured.faces], mesh.vertices[mesh.faces])
    fresh = color_sources(gaussians, textured.vertices, textured.faces, options).bake
    assert torch.equal(fresh.depth, bake.depth) and torch.equal(fresh.rgb, bake.rgb)
    assert bool(torch.isfinite(bake.depth).any())  # the mesh is in view
    normals = vertex_normals(textured.vertices, textured.faces)
    shared = baked_colors(bake, textured.vertices, normals, 0.05)
    again = rendered_colors(gaussians, textured.vertices, normals, textured.vertices, textured.faces,
                            bake.cameras, 0.05)
    np.testing.assert_array_equal(shared[0], again[0])
    np.testing.assert_array_equal(shared[1], again[1])
    assert shared[1].mean() > 0.5  # most vertices are seen


def test_depth_buffer_equals_the_rasterizers_depth_for_small_large_and_clipped_faces():
    mesh = mesh_from_gaussians(reference_asset(), MeshOptions(resolution=40, faces=200, bake_views=0))
    vertices, faces = torch.from_numpy(mesh.vertices), torch.from_numpy(mesh.faces)
    # a ring of bake views; close views where the mesh overflows the image; one inside the torus's hole
    cams = bake_views(mesh.vertices, 3, 48)
    close = orbit_cameras(torch.tensor([1.2, 0.7, 0.3]), torch.tensor([60.0, 90.0, 90.0]),
                          torch.tensor([0.0, 45.0, 10.0]), torch.full((3,), 0.9), 40, 32)
    for cameras in (cams, close):
        expected = rasterize(vertices, faces, cameras).depth
        got = depth_buffer(vertices, faces, cameras)
        assert got.shape == expected.shape
        assert bool(torch.isfinite(expected).any()) and bool(torch.isinf(expected).any())
        assert torch.equal(got, expected)
