"""The reference mesh of tests/test_mesh_speed.py: run with the code of commit 47d3703 (before the issue-20
speed-ups) from the repository root: python tests/data/mesh/make_reference_mesh.py."""
import sys

sys.path.insert(0, ".")

import numpy as np  # noqa: E402

from export.gaussian_field import opacity_grid  # noqa: E402
from export.mesh import mesh_from_gaussians  # noqa: E402
from export.mesh_texture import bake_texture  # noqa: E402
from tests.test_mesh_speed import REFERENCE_OPTIONS, reference_asset  # noqa: E402

g = reference_asset()
grid = opacity_grid(g, REFERENCE_OPTIONS.resolution)
mesh = mesh_from_gaussians(g, REFERENCE_OPTIONS)
tex = bake_texture(g, mesh.vertices, mesh.faces, REFERENCE_OPTIONS)
np.savez_compressed("tests/data/mesh/reference_mesh_47d3703.npz", grid=grid.values.numpy(), vertices=mesh.vertices,
                    faces=mesh.faces, colors=mesh.colors, tex_vertices=tex.vertices, tex_faces=tex.faces, uv=tex.uv,
                    image=tex.image)
print(len(g.means), len(mesh.faces), len(mesh.vertices), tex.image.shape)
