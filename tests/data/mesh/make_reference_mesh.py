"""Run at commit 47d3703 (before the issue-20 changes): the reference mesh of tests/test_mesh_speed.py (python tests/data/mesh/make_reference_mesh.py from the repository root)."""
import sys
sys.path.insert(0, '.')
import numpy as np, torch
from export.gaussian_field import opacity_grid
from export.mesh import MeshOptions, mesh_from_gaussians
from export.mesh_texture import bake_texture
from tests.test_mesh_speed import reference_asset, REFERENCE_OPTIONS
g = reference_asset()
grid = opacity_grid(g, REFERENCE_OPTIONS.resolution)
mesh = mesh_from_gaussians(g, REFERENCE_OPTIONS)
tex = bake_texture(g, mesh.vertices, mesh.faces, REFERENCE_OPTIONS)
np.savez_compressed("tests/data/mesh/reference_mesh_47d3703.npz", grid=grid.values.numpy(), vertices=mesh.vertices,
                    faces=mesh.faces, colors=mesh.colors, tex_vertices=tex.vertices, tex_faces=tex.faces, uv=tex.uv,
                    image=tex.image)
print(len(g.means), len(mesh.faces), len(mesh.vertices), tex.image.shape)
