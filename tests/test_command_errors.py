"""Every command keeps train.py's promise on bad input: one message naming the file or key, what is wrong
and what to do; exit code 2; no traceback; nothing left behind (no new folder, no temporary file).

Each case runs a command's main(argv) in-process (fast); test_a_real_process_* run two in a subprocess.
"""
import errno
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

import train
from evaluation import clip_score, fid
from export import mesh as mesh_export
from tests.sweep_helpers import TINY_ANALYTIC
from training.sweep import report as sweep_report
from training.sweep import worker as sweep
from training.sweep.plan import SweepPlan

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {"train": train.main, "sweep": sweep.main, "report": sweep_report.main, "mesh": mesh_export.main,
            "fid": fid.main, "clip": clip_score.main}
TINY = [*TINY_ANALYTIC, "OptimizationParams.iterations=1"]


# ---------------------------------------------------------------------- bad files


def _text(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def _points(path: Path, n: int = 50, nan: bool = False, scale: float = 1.0) -> Path:
    """A point-cloud PLY (x, y, z only: no colours)."""
    v = np.zeros(n, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4")])
    rng = np.random.default_rng(0)
    for axis in "xyz":
        v[axis] = (rng.random(n) - 0.5) * scale
    if nan and n:
        v["x"][0] = np.nan
    PlyData([PlyElement.describe(v, "vertex")]).write(str(path))
    return path


def _splats(path: Path, n: int = 20, nan: bool = False, opacity_logit: float = 4.0) -> Path:
    """A 3DGS PLY (train.py's format); 0 Gaussians, a NaN position or all transparent on request."""
    from scene.gaussian_model import GaussianModel
    from scene.ply_format import save_gaussian_ply

    model = GaussianModel.from_points(torch.rand(max(n, 2), 3) * 0.5 - 0.25, torch.full((max(n, 2), 3), 0.5), 0)
    with torch.no_grad():
        model._opacity.fill_(opacity_logit)
        if nan:
            model._means[0, 0] = float("nan")
    save_gaussian_ply(model, path)
    if n == 0:  # the same header, no vertices
        ply = PlyData.read(str(path))
        PlyData([PlyElement.describe(ply["vertex"].data[:0], "vertex")]).write(str(path))
    return path


def _sweep_folder(tmp_path: Path) -> Path:
    prompts = _text(tmp_path / "prompts.txt", "a red apple\n")
    plan = SweepPlan.build(tmp_path / "sw", prompts, ["sctd"], [0], None, TINY_ANALYTIC)
    plan.write_manifest()
    return plan.root


def _run_folder(tmp_path: Path, ply=None) -> Path:
    from utils.config import load_config, save_config

    run = tmp_path / "run"
    save_config(load_config(None, TINY), run / "config.yaml")
    if ply is not None:
        ply(run / "point_cloud.ply")
    return run


# ---------------------------------------------------------------------- the cases

def _train(out, *extra):
    return ["--quiet", f"output_dir={out}", *TINY, *extra]


def _scene(path):
    return f"GuidanceParams.analytic_scene={path}"


def _init(shape, path):
    return [f"GenerateCamParams.init_shape={shape}", f"GenerateCamParams.init_path={path}"]


# id: (command, argv from (tmp_path, out), parts of the message)
CASES = {
    # train.py: configs
    "train/config folder": ("train", lambda t, o: ["--opt", str(t), *_train(o)], ["config file", "is a folder"]),
    "train/config missing": ("train", lambda t, o: ["--opt", str(t / "no.yaml"), *_train(o)], ["no.yaml", "not found"]),
    "train/config binary": ("train", lambda t, o: ["--opt", str(_text(t / "b.yaml", os.urandom(64) + b"\xff")),
                                                   *_train(o)], ["b.yaml", "not UTF-8"]),
    # train.py: initialisation files (mesh and PLY)
    "train/mesh random bytes .glb": ("train", lambda t, o: _train(o, *_init("mesh", _text(t / "r.glb",
                                                                                          os.urandom(300)))),
                                     ["GenerateCamParams.init_path", "r.glb", "cannot read"]),
    "train/mesh text .ply": ("train", lambda t, o: _train(o, *_init("mesh", _text(t / "t.ply", "hello"))),
                             ["GenerateCamParams.init_path", "t.ply", "cannot read"]),
    "train/mesh empty": ("train", lambda t, o: _train(o, *_init("mesh", _text(t / "e.obj", ""))),
                         ["GenerateCamParams.init_path", "e.obj", "no vertices"]),
    "train/mesh folder": ("train", lambda t, o: _train(o, *_init("mesh", t)),
                          ["GenerateCamParams.init_path", "no such mesh"]),
    "train/mesh NaN": ("train", lambda t, o: _train(o, *_init("mesh", _points(t / "n.ply", nan=True))),
                       ["GenerateCamParams.init_path", "n.ply", "NaN or infinite"]),
    "train/mesh at 1e30": ("train", lambda t, o: _train(o, *_init("mesh", _points(t / "b.ply", scale=1e30))),
                           ["GenerateCamParams.init_path", "b.ply", "coordinates reach", "mesh_fit_radius"]),
    "train/ply 0 vertices": ("train", lambda t, o: _train(o, *_init("ply", _points(t / "z.ply", n=0))),
                             ["GenerateCamParams.init_path", "z.ply", "0 points"]),
    "train/ply NaN": ("train", lambda t, o: _train(o, *_init("ply", _points(t / "n.ply", nan=True))),
                      ["GenerateCamParams.init_path", "n.ply", "1 of 50 points have NaN"]),
    "train/ply at 1e30": ("train", lambda t, o: _train(o, *_init("ply", _points(t / "b.ply", scale=1e30))),
                          ["GenerateCamParams.init_path", "b.ply", "coordinates reach", "scale the point cloud"]),
    "train/ply empty file": ("train", lambda t, o: _train(o, *_init("ply", _text(t / "e.ply", ""))),
                             ["GenerateCamParams.init_path", "e.ply", "not a readable PLY"]),
    "train/ply folder": ("train", lambda t, o: _train(o, *_init("ply", t)), ["GenerateCamParams.init_path", "no PLY"]),
    # train.py: analytic-scene PLYs
    "train/scene NaN": ("train", lambda t, o: _train(o, _scene(_splats(t / "s.ply", nan=True))),
                        ["GuidanceParams.analytic_scene", "s.ply", "NaN or infinite"]),
    "train/scene 0 Gaussians": ("train", lambda t, o: _train(o, _scene(_splats(t / "s.ply", 0))),
                                ["GuidanceParams.analytic_scene", "s.ply", "0 Gaussians"]),
    "train/scene transparent": ("train", lambda t, o: _train(o, _scene(_splats(t / "s.ply", opacity_logit=-30.0))),
                                ["GuidanceParams.analytic_scene", "s.ply", "transparent"]),
    "train/scene empty file": ("train", lambda t, o: _train(o, _scene(_text(t / "s.ply", ""))),
                               ["GuidanceParams.analytic_scene", "s.ply", "not a readable PLY"]),
    # train.py: run folders, output folders
    "train/resume missing": ("train", lambda t, o: ["--resume", str(t / "none")], ["--resume", "no such run folder"]),
    "train/resume a file": ("train", lambda t, o: ["--resume", str(_text(t / "f", "x"))], ["--resume", "no such run"]),
    "train/output_dir a file": ("train", lambda t, o: _train(_text(t / "o", "x")), ["output_dir", "is a file"]),
    # train.py: rules between keys
    "train/phase_num beyond the schedule": ("train", lambda t, o: _train(o, "GuidanceParams.phase_num=5000"),
                                            ["GuidanceParams.phase_num must be <= 960", "got 5000"]),
    "train/mono segments do not fit": ("train", lambda t, o: _train(o, "GuidanceParams.t_mode=mono",
                                                                    "GuidanceParams.phase_num=8"),
                                       ["GuidanceParams.t_threshold=150 does not fit phase_num=8"]),
    "train/default_fovy pi": ("train", lambda t, o: _train(o, "GenerateCamParams.default_fovy=3.141592653589793"),
                              ["GenerateCamParams.default_fovy", "below pi"]),
    "train/image_w not a multiple of 8 (SD)": ("train", lambda t, o: _train(o, "GuidanceParams.prior=stable_diffusion",
                                                                            "GenerateCamParams.image_w=36"),
                                               ["image_w and image_h must be multiples of 8", "36 x 32"]),
    # training.sweep: prompt lists, configs, the sweep folder
    "sweep/prompts missing": ("sweep", lambda t, o: ["--prompts", str(t / "p.txt"), "--out", str(o), *TINY],
                              ["prompt list", "p.txt", "does not exist"]),
    "sweep/prompts empty": ("sweep", lambda t, o: ["--prompts", str(_text(t / "p.txt", "")), "--out", str(o), *TINY],
                            ["p.txt", "no prompts"]),
    "sweep/prompts folder": ("sweep", lambda t, o: ["--prompts", str(t), "--out", str(o), *TINY],
                             ["prompt list", "is a folder"]),
    "sweep/prompts not YAML": ("sweep", lambda t, o: ["--prompts", str(_text(t / "p.yaml", "a: [b")), "--out", str(o),
                                                      *TINY], ["p.yaml", "not valid YAML"]),
    "sweep/prompts binary": ("sweep", lambda t, o: ["--prompts", str(_text(t / "p.txt", b"\x00\x81\xff" * 30)),
                                                    "--out", str(o), *TINY], ["p.txt", "not UTF-8 text"]),
    "sweep/config missing": ("sweep", lambda t, o: ["--prompts", str(_text(t / "p.txt", "a cat")), "--opt",
                                                    str(t / "c.yaml"), "--out", str(o), *TINY],
                             ["c.yaml", "not found"]),
    "sweep/out a file": ("sweep", lambda t, o: ["--prompts", str(_text(t / "p.txt", "a cat")), "--out",
                                                str(_text(t / "o", "x")), *TINY], ["--out", "is a file"]),
    "sweep/damaged sweep.json": ("sweep", lambda t, o: ["--prompts", str(_text(t / "p.txt", "a cat")), "--out",
                                                        str(_text(t / "s" / "sweep.json", "{").parent), *TINY],
                                 ["sweep.json is damaged"]),
    # training.sweep.report: sweep folders
    "report/missing": ("report", lambda t, o: [str(t / "none")], ["sweep folder", "no such folder"]),
    "report/a file": ("report", lambda t, o: [str(_text(t / "f", "x"))], ["sweep folder", "is a file"]),
    "report/no sweep.json": ("report", lambda t, o: [str(t)], ["sweep.json not found", "not a sweep folder"]),
    "report/damaged sweep.json": ("report", lambda t, o: [str(_text(t / "s" / "sweep.json", "{").parent)],
                                  ["sweep.json is damaged", "relaunch the sweep"]),
    # export.mesh: run folders, PLYs, checkpoints, the output folder
    "mesh/missing": ("mesh", lambda t, o: [str(t / "none")], ["source", "no such run folder or file"]),
    "mesh/empty run folder": ("mesh", lambda t, o: [str(t)], ["source", "no point_cloud.ply"]),
    "mesh/text .ply": ("mesh", lambda t, o: [str(_text(t / "t.ply", "hello"))], ["source", "t.ply", "not a readable"]),
    "mesh/random bytes .glb": ("mesh", lambda t, o: [str(_text(t / "r.glb", os.urandom(100)))],
                               ["source", "r.glb", "reads a run folder, a 3DGS .ply or a checkpoint .pt"]),
    "mesh/random bytes .pt": ("mesh", lambda t, o: [str(_text(t / "r.pt", os.urandom(100)))],
                              ["checkpoint", "r.pt", "is damaged"]),
    "mesh/0 Gaussians": ("mesh", lambda t, o: [str(_splats(t / "s.ply", 0))], ["source", "s.ply", "0 Gaussians"]),
    "mesh/NaN": ("mesh", lambda t, o: [str(_splats(t / "s.ply", nan=True))], ["source", "s.ply", "NaN or infinite"]),
    "mesh/transparent": ("mesh", lambda t, o: [str(_splats(t / "s.ply", opacity_logit=-30.0))],
                         ["source", "s.ply", "transparent"]),
    "mesh/point cloud without colours": ("mesh", lambda t, o: [str(_points(t / "p.ply"))],
                                         ["source", "p.ply", "not a 3DGS PLY"]),
    "mesh/out a file": ("mesh", lambda t, o: [str(_splats(t / "s.ply")), "--out", str(_text(t / "o", "x"))],
                        ["--out", "is a file"]),
    # evaluation.fid: image folders, the Inception file, prompt lists, models
    "fid/images missing": ("fid", lambda t, o: ["score", str(t / "none"), str(t), "--inception", str(t / "i.pt")],
                           ["image folder", "no such folder"]),
    "fid/images a file": ("fid", lambda t, o: ["score", str(_text(t / "f", "x")), str(t), "--inception", "i.pt"],
                          ["image folder", "is a file"]),
    "fid/no images": ("fid", lambda t, o: ["score", str(t), str(t), "--inception", str(t / "i.pt")], ["no images"]),
    "fid/random bytes .png": ("fid", lambda t, o: ["score", str(_text(t / "i" / "a.png", os.urandom(64)).parent),
                                                   str(t / "i"), "--inception", "i.pt"], ["image", "a.png"]),
    "fid/inception random bytes": ("fid", lambda t, o: ["score", str(_images(t)), str(_images(t)), "--inception",
                                                        str(_text(t / "i.pt", os.urandom(64)))],
                                   ["i.pt is not the Inception TorchScript file", "wget"]),
    "fid/inception missing": ("fid", lambda t, o: ["score", str(_images(t)), str(_images(t)), "--inception",
                                                   str(t / "i.pt")], ["Inception TorchScript file; none at", "wget"]),
    "fid/prompts binary": ("fid", lambda t, o: ["reference", "--model-key", "/none/sd", "--prompts",
                                                str(_text(t / "p.txt", b"\x00\xff" * 40)), "--out", str(o)],
                           ["p.txt", "not UTF-8 text"]),
    "fid/model missing": ("fid", lambda t, o: ["reference", "--model-key", str(t / "sd"), "--prompts",
                                               str(_text(t / "p.txt", "a cat")), "--out", str(o)], ["model_key", "sd"]),
    "fid/one image": ("fid", lambda t, o: ["score", str(_images(t, 1)), str(_images(t, 1)), "--inception", "i.pt"],
                      ["holds 1 image", "at least 2"]),
    # evaluation.clip_score: run folders, configs, PLYs, models, the output file
    "clip/run missing": ("clip", lambda t, o: [str(t / "none")], ["RUN_DIR", "no such folder"]),
    "clip/run a file": ("clip", lambda t, o: [str(_text(t / "f", "x"))], ["RUN_DIR", "is a file"]),
    "clip/no config": ("clip", lambda t, o: [str(t)], ["config.yaml not found"]),
    "clip/damaged config": ("clip", lambda t, o: [str(_text(t / "r" / "config.yaml", "a: [").parent)],
                            ["config.yaml", "not valid YAML"]),
    "clip/no asset": ("clip", lambda t, o: [str(_run_folder(t))], ["RUN_DIR", "no point_cloud.ply"]),
    "clip/--ply text": ("clip", lambda t, o: [str(_run_folder(t)), "--ply", str(_text(t / "t.ply", "hi"))],
                        ["--ply", "t.ply", "not a readable PLY"]),
    "clip/--ply NaN": ("clip", lambda t, o: [str(_run_folder(t)), "--ply", str(_splats(t / "s.ply", nan=True))],
                       ["--ply", "s.ply", "NaN or infinite"]),
    "clip/--out a folder": ("clip", lambda t, o: [str(_run_folder(t, _splats)), "--out", str(t)],
                            ["--out", "is a folder"]),
    "clip/model missing": ("clip", lambda t, o: [str(_run_folder(t, _splats)), "--model", str(t / "clip")],
                           ["CLIP model not found", "--model"]),
}


def _images(folder: Path, count: int = 2) -> Path:
    import imageio.v3 as iio

    images = folder / "images"
    images.mkdir(exist_ok=True)
    for k in range(count):
        iio.imwrite(images / f"{k}.png", np.full((8, 8, 3), 40 * k, np.uint8))
    return images


def _files(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


def _call(command: str, argv: list[str]) -> int:
    try:
        return COMMANDS[command](argv)
    except SystemExit as exc:  # argparse, or a command exiting
        return exc.code


def _assert_message(caplog, code, parts):
    assert code == 2, caplog.text
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    for part in parts:
        assert part in errors[0], (part, errors[0])
    assert all(r.exc_info is None for r in caplog.records) and "Traceback" not in caplog.text


@pytest.mark.parametrize("case", list(CASES))
def test_a_bad_input_is_one_message_and_leaves_nothing(tmp_path, caplog, case):
    command, make_argv, parts = CASES[case]
    inputs = tmp_path / "in"
    inputs.mkdir()
    argv = [str(a) for a in make_argv(inputs, tmp_path / "out")]
    before = _files(tmp_path)
    _assert_message(caplog, _call(command, argv), parts)
    assert _files(tmp_path) == before  # no folder, no temporary or half-written file


def _read_only(monkeypatch, path: Path):
    """os.access says `path` is not writable (the suite may run as root, for whom chmod denies nothing)."""
    real = os.access
    monkeypatch.setattr("utils.cli_errors.os.access", lambda p, mode: False if Path(p) == path else real(p, mode))


@pytest.mark.parametrize("command", ["train", "sweep", "report", "mesh"])
def test_a_read_only_output_folder_is_refused_before_any_work(tmp_path, caplog, monkeypatch, command):
    out = _sweep_folder(tmp_path) if command == "report" else tmp_path / "out"
    out.mkdir(exist_ok=True)
    argv = {"train": lambda: _train(out),
            "sweep": lambda: ["--prompts", str(_text(tmp_path / "p.txt", "a cat")), "--out", str(out), *TINY],
            "report": lambda: [str(out)],
            "mesh": lambda: [str(_splats(tmp_path / "s.ply")), "--out", str(out)]}[command]()
    _read_only(monkeypatch, out)
    before = _files(tmp_path)
    _assert_message(caplog, _call(command, argv), [str(out), "read-only"])
    assert _files(tmp_path) == before


def _full_disk(monkeypatch):
    """Every file write fails half-way with ENOSPC, as on a full disk."""
    def write(self, data, *args, **kwargs):
        with open(self, "wb") as f:
            f.write((data.encode() if isinstance(data, str) else data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))

    monkeypatch.setattr(Path, "write_bytes", write)
    monkeypatch.setattr(Path, "write_text", write)


@pytest.mark.parametrize("command", ["report", "mesh"])
def test_a_full_disk_is_one_message_and_leaves_no_half_written_file(tmp_path, caplog, monkeypatch, command):
    if command == "report":
        root = _sweep_folder(tmp_path)
        argv = [str(root), "--clip-model", "", "--image-reward", ""]
    else:
        argv = [str(_splats(tmp_path / "s.ply", n=200)), "--out", str(tmp_path / "mesh"), "--resolution", "16",
                "--bake-views", "0"]
    before = _files(tmp_path)
    _full_disk(monkeypatch)
    _assert_message(caplog, _call(command, argv), ["no space left on the device", "free some space"])
    left = _files(tmp_path) - before
    assert all(p.is_dir() for p in left), left  # at most the empty output folder: no .tmp, no half file


def test_a_boolean_for_a_string_key_is_the_text_with_a_warning(caplog):
    from utils.config import load_config

    cfg = load_config(None, ["GuidanceParams.negative=no"])
    assert cfg.guidance.negative == "no"
    assert "GuidanceParams.negative=no" in caplog.text and "read as the text 'no'" in caplog.text


def test_an_empty_config_file_is_the_defaults_with_a_warning(tmp_path, caplog):
    from utils.config import load_config

    assert load_config(_text(tmp_path / "empty.yaml", "")) == load_config(None)
    assert "empty.yaml' is empty: it changes nothing" in caplog.text


def test_the_demo_config_starts_from_a_mesh_with_few_points(tmp_path):
    """init_num_pts below 5000 (one ball of points per surface point would be 0 points) works for meshes."""
    mesh = _text(tmp_path / "tetra.obj", "v 0 0 0\nv 0.5 0 0\nv 0 0.5 0\nv 0 0 0.5\nf 1 2 3\nf 1 2 4\nf 1 3 4\n"
                                         "f 2 3 4\n")
    code = train.main(["--opt", str(ROOT / "config/demo.yaml"), "--quiet", f"output_dir={tmp_path / 'out'}",
                       *_init("mesh", mesh), "GenerateCamParams.init_num_pts=300", "OptimizationParams.iterations=1",
                       "GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32", "save_video=false",
                       "export_mesh=false"])
    assert code == 0
    assert len(list((tmp_path / "out").glob("*/*/point_cloud.ply"))) == 1


@pytest.mark.parametrize("command,argv,part", [
    ("export.mesh", ["{t}/none"], "no such run folder or file"),
    ("training.sweep.report", ["{t}"], "sweep.json not found"),
])
def test_a_real_process_prints_one_line_and_exits_2(tmp_path, command, argv, part):
    result = subprocess.run([sys.executable, "-m", command, *[a.format(t=tmp_path) for a in argv]], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert part in result.stderr and "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "ERROR" in line or part in line]) == 1


def test_text_to_3d_starts_with_few_points(monkeypatch):
    """Shap-E (and Point-E) below 5000 points: init_num_pts of the generator's points, not a traceback."""
    from types import SimpleNamespace

    from scene import initialisation

    monkeypatch.setitem(initialisation.GENERATED, "shapee", lambda cfg, gen: (torch.rand(4096, 3), torch.rand(4096, 3)))
    cfg = SimpleNamespace(init_shape="shapee", init_num_pts=300, use_pointe_rgb=True)
    xyz, rgb = initialisation.initial_points(cfg, torch.Generator().manual_seed(0))
    assert xyz.shape == rgb.shape == (300, 3)
