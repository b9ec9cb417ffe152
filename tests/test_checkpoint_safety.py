"""No command runs code from a received file: a checkpoint whose unpickling would create a file is
refused by every command that reads checkpoints (one message, nothing created), and the product's
source has one .pt reader, weights only."""
import ast
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import train
from export import mesh as mesh_export
from tests.sweep_helpers import TINY_ANALYTIC, write_prompts
from training.sweep import worker as sweep
from training.sweep.plan import SweepPlan
from utils.checkpoint_file import CheckpointError, load_tensor_file
from utils.config import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_DIRS = ("evaluation", "export", "gaussian_renderer", "guidance", "scene", "training", "utils", "bench")
READER = Path("utils/checkpoint_file.py")


class _CreatesFile:
    """Unpickling this calls open(path, "w"): code run by merely loading the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def plant(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped .pt whose unpickling with weights_only=False creates `marker`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"step": 3, "version": 2, "gaussians": {"payload": _CreatesFile(marker)}}, path)
    return path


def test_the_planted_checkpoint_would_run_code(tmp_path):
    """The control: the plant is live, so the tests below can fail."""
    marker = tmp_path / "pwned"
    path = plant(tmp_path / "last.pt", marker)
    torch.load(path, weights_only=False)  # what the old readers did
    assert marker.exists()


def _product_sources():
    for folder in PRODUCT_DIRS:
        yield from sorted((ROOT / folder).rglob("*.py"))
    yield from sorted(ROOT.glob("*.py"))


def test_no_unsafe_load_and_one_reader_in_the_product():
    """Any weights_only=False, and any torch.load outside utils/checkpoint_file.py, fails this test."""
    unsafe, readers = [], []
    for path in _product_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.keyword) and node.arg == "weights_only" and not (
                    isinstance(node.value, ast.Constant) and node.value.value is True):
                unsafe.append(f"{path.relative_to(ROOT)}:{node.value.lineno}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                readers.append(path.relative_to(ROOT))
    assert unsafe == []
    assert set(readers) == {READER}, readers
    assert len(list(_product_sources())) > 50  # the walk found the product


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _assert_one_message(caplog, *parts):
    errors = _errors(caplog)
    assert len(errors) == 1, errors
    for part in parts:
        assert part in errors[0], (part, errors[0])
    assert all(r.exc_info is None for r in caplog.records) and "Traceback" not in caplog.text


@pytest.fixture
def planted_run(tmp_path):
    """A run folder (config.yaml, checkpoints/last.pt) whose checkpoint creates tmp_path/pwned when unpickled."""
    run = tmp_path / "outputs" / "debug" / "run"
    save_config(load_config(None, [*TINY_ANALYTIC, f"output_dir={tmp_path / 'outputs'}"]), run / "config.yaml")
    plant(run / "checkpoints" / "last.pt", tmp_path / "pwned")
    return run


def test_resume_refuses_the_planted_checkpoint(planted_run, caplog):
    before = sorted(planted_run.rglob("*"))
    assert train.main(["--resume", str(planted_run), "--quiet"]) == 2
    _assert_one_message(caplog, "checkpoint", "last.pt", "is damaged or was not written by this program",
                        "nothing in it was run")
    assert not (planted_run.parents[2] / "pwned").exists()
    assert sorted(planted_run.rglob("*")) == before


@pytest.mark.parametrize("which", ["run folder", "checkpoint file"])
def test_mesh_export_refuses_the_planted_checkpoint(planted_run, caplog, which):
    source = planted_run if which == "run folder" else planted_run / "checkpoints" / "last.pt"
    assert mesh_export.main([str(source), "--resolution", "16"]) == 2
    _assert_one_message(caplog, str(planted_run / "checkpoints" / "last.pt"), "not loaded (nothing in it was run)")
    assert not (planted_run.parents[2] / "pwned").exists()
    assert not (planted_run / "mesh").exists()


def test_sweep_relaunch_refuses_the_planted_checkpoint(tmp_path):
    """A shared sweep folder with a half-finished run whose checkpoint was replaced: the run fails with
    the message (recorded in failed.json and the worker's log, no traceback), nothing is created, and
    the sweep goes on (a failed run never stops a sweep: exit code 0, the failure in the report)."""
    prompts, out = write_prompts(tmp_path, ["a red apple"]), tmp_path / "sweep"
    plan = SweepPlan.build(out, prompts, ["sctd"], [0], None, TINY_ANALYTIC)
    plan.write_manifest()
    (run,) = plan.runs
    folder = plan.folder(run)
    save_config(plan.config(run), folder / "config.yaml")
    plant(folder / "checkpoints" / "last.pt", tmp_path / "pwned")
    code = sweep.main(["--prompts", str(prompts), "--out", str(out), "--losses", "sctd", "--seeds", "0",
                       "--no-report", "--poll", "0.01", *TINY_ANALYTIC])
    assert code == 0
    assert not (tmp_path / "pwned").exists()
    failed = json.loads((folder / "failed.json").read_text())
    assert failed["error"].startswith("CheckpointError: checkpoint") and "nothing in it was run" in failed["error"]
    logs = "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    assert "nothing in it was run" in logs and "Traceback" not in logs


def test_feature_files_are_read_weights_only(tmp_path, caplog):
    """The sweep report's FID features and the reference cache: the same reader (a damaged or foreign cache
    is recomputed, never unpickled with code)."""
    from evaluation.fid import reference_features

    marker = tmp_path / "pwned"
    with pytest.raises(CheckpointError, match="FID features"):
        load_tensor_file(plant(tmp_path / "fid_features.pt", marker), "FID features")
    images = tmp_path / "reference"
    images.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "README.md", images / "not_an_image.txt")
    import imageio.v3 as iio
    import numpy as np

    iio.imwrite(images / "a.png", np.zeros((4, 4, 3), np.uint8))
    cache = plant(tmp_path / "fid_reference.pt", marker)
    features = reference_features(images, lambda x: torch.ones(x.shape[0], 2), cache)
    assert features.shape == (1, 2)
    assert "computing the features again" in caplog.text
    assert not marker.exists()
    assert torch.equal(load_tensor_file(cache)["features"], features)  # the cache is rewritten, weights only
