"""Every user error is a message (exit code 2, no traceback) naming the key, the rule and the value,
made before any heavy work, and leaves no run folder behind."""
import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

import train
from tests.test_train import TINY
from training import run as run_module


def _run(out: Path, *extra, opt=None):
    argv = ([] if opt is None else ["--opt", str(opt)]) + ["--quiet", f"output_dir={out}", *TINY, *extra]
    return train.main(argv)


def _assert_message(caplog, code, *parts):
    assert code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors, caplog.text
    text = "\n".join(r.getMessage() for r in errors)
    for part in parts:
        assert part in text, (part, text)
    assert all(r.exc_info is None for r in caplog.records)  # a message, not a traceback


def _no_run_folder(out: Path) -> bool:
    return not out.exists() or not any(p.is_dir() for p in out.rglob("*"))


def _point_cloud_ply(path: Path) -> Path:
    vertices = np.zeros(4, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    PlyData([PlyElement.describe(vertices, "vertex")]).write(str(path))
    return path


CASES = {
    "ply_sh_degree below sh_degree": (["ModelParams.sh_degree=2", "ply_sh_degree=1"],
                                      ["ply_sh_degree", ">= ModelParams.sh_degree", "ply_sh_degree=1"]),
    "init_num_pts too small": (["GenerateCamParams.init_num_pts=1"],
                               ["GenerateCamParams.init_num_pts must be >= 2", "got 1"]),
    "gsplat on the CPU": (["PipelineParams.renderer=gsplat", "PipelineParams.device=cpu"],
                          ["PipelineParams.renderer is 'gsplat'", "CPU"]),
    "unknown analytic scene": (["GuidanceParams.analytic_scene=castle"],
                               ["GuidanceParams.analytic_scene must be one of", "'castle'"]),
    "point-e not installed": (["GenerateCamParams.init_shape=pointe", "GenerateCamParams.init_num_pts=5000",
                               "GenerateCamParams.init_prompt=a cat"],
                              ["GenerateCamParams.init_shape: pointe needs the point-e package"]),
    "pointe without a prompt": (["GenerateCamParams.init_shape=pointe", "GenerateCamParams.init_num_pts=5000"],
                                ["GenerateCamParams.init_prompt is empty"]),
    "shap-e model missing": (["GenerateCamParams.init_shape=shapee", "GenerateCamParams.init_prompt=a cat",
                              "GenerateCamParams.shapee_model_key=/nonexistent/shap-e"],
                             ["GenerateCamParams.shapee_model_key", "/nonexistent/shap-e"]),
    "mesh file missing": (["GenerateCamParams.init_shape=mesh", "GenerateCamParams.init_path=/nonexistent/a.obj"],
                          ["GenerateCamParams.init_path", "no such mesh"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_and_environment_errors_are_messages(tmp_path, caplog, case):
    overrides, parts = CASES[case]
    out = tmp_path / "out"
    _assert_message(caplog, _run(out, *overrides), *parts)
    assert _no_run_folder(out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path, caplog):
    out = tmp_path / "out"
    _assert_message(caplog, _run(out, "PipelineParams.device=cuda"), "PipelineParams.device is 'cuda'", "auto or cpu")
    assert _no_run_folder(out)


def _sd(tiny_sd_dir, *extra):
    return ("GuidanceParams.prior=stable_diffusion", f"GuidanceParams.model_key={tiny_sd_dir}", *extra)


def test_clip_skip_beyond_the_text_encoder(tmp_path, caplog, tiny_sd_dir):
    out = tmp_path / "out"
    _assert_message(caplog, _run(out, *_sd(tiny_sd_dir, "GuidanceParams.clip_skip=3")),
                    "GuidanceParams.clip_skip must be <= the text encoder's 2 layers", "got 3")
    assert _no_run_folder(out)


def test_missing_textual_inversion_file(tmp_path, caplog, tiny_sd_dir):
    out = tmp_path / "out"
    _assert_message(caplog, _run(out, *_sd(tiny_sd_dir, f"GuidanceParams.textual_inversion_path={tmp_path}/ti.bin")),
                    "GuidanceParams.textual_inversion_path", "ti.bin")
    assert _no_run_folder(out)


def test_lora_without_peft(tmp_path, caplog, tiny_sd_dir, monkeypatch):
    import diffusers.utils

    monkeypatch.setattr(diffusers.utils, "USE_PEFT_BACKEND", False)
    out = tmp_path / "out"
    _assert_message(caplog, _run(out, *_sd(tiny_sd_dir, f"GuidanceParams.LoRA_path={tmp_path}/lora.safetensors")),
                    "GuidanceParams.LoRA_path", "pip install peft")
    assert _no_run_folder(out)


@pytest.mark.parametrize("damage,parts", [
    ("truncate_unet", ["damaged", "unet/diffusion_pytorch_model.safetensors", "truncated"]),
    ("bad_vae_json", ["damaged", "vae/config.json", "not valid JSON"]),
    ("no_text_weights", ["damaged", "text_encoder/: no weights file"]),
])
def test_corrupt_model_folder_is_reported_as_damaged(tmp_path, caplog, tiny_sd_dir, damage, parts):
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    if damage == "truncate_unet":
        weights = model / "unet" / "diffusion_pytorch_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:2000])
    elif damage == "bad_vae_json":
        (model / "vae" / "config.json").write_text("{ not json")
    else:
        for f in (model / "text_encoder").glob("*.safetensors"):
            f.unlink()
    out = tmp_path / "out"
    _assert_message(caplog, _run(out, *_sd(model)), *parts)
    assert "not found" not in caplog.text
    assert _no_run_folder(out)


def _write_splat_files(tmp_path: Path) -> dict[str, Path]:
    garbage = tmp_path / "garbage.ply"
    garbage.write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 10\nproperty float x\n")
    splat = tmp_path / "scene.splat"
    splat.write_bytes(bytes(32 * 5))
    spz = tmp_path / "scene.ply"
    spz.write_bytes(gzip.compress(b"NGSP" + bytes(100)))
    compressed = tmp_path / "scene.compressed.ply"
    chunk = np.zeros(1, dtype=[("min_x", "<f4")])
    packed = np.zeros(4, dtype=[("packed_position", "<u4")])
    PlyData([PlyElement.describe(chunk, "chunk"), PlyElement.describe(packed, "vertex")]).write(str(compressed))
    return {"garbage": garbage, "splat": splat, "spz": spz, "compressed": compressed,
            "points": _point_cloud_ply(tmp_path / "points.ply")}


@pytest.mark.parametrize("kind,parts", [
    ("garbage", ["not a readable PLY file", "truncated or damaged"]),
    ("splat", [".splat file", "convert it to a standard"]),
    ("spz", [".spz", "convert it to a standard"]),
    ("compressed", ["compressed PLY", "convert it to a standard"]),
    ("points", ["not a 3DGS PLY, missing properties", "init_shape=ply"]),
])
def test_unusable_hidden_scene_ply_names_its_format(tmp_path, caplog, kind, parts):
    path = _write_splat_files(tmp_path)[kind]
    out = tmp_path / "out"
    _assert_message(caplog, _run(out, f"GuidanceParams.analytic_scene={path}"), "GuidanceParams.analytic_scene",
                    path.name, *parts)
    assert _no_run_folder(out)


@pytest.mark.parametrize("kind,parts", [("garbage", ["not a readable PLY file"]), ("splat", [".splat file"])])
def test_unusable_initialisation_ply(tmp_path, caplog, kind, parts):
    path = _write_splat_files(tmp_path)[kind]
    out = tmp_path / "out"
    _assert_message(caplog, _run(out, "GenerateCamParams.init_shape=ply", f"GenerateCamParams.init_path={path}"),
                    "GenerateCamParams.init_path", path.name, *parts)
    assert _no_run_folder(out)


@pytest.mark.parametrize("content,parts", [
    (b"\x00\x01\x02\xff\xfe\x80binary", ["not UTF-8 text", "binary file"]),
    ("seed: 3\n".encode("utf-16"), ["not UTF-8 text", "UTF-16"]),
])
def test_binary_or_utf16_config_file(tmp_path, caplog, content, parts):
    opt = tmp_path / "bad.yaml"
    opt.write_bytes(content)
    out = tmp_path / "out"
    _assert_message(caplog, _run(out, opt=opt), "bad.yaml", *parts)
    assert _no_run_folder(out)


def test_output_dir_that_is_a_file(tmp_path, caplog):
    out = tmp_path / "out"
    out.write_text("not a folder")
    _assert_message(caplog, _run(out), f"output_dir {str(out)!r} is a file")
    assert out.read_text() == "not a folder"


def test_read_only_output_dir(tmp_path, caplog, monkeypatch):
    # the test may run as root, for whom chmod does not deny writing: the access check itself is replaced
    monkeypatch.setattr("utils.cli_errors.os.access", lambda path, mode: False)
    out = tmp_path / "out"
    _assert_message(caplog, _run(out), f"output_dir {str(out)!r} is not writable", "read-only")
    assert _no_run_folder(out)


def test_home_in_output_dir_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _run(Path("~/runs"), "OptimizationParams.iterations=1", "save_video=false") == 0
    assert list((tmp_path / "runs").glob("*/*/point_cloud.ply"))
    assert not Path("~").exists()


def test_a_run_that_fails_before_its_first_step_removes_its_folder(tmp_path, monkeypatch):
    def broken(self, step, monitor):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(run_module.TrainingRun, "evaluate", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="evaluation failed"):
        _run(out)
    assert _no_run_folder(out)


def test_pruning_everything_stops_with_a_message(tmp_path, capsys):
    out = tmp_path / "out"
    code = _run(out, "OptimizationParams.min_opacity=0.99", "OptimizationParams.densify_from_iter=1",
                "OptimizationParams.densification_interval=2")
    assert code == 1
    run = next(out.glob("*/*"))
    for text in (capsys.readouterr().err, (run / "train.log").read_text()):
        assert "training stopped at step 2: densify_and_prune would remove all" in text
        assert "Lower OptimizationParams.min_opacity (now 0.99)" in text
        assert "Traceback" not in text
    assert not (run / "point_cloud.ply").exists()
    assert json.loads((run / "metrics.json").read_text())["iterations"] == 1


def test_hidden_scene_ply_needs_the_ply_suffix(tmp_path, caplog):
    from scene.gaussian_model import GaussianModel
    from scene.ply_format import save_gaussian_ply

    path = tmp_path / "scene.PLY"
    xyz = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    save_gaussian_ply(GaussianModel.from_points(xyz, torch.full((3, 3), 0.5), 0), path)
    out = tmp_path / "out"
    _assert_message(caplog, _run(out, f"GuidanceParams.analytic_scene={path}"), "is a 3DGS PLY", "suffix .ply")
    assert _no_run_folder(out)
