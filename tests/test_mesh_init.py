"""Mesh and point-cloud files as the initial shape (scene/mesh_file.py, init_shape: mesh) and the record of the
initial cloud a run writes (scene/init_preview.py: init/point_cloud.ply and the TensorBoard image)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from scene.camera_sampler import evaluation_ring
from scene.gaussian_model import GaussianModel
from scene.init_preview import record_initial_cloud, save_point_cloud_ply, splat_points
from scene.initialisation import BALL_RADIUS, MESH_POINTS, initial_points
from scene.mesh_file import ColouredMesh, load_mesh_file, sample_surface
from utils.config import Config

CUBE_VERTS = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
CUBE_FACES = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                       [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
CUBE_COLOURS = (CUBE_VERTS + 0.5)  # colour = position + 0.5: a linear field, so interpolation is exact


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write_obj(path, verts, faces, colours):
    lines = [f"v {x} {y} {z} {r} {g} {b}" for (x, y, z), (r, g, b) in zip(verts, colours)]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_ply_mesh(path, verts, faces, colours):
    vertex = np.empty(len(verts), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                         ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, name in enumerate("xyz"):
        vertex[name] = verts[:, i]
    for i, name in enumerate(("red", "green", "blue")):
        vertex[name] = np.round(colours[:, i] * 255)
    face = np.empty(len(faces), dtype=[("vertex_indices", "i4", (3,))])
    face["vertex_indices"] = faces
    PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(face, "face")]).write(str(path))
    return path


def write_textured_glb(path):
    """A unit quad in z = 0 whose texture is red at u < 0.5 and blue at u >= 0.5; vertex 0 sits on red."""
    import trimesh
    from PIL import Image

    texture = np.zeros((4, 4, 3), np.uint8)
    texture[:, :2] = (255, 0, 0)
    texture[:, 2:] = (0, 0, 255)
    verts = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], float)
    uv = np.array([[0.1, 0.5], [0.9, 0.5], [0.9, 0.5], [0.9, 0.5]])
    visual = trimesh.visual.TextureVisuals(uv=uv, image=Image.fromarray(texture))
    trimesh.Trimesh(verts, np.array([[0, 1, 2], [0, 2, 3]]), visual=visual, process=False).export(str(path))
    return path


@pytest.mark.parametrize("writer", [write_obj, write_ply_mesh])
def test_points_lie_on_the_cube_with_their_colours(tmp_path, writer):
    path = writer(tmp_path / f"cube.{'obj' if writer is write_obj else 'ply'}", CUBE_VERTS, CUBE_FACES, CUBE_COLOURS)
    mesh = load_mesh_file(path)
    assert mesh.verts.shape == (8, 3) and mesh.faces.shape == (12, 3) and mesh.colours.shape == (8, 3)
    xyz, rgb = sample_surface(mesh, 3000, gen())
    assert xyz.shape == rgb.shape == (3000, 3)
    on_a_face = ((xyz.abs() - 0.5).abs() < 1e-6).any(dim=1)
    assert on_a_face.all() and xyz.abs().max() <= 0.5 + 1e-6
    assert torch.allclose(rgb, xyz + 0.5, atol=1 / 255 + 1e-6)  # the interpolated vertex colours
    per_face = torch.stack([(xyz[:, i].abs() - 0.5).abs() < 1e-6 for i in range(3)]).float().mean(1)
    assert torch.allclose(per_face, torch.full((3,), 1 / 3), atol=0.04)  # equal-area sides, equal shares


def test_texture_colours_are_read_at_the_vertices(tmp_path):
    mesh = load_mesh_file(write_textured_glb(tmp_path / "quad.glb"))
    assert torch.allclose(mesh.colours[0], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(mesh.colours[1:], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64).expand(3, 3))
    xyz, rgb = sample_surface(mesh, 500, gen())
    # red is vertex 0's barycentric weight: 1 - x in the triangle (0, 1, 2), 1 - y in (0, 2, 3)
    expected_red = 1 - torch.maximum(xyz[:, 0], xyz[:, 1])
    assert torch.allclose(rgb[:, 0], expected_red, atol=1e-6) and torch.allclose(rgb[:, 2], 1 - expected_red, atol=1e-6)


def test_surface_samples_follow_the_triangle_areas():
    verts = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 1, 0], [2, 0, 0], [5, 0, 0], [2, 1, 0]], dtype=torch.float64)
    mesh = ColouredMesh(verts, torch.tensor([[0, 1, 2], [3, 4, 5]]), None)  # areas 0.5 and 1.5
    xyz, rgb = sample_surface(mesh, 8000, gen())
    assert rgb is None
    share_big = (xyz[:, 0] >= 2 - 1e-9).double().mean().item()
    assert abs(share_big - 0.75) < 0.02


def test_point_cloud_file_gives_a_subset_of_its_points(tmp_path):
    points = np.random.default_rng(0).random((50, 3)).astype("f4")
    vertex = np.empty(50, dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for i, name in enumerate("xyz"):
        vertex[name] = points[:, i]
    vertex["red"], vertex["green"], vertex["blue"] = 0, 255, 0
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(tmp_path / "cloud.ply"))
    mesh = load_mesh_file(tmp_path / "cloud.ply")
    assert mesh.faces.shape == (0, 3)
    xyz, rgb = sample_surface(mesh, 20, gen())
    distances = torch.cdist(xyz, torch.from_numpy(points).double()).min(dim=1).values
    assert xyz.shape == (20, 3) and distances.max() < 1e-6 and xyz.unique(dim=0).shape[0] == 20
    assert torch.equal(rgb, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64).expand(20, 3))
    assert sample_surface(mesh, 80, gen())[0].shape == (50, 3)  # fewer points than asked: all of them


def mesh_cfg(path, **overrides) -> SimpleNamespace:
    values = dict(init_shape="mesh", init_path=str(path), init_num_pts=10000, use_pointe_rgb=True,
                  mesh_up_axis="z", mesh_fit_radius=0.0)
    return SimpleNamespace(**{**values, **overrides})


def test_mesh_init_expands_surface_points_to_balls(tmp_path):
    path = write_obj(tmp_path / "cube.obj", CUBE_VERTS, CUBE_FACES, CUBE_COLOURS)
    xyz, rgb = initial_points(mesh_cfg(path), gen())
    assert xyz.shape == rgb.shape == (MESH_POINTS * 2, 3) and xyz.dtype == torch.float32
    assert xyz.abs().max() <= 0.5 + BALL_RADIUS + 1e-5
    assert (rgb >= 0).all() and (rgb <= 1 + 1e-4).all() and rgb.std() > 0.2  # the file's colours kept
    _, grey = initial_points(mesh_cfg(path, use_pointe_rgb=False), gen())
    assert (grey - 0.5).abs().max() < 0.002
    again = initial_points(mesh_cfg(path), gen())
    assert torch.equal(again[0], xyz) and torch.equal(again[1], rgb)


def test_mesh_up_axis_and_fit_radius(tmp_path):
    tall = CUBE_VERTS * np.array([0.2, 2.0, 0.2]) + np.array([3.0, 5.0, 0.0])  # a y-up post away from the origin
    path = write_obj(tmp_path / "post.obj", tall, CUBE_FACES, CUBE_COLOURS)
    xyz, _ = initial_points(mesh_cfg(path, mesh_up_axis="y", mesh_fit_radius=0.5, init_num_pts=5000), gen())
    centred = xyz - 0.5 * (xyz.amin(0) + xyz.amax(0))
    span = xyz.amax(0) - xyz.amin(0)
    assert span[2] > 3 * span[0] and span[2] > 3 * span[1]  # the long y side now stands along z
    assert xyz.norm(dim=1).max() <= 0.5 + BALL_RADIUS + 1e-5 and centred.abs().max() <= 0.5 + BALL_RADIUS
    assert (xyz.mean(0)).abs().max() < 0.06  # bounding box centred on the origin


def test_mesh_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GenerateCamParams.init_path"):
        initial_points(mesh_cfg(tmp_path / "nope.obj"), gen())
    with pytest.raises(ValueError, match="init_path must name"):
        initial_points(mesh_cfg(""), gen())


def test_fewer_points_than_one_ball_each_keep_that_many_surface_points(tmp_path):
    path = write_obj(tmp_path / "cube.obj", CUBE_VERTS, CUBE_FACES, CUBE_COLOURS)
    xyz, rgb = initial_points(mesh_cfg(path, init_num_pts=300), gen())
    assert xyz.shape == (300, 3) and rgb.shape == (300, 3) and torch.isfinite(xyz).all()


def test_saved_initial_cloud_reads_back_through_init_shape_ply(tmp_path):
    xyz = torch.rand(30, 3, generator=gen()) - 0.5
    rgb = torch.rand(30, 3, generator=gen(1))
    path = save_point_cloud_ply(xyz, rgb, tmp_path / "init" / "point_cloud.ply")
    back_xyz, back_rgb = initial_points(SimpleNamespace(init_shape="ply", init_path=str(path)), gen())
    assert torch.equal(back_xyz, xyz) and (back_rgb - rgb).abs().max() <= 0.5 / 255 + 1e-6


def test_splat_draws_the_nearest_point_at_its_pixel():
    cfg = Config().camera
    cameras = evaluation_ring(cfg, 4, False, 64, 64)  # azimuth 0 looks from +y towards the origin
    xyz = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.3, 0.0], [0.4, 0.0, 0.0]])
    rgb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    images = splat_points(xyz, rgb, cameras)
    assert images.shape == (4, 3, 64, 64)
    front = images[0]
    centre = front[:, 32, 32]
    assert torch.equal(centre, torch.tensor([0.0, 1.0, 0.0]))  # the green point is nearer the +y camera
    coloured = (front != 1.0).any(dim=0)
    assert coloured.sum() == 2  # green hides red; blue sits beside them
    back = images[2]
    assert torch.equal(back[:, 32, 32], torch.tensor([1.0, 0.0, 0.0]))  # from -y, red is the nearer one


def test_record_initial_cloud_saves_and_logs(tmp_path):
    cfg = Config().camera
    xyz = torch.rand(200, 3, generator=gen()) - 0.5
    rgb = torch.rand(200, 3, generator=gen(1))
    gaussians = GaussianModel.from_points(xyz, rgb, max_sh_degree=0)
    logged = {}
    monitor = SimpleNamespace(log_images=lambda tag, images, step: logged.update({tag: (images, step)}))
    path = record_initial_cloud(gaussians, cfg, tmp_path, monitor)
    assert path == tmp_path / "init" / "point_cloud.ply"
    back_xyz, back_rgb = initial_points(SimpleNamespace(init_shape="ply", init_path=str(path)), gen())
    assert torch.equal(back_xyz, xyz) and (back_rgb - rgb).abs().max() <= 0.5 / 255 + 1e-5
    images, step = logged["init/point_cloud"]
    assert step == 0 and images.shape == (4, 3, 256, 256) and (images < 1).any()


def test_a_run_from_a_mesh_file_records_its_start(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import train

    path = write_obj(tmp_path / "cube.obj", CUBE_VERTS, CUBE_FACES, CUBE_COLOURS)
    code = train.main(["--quiet", f"output_dir={tmp_path / 'out'}", "GuidanceParams.prior=analytic",
                       "GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32",
                       "OptimizationParams.iterations=1", "save_video=false", "export_mesh=false",
                       "GenerateCamParams.init_shape=mesh",
                       f"GenerateCamParams.init_path={path}",
                       "GenerateCamParams.init_num_pts=5000", "GenerateCamParams.use_pointe_rgb=true"])
    assert code == 0
    (run,) = [p for p in (tmp_path / "out").glob("*/*") if p.is_dir()]
    xyz, rgb = initial_points(SimpleNamespace(init_shape="ply", init_path=str(run / "init" / "point_cloud.ply")), gen())
    assert xyz.shape == (MESH_POINTS, 3) and rgb.std() > 0.2  # the cube's coloured surface, one point per ball
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert "init/point_cloud" in events.Tags()["images"]


def test_resume_reads_the_gaussians_from_the_checkpoint_not_the_mesh_file(tmp_path):
    import train

    path = write_obj(tmp_path / "cube.obj", CUBE_VERTS, CUBE_FACES, CUBE_COLOURS)
    args = ["--quiet", f"output_dir={tmp_path / 'out'}", "GuidanceParams.prior=analytic", "save_video=false",
            "export_mesh=false",
            "GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32", "OptimizationParams.iterations=1",
            "GenerateCamParams.init_shape=mesh", f"GenerateCamParams.init_path={path}",
            "GenerateCamParams.init_num_pts=5000"]
    assert train.main(args) == 0
    (run,) = [p for p in (tmp_path / "out").glob("*/*") if p.is_dir()]
    path.unlink()  # a resumed run must not need the initial shape again (nor re-run Point-E / Shap-E)
    assert train.main(["--quiet", "--resume", str(run), "OptimizationParams.iterations=2"]) == 0


def test_config_requires_the_inputs_of_each_initial_shape():
    from utils.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="init_shape is 'mesh' but GenerateCamParams.init_path is not set"):
        load_config(None, ["GenerateCamParams.init_shape=mesh"], warn_no_effect=False)
    with pytest.raises(ConfigError, match="init_shape is 'shapee' but GenerateCamParams.init_prompt is empty"):
        load_config(None, ["GenerateCamParams.init_shape=shapee"], warn_no_effect=False)
    with pytest.raises(ConfigError, match="GenerateCamParams.mesh_up_axis"):
        load_config(None, ["GenerateCamParams.mesh_up_axis=x"], warn_no_effect=False)
    with pytest.raises(ConfigError, match="GenerateCamParams.mesh_fit_radius"):
        load_config(None, ["GenerateCamParams.mesh_fit_radius=-1"], warn_no_effect=False)
    cfg = load_config(None, ["GenerateCamParams.init_shape=shapee", "GenerateCamParams.init_prompt=a cat."],
                      warn_no_effect=False)
    assert cfg.camera.shapee_model_key == "openai/shap-e"


def test_material_colour_and_uncoloured_files(tmp_path):
    import trimesh

    box = trimesh.creation.box()
    box.visual = trimesh.visual.TextureVisuals(
        material=trimesh.visual.material.PBRMaterial(baseColorFactor=[200, 50, 50, 255]))
    box.export(str(tmp_path / "material.glb"))
    mesh = load_mesh_file(tmp_path / "material.glb")
    expected = torch.tensor([200, 50, 50], dtype=torch.float64) / 255
    assert torch.allclose(mesh.colours, expected.expand_as(mesh.colours))
    trimesh.creation.box().export(str(tmp_path / "plain.glb"))
    assert load_mesh_file(tmp_path / "plain.glb").colours is None
    _, rgb = initial_points(mesh_cfg(tmp_path / "plain.glb", init_num_pts=5000), gen())
    assert (rgb - 0.5).abs().max() < 0.002  # use_pointe_rgb with nothing to keep: grey
