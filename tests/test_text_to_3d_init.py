"""Shap-E initialisation (scene/text_to_3d_init.py, init_shape: shapee) on a tiny random-weight Shap-E saved
in the diffusers layout, the marching-cubes table the random renderer needs, and the missing-model errors."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import scene.text_to_3d_init as shapee
import train
from bench.random_shap_e import marching_cubes_table, random_shap_e_pipeline
from guidance.prior import ModelNotFoundError
from scene.initialisation import BALL_RADIUS, generator_to_training_frame, initial_points

PROMPT = "a bagel."


@pytest.fixture(scope="module")
def tiny_shapee_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("shap-e") / "tiny-shap-e"
    random_shap_e_pipeline("tiny").save_pretrained(path)
    return path


@pytest.fixture
def small_decode(monkeypatch):
    """2 sampling steps and a 24^3 marching-cubes grid keep the tiny model's runs well under a second."""
    monkeypatch.setattr(shapee, "NUM_STEPS", 2)
    monkeypatch.setattr(shapee, "GRID_SIZE", 24)


def shapee_cfg(model_key, **overrides) -> SimpleNamespace:
    values = dict(init_shape="shapee", init_num_pts=20000, init_prompt=PROMPT, shapee_model_key=str(model_key),
                  use_pointe_rgb=False)
    return SimpleNamespace(**{**values, **overrides})


def drawn_seed(seed: int) -> int:
    """The Shap-E seed initial_points draws first from a generator seeded with `seed`."""
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)).item())


def test_marching_cubes_table_closes_a_sphere():
    from diffusers.pipelines.shap_e.renderer import MeshDecoder

    decoder = MeshDecoder()
    cases, masks = marching_cubes_table()
    decoder.cases.copy_(cases)
    decoder.masks.copy_(masks)
    axis = torch.linspace(-1, 1, 33)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    sdf = 0.6 - (x**2 + y**2 + z**2).sqrt()  # positive inside, as Shap-E's field
    mesh = decoder(sdf, torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([2.0, 2.0, 2.0]))
    radius = mesh.verts.norm(dim=1)
    assert (radius - 0.6).abs().max() < 0.01
    edges = torch.cat([mesh.faces[:, [0, 1]], mesh.faces[:, [1, 2]], mesh.faces[:, [2, 0]]]).sort(dim=1).values
    unique, counts = edges.unique(dim=0, return_counts=True)
    assert (counts == 2).all()  # closed: every edge borders two triangles
    assert mesh.verts.shape[0] - unique.shape[0] + mesh.faces.shape[0] == 2  # Euler characteristic of a sphere


def test_generate_mesh_shapes_ranges_and_seed(tiny_shapee_dir, small_decode):
    pipe = shapee.load_shapee_pipeline(str(tiny_shapee_dir), torch.device("cpu"))
    a = shapee.generate_mesh(pipe, PROMPT, seed=3)
    b = shapee.generate_mesh(pipe, PROMPT, seed=3)
    c = shapee.generate_mesh(pipe, PROMPT, seed=4)
    v, f = a.verts.shape[0], a.faces.shape[0]
    assert v > 100 and a.verts.shape == a.colours.shape == (v, 3) and a.faces.shape == (f, 3)
    assert a.verts.dtype == a.colours.dtype == torch.float64
    assert a.verts.abs().max() <= 1.0 and 0 <= a.faces.min() and a.faces.max() < v
    assert a.colours.min() >= 0 and a.colours.max() <= 1 and a.colours.std() > 0.01
    assert torch.equal(a.verts, b.verts) and torch.equal(a.faces, b.faces) and torch.equal(a.colours, b.colours)
    assert a.verts.shape != c.verts.shape or not torch.equal(a.verts, c.verts)


def test_shapee_init_mirrors_raises_and_expands_the_vertices(tiny_shapee_dir, small_decode):
    pipe = shapee.load_shapee_pipeline(str(tiny_shapee_dir), torch.device("cpu"))
    mesh = shapee.generate_mesh(pipe, PROMPT, drawn_seed(0))
    assert mesh.verts.shape[0] <= 10000  # so every vertex is kept (official rule)
    xyz, rgb = initial_points(shapee_cfg(tiny_shapee_dir), torch.Generator().manual_seed(0))
    per_point = 20000 // 5000
    assert xyz.shape == rgb.shape == (mesh.verts.shape[0] * per_point, 3) and xyz.dtype == torch.float32
    centres = mesh.verts.clone()
    centres[:, 1] = -centres[:, 1]
    centres[:, 2] += 0.15
    offsets = xyz.double().reshape(-1, per_point, 3) - centres[:, None]
    assert offsets.norm(dim=-1).max() <= BALL_RADIUS + 1e-5
    assert torch.allclose(offsets, offsets[:1].expand_as(offsets), atol=1e-5)  # one ball pattern for all
    assert (rgb - 0.5).abs().max() < 0.002  # official grey unless use_pointe_rgb
    _, kept = initial_points(shapee_cfg(tiny_shapee_dir, use_pointe_rgb=True), torch.Generator().manual_seed(0))
    expected = mesh.colours.float()[:, None].expand(-1, per_point, -1).reshape(-1, 3)
    assert (kept - expected).min() >= -1e-6 and (kept - expected).max() <= 1e-4 + 1e-6


def test_shapee_init_draws_4096_vertices_from_a_large_mesh(tiny_shapee_dir, monkeypatch):
    monkeypatch.setattr(shapee, "NUM_STEPS", 2)
    monkeypatch.setattr(shapee, "GRID_SIZE", 40)
    pipe = shapee.load_shapee_pipeline(str(tiny_shapee_dir), torch.device("cpu"))
    mesh = shapee.generate_mesh(pipe, PROMPT, drawn_seed(1))
    assert mesh.verts.shape[0] > 10000
    xyz, _ = initial_points(shapee_cfg(tiny_shapee_dir, init_num_pts=5000), torch.Generator().manual_seed(1))
    assert xyz.shape == (4096, 3)  # one point per ball: 4096 drawn vertices, each moved by the same offset
    replay = torch.Generator().manual_seed(1)
    torch.randint(0, 2**62, (1,), generator=replay)  # the Shap-E seed
    drawn = torch.randperm(mesh.verts.shape[0], generator=replay)[:4096]
    offset = xyz.double() - generator_to_training_frame(mesh.verts[drawn])
    assert drawn.unique().numel() == 4096  # without replacement
    assert torch.allclose(offset, offset[:1].expand_as(offset), atol=1e-5) and offset[0].norm() <= BALL_RADIUS


def test_missing_model_says_what_was_tried_and_how_to_fix_it(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError) as info:
        shapee.check_shapee_available(str(tmp_path / "nope"))
    message = str(info.value)
    assert "GenerateCamParams.shapee_model_key" in message and str(tmp_path / "nope") in message
    assert "save_pretrained" in message and "GenerateCamParams.shapee_model_key=/path/to/shap-e" in message
    (tmp_path / "partial" / "prior").mkdir(parents=True)
    with pytest.raises(ModelNotFoundError, match="lacks the subfolders .*'text_encoder'"):
        shapee.check_shapee_available(str(tmp_path / "partial"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelNotFoundError, match="not cached") as info:
        shapee.check_shapee_available("openai/shap-e")
    assert "HF_HUB_OFFLINE" in str(info.value)
    with pytest.raises(ModelNotFoundError, match="the key is empty"):
        shapee.check_shapee_available("")


def test_hub_id_in_the_offline_cache_is_found(tiny_shapee_dir, tmp_path, monkeypatch):
    """A cached hub id loads with HF_HUB_OFFLINE=1 (the cache laid out as huggingface_hub writes it)."""
    import shutil

    snapshot = tmp_path / "cache" / "models--org--tiny-shap-e" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_shapee_dir, snapshot)
    (tmp_path / "cache" / "models--org--tiny-shap-e" / "refs").mkdir()
    (tmp_path / "cache" / "models--org--tiny-shap-e" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert shapee.locate_shapee("org/tiny-shap-e") == ("org/tiny-shap-e", True)
    pipe = shapee.load_shapee_pipeline("org/tiny-shap-e", torch.device("cpu"))
    assert pipe.prior.config.num_embeddings == 32


def test_train_stops_before_the_run_folder_when_shap_e_is_missing(tmp_path, caplog):
    code = train.main(["--quiet", f"output_dir={tmp_path / 'out'}", "GuidanceParams.prior=analytic",
                       "GenerateCamParams.init_shape=shapee", "GenerateCamParams.init_prompt=a bagel.",
                       f"GenerateCamParams.shapee_model_key={tmp_path / 'nope'}"])
    assert code == 2 and "GenerateCamParams.shapee_model_key" in caplog.text
    assert not (tmp_path / "out").exists()


def test_benchmark_script_smoke(capsys):
    from bench import shap_e_init

    assert shap_e_init.main(["--tiny"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["load", "sample", "decode", "init"]
    assert all(float(row.split("|")[2]) > 0 for row in rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_cuda_mesh_is_deterministic_and_in_range(tiny_shapee_dir, small_decode):
    """On CUDA the pipeline runs in fp16 (the official sampler's precision); the mesh comes back on the CPU."""
    cuda = shapee.load_shapee_pipeline(str(tiny_shapee_dir), torch.device("cuda"))
    assert cuda.prior.dtype == torch.float16
    a = shapee.generate_mesh(cuda, PROMPT, seed=3)
    b = shapee.generate_mesh(cuda, PROMPT, seed=3)
    assert a.verts.shape[0] > 100 and a.verts.device.type == "cpu" and torch.equal(a.verts, b.verts)
    assert a.verts.abs().max() <= 1.0 and 0 <= a.colours.min() and a.colours.max() <= 1
