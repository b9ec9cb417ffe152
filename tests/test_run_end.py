"""Nothing lost at the end of a run: the official last iteration (no update), no final model right after an
opacity reset, finishing completed on --resume, stale temporary files removed, a full disk stops with one
message and resumes."""
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import plyfile
import pytest
import torch
from plyfile import PlyData

import train
from scene.gaussian_model import GaussianModel
from tests.test_train import TINY
from training.final_outputs import RECORD_NAME
from training.run import TrainingRun
from utils.files import TEMP_NAME, remove_stale_temp_files

REPO = Path(__file__).resolve().parents[1]
EXTRA = ("save_video=true", "OptimizationParams.iterations=4", "checkpoint_interval=2")
FINAL_FILES = ("point_cloud.ply", "videos/turntable.mp4", "mesh/mesh.glb", "test_views/iter_00004/rgb_000.png")


def _run(out: Path, *extra) -> int:
    return train.main(["--quiet", f"output_dir={out}", *TINY, *EXTRA, *extra])


def _resume(run: Path, *extra) -> int:
    return train.main(["--resume", str(run), "--quiet", *extra])


def _run_dir(out: Path) -> Path:
    (run,) = [p for p in out.glob("*/*") if p.is_dir()]
    return run


def _ply(path: Path) -> dict:
    v = PlyData.read(str(path))["vertex"]
    return {name: v[name].copy() for name in v.data.dtype.names}


def _same_ply(a: Path, b: Path) -> bool:
    x, y = _ply(a), _ply(b)
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob("*") if TEMP_NAME.match(p.name)]


def _errors(err: str) -> list[str]:
    """The ERROR messages of the console output."""
    return [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("ERROR ")]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """An uninterrupted run: the reference every stopped-and-resumed run must equal."""
    out = tmp_path_factory.mktemp("straight")
    assert _run(out) == 0
    return _run_dir(out)


# ---------------------------------------------------------------------- the official last iteration


def test_iterations_steps_make_iterations_minus_one_updates_and_end_on_the_last_snapshot(tmp_path, monkeypatch):
    calls = []
    original = GaussianModel.optimizer_step

    def counted(self, skip=None):
        calls.append(1)
        return original(self, skip)

    monkeypatch.setattr(GaussianModel, "optimizer_step", counted)
    assert _run(tmp_path, "save_video=false", "export_mesh=false") == 0
    run = _run_dir(tmp_path)
    assert len(calls) == 3  # official train.py: `if iteration < opt.iterations: optimizer.step()`
    assert _same_ply(run / "point_cloud.ply", run / "point_cloud" / "iteration_4" / "point_cloud.ply")
    checkpoint = torch.load(run / "checkpoints/last.pt", weights_only=True)
    assert checkpoint["step"] == 4


def test_a_run_ending_on_an_opacity_reset_interval_keeps_a_trained_model_and_writes_its_mesh(tmp_path):
    """The demo with iterations a multiple of opacity_reset_interval, below densify_until_iter: the old loop
    ended on the reset (every opacity 0.01, 'no Gaussian has opacity >= 0.01', no mesh)."""
    code = train.main([
        "--opt", str(REPO / "config/demo.yaml"), "--quiet", f"output_dir={tmp_path}", "save_video=false",
        "mesh_resolution=32", "mesh_bake_views=1", "mesh_level=0.1", "checkpoint_interval=0",
        "GenerateCamParams.image_w=32",
        "GenerateCamParams.image_h=32", "GenerateCamParams.init_num_pts=500", "OptimizationParams.iterations=60",
        "OptimizationParams.opacity_reset_interval=30", "OptimizationParams.densify_from_iter=10",
        "OptimizationParams.densification_interval=10", "OptimizationParams.densify_until_iter=100",
        "OptimizationParams.warmup_iter=10"])
    assert code == 0
    run = _run_dir(tmp_path)
    opacity = _sigmoid(_ply(run / "point_cloud.ply")["opacity"])
    assert opacity.max() > 0.02  # the reset caps every opacity at 0.01
    assert _same_ply(run / "point_cloud.ply", run / "point_cloud" / "iteration_60" / "point_cloud.ply")
    assert (run / "mesh" / "mesh.glb").read_bytes()[:4] == b"glTF"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["gaussians"] == len(opacity)  # the metrics' model is the PLY's
    # 60 iterations with two resets barely train; the old loop's reset model lost 1.6 dB (17.25 -> 15.64)
    assert metrics["final"]["psnr_heldout"] >= metrics["initial"]["psnr_heldout"] - 0.5


# ---------------------------------------------------------------------- finishing is idempotent


def _interrupt_output(monkeypatch, method: str):
    """Ctrl-C while TrainingRun writes one final output (as a kill there would stop it)."""
    original = getattr(TrainingRun, method)

    def interrupted(self, *args):
        if method == "save_point_cloud" and Path(args[0]).parent != self.run_dir:
            return original(self, *args)  # a snapshot, not the final point cloud
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainingRun, method, interrupted)
    return original


def _spy(monkeypatch, method: str) -> list:
    calls = []
    original = getattr(TrainingRun, method)

    def spied(self, *args):
        calls.append(args)
        return original(self, *args)

    monkeypatch.setattr(TrainingRun, method, spied)
    return calls


@pytest.mark.parametrize("method,lacking", [("save_point_cloud", ["point_cloud", "video", "mesh"]),
                                            ("write_turntable", ["video", "mesh"]),
                                            ("write_mesh", ["mesh"])])
def test_resume_writes_exactly_the_final_outputs_a_stopped_run_lacks(tmp_path, monkeypatch, capsys, straight,
                                                                      method, lacking):
    _interrupt_output(monkeypatch, method)
    assert _run(tmp_path) == 130
    monkeypatch.undo()
    run = _run_dir(tmp_path)
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["step"] == 4
    # what a kill -9 in the middle of atomic writes leaves
    stale = [run / "checkpoints" / ".last.k3j2_x9a.tmp.pt", run / ".point_cloud.0a1b2c3d.tmp.ply",
             run / "videos" / ".turntable.zz_00011.tmp.mp4"]
    for path in stale:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"half")
    evaluations, plys = _spy(monkeypatch, "evaluate"), _spy(monkeypatch, "save_point_cloud")
    videos, meshes = _spy(monkeypatch, "write_turntable"), _spy(monkeypatch, "write_mesh")
    assert _resume(run) == 0
    assert f"stopped before writing {', '.join(lacking)}: writing them now" in (run / "train.log").read_text()
    assert (len(evaluations), len(plys), len(videos), len(meshes)) == (
        0, int("point_cloud" in lacking), int("video" in lacking), 1)
    assert not any(p.exists() for p in stale) and _temp_files(run) == []
    assert all((run / name).is_file() for name in FINAL_FILES)
    assert _same_ply(run / "point_cloud.ply", straight / "point_cloud.ply")
    record = json.loads((run / RECORD_NAME).read_text())
    assert record == {"step": 4, "written": {"evaluation": "test_views/iter_00004", "point_cloud": "point_cloud.ply",
                                             "video": "videos/turntable.mp4", "mesh": "mesh/mesh.glb"}}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"] == metrics["iter_4"] and metrics["iterations"] == 4
    capsys.readouterr()
    assert _resume(run) == 2  # now it has everything
    assert "already finished its 4 iterations" in capsys.readouterr().err


def test_a_final_output_deleted_is_written_again_on_resume(straight, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "videos" / "turntable.mp4").unlink()
    plys, videos = _spy(monkeypatch, "save_point_cloud"), _spy(monkeypatch, "write_turntable")
    assert _resume(run) == 0
    assert (len(plys), len(videos)) == (0, 1) and (run / "videos" / "turntable.mp4").is_file()
    assert "stopped before writing video: writing them now" in (run / "train.log").read_text()


def test_stale_temporary_files_only_are_removed(tmp_path):
    keep = [tmp_path / "point_cloud.ply", tmp_path / ".hidden", tmp_path / "a" / ".notes.tmp.txt",
            tmp_path / "a" / ".last.toolong123.tmp.pt"]
    gone = [tmp_path / "checkpoints" / ".last.abc_1234.tmp.pt", tmp_path / "a" / ".metrics.0000zzzz.tmp.json",
            tmp_path / ".config.q1w2e3r4.tmp"]
    for path in keep + gone:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    assert remove_stale_temp_files(tmp_path) == sorted(gone)
    assert all(p.exists() for p in keep) and not any(p.exists() for p in gone)


# ---------------------------------------------------------------------- a full disk


def _enospc_in(monkeypatch, writer: str, checkpoint_number: int = 2) -> None:
    """Make one writer fail as on a full disk: it writes part of its temporary file, then ENOSPC."""
    def fail(tmp) -> None:
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    if writer == "checkpoint":  # the checkpoint_number-th one (2: the final one, after the step-2 one)
        original, seen = torch.save, []

        def save(obj, f, *args, **kwargs):
            if Path(f).name.startswith(".last.") and (seen.append(1) or len(seen) == checkpoint_number):
                fail(f)
            return original(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    elif writer == "point_cloud":  # the final PLY, not the snapshots
        original_write = PlyData.write

        def write(self, stream):
            if Path(stream).name.startswith(".point_cloud.") and not Path(stream).parent.name.startswith("iter"):
                fail(stream)
            return original_write(self, stream)

        monkeypatch.setattr(plyfile.PlyData, "write", write)
    elif writer == "video":
        import utils.media

        monkeypatch.setattr(utils.media.imageio, "get_writer", lambda tmp, **kwargs: fail(tmp))
    elif writer == "metrics":  # the write of the final evaluation
        original_text = Path.write_text

        def write_text(self, text, *args, **kwargs):
            if self.name.startswith(".metrics.") and '"final"' in text:
                fail(self)
            return original_text(self, text, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("writer,failed,kept_step", [("checkpoint", "checkpoints/last.pt", 2),
                                                     ("point_cloud", "point_cloud.ply", 4),
                                                     ("video", "videos/turntable.mp4", 4),
                                                     ("metrics", "metrics.json", 4)])
def test_a_full_disk_stops_with_one_message_keeps_the_checkpoint_and_resumes(tmp_path, monkeypatch, capsys, straight,
                                                                             writer, failed, kept_step):
    _enospc_in(monkeypatch, writer)
    assert _run(tmp_path) == 1
    monkeypatch.undo()
    run = _run_dir(tmp_path)
    err = capsys.readouterr().err
    errors = _errors(err)
    assert len(errors) == 1, err
    assert f"the disk is full: could not write {run / failed}" in errors[0]
    assert f"Kept: the checkpoint of step {kept_step} ({run / 'checkpoints/last.pt'}), intact" in errors[0]
    assert f"continue with: python train.py --resume {run}" in errors[0]
    assert ("--resume writes the final outputs it lacks" in errors[0]) == (kept_step == 4)
    assert "Traceback" not in err and errors[0] in (run / "train.log").read_text()
    assert _temp_files(run) == []
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["step"] == kept_step
    assert _resume(run) == 0
    assert all((run / name).is_file() for name in FINAL_FILES)
    assert _same_ply(run / "point_cloud.ply", straight / "point_cloud.ply")


def test_a_full_disk_at_the_first_checkpoint_says_nothing_can_be_resumed(tmp_path, monkeypatch, capsys):
    _enospc_in(monkeypatch, "checkpoint", checkpoint_number=1)
    assert _run(tmp_path, "checkpoint_interval=0", "save_video=false", "export_mesh=false") == 1
    run = _run_dir(tmp_path)
    (error,) = _errors(capsys.readouterr().err)
    assert error == (f"training stopped at step 4: the disk is full: could not write {run / 'checkpoints/last.pt'}"
                     f"{error[error.index(' ('):error.index('. ')]}. No checkpoint was written yet, so nothing can "
                     "be resumed: free some space and start the run again")
    assert not (run / "checkpoints/last.pt").exists() and _temp_files(run) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MiB tmpfs (skipped where mounting is not allowed)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_stops_cleanly_and_resumes_once_space_is_freed(small_disk, monkeypatch, capfd, straight):
    """The run's files on a tmpfs that fills up after the step-2 checkpoint (every write fails from there:
    TensorBoard, train.log, metrics, the checkpoint)."""
    filler = small_disk / "filler"
    original = TrainingRun.save_checkpoint

    def fill_after_first(self, wait=False):
        original(self, wait=True)  # the step-2 checkpoint is on disk before the disk fills
        if self.trainer.step == 2:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 16))
                        f.flush()
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC

    monkeypatch.setattr(TrainingRun, "save_checkpoint", fill_after_first)
    assert _run(small_disk) == 1
    err = capfd.readouterr().err
    run = _run_dir(small_disk)
    assert "the disk is full: could not write" in err and "Kept: the checkpoint of step 2" in err
    assert "Traceback" not in err and "Logging error" not in err
    assert _temp_files(run) == []
    assert torch.load(run / "checkpoints/last.pt", weights_only=True)["step"] == 2
    monkeypatch.undo()
    filler.unlink()
    os.sync()
    assert _resume(run) == 0
    assert _same_ply(run / "point_cloud.ply", straight / "point_cloud.ply")


def test_the_video_falls_back_to_a_gif_without_an_encoder_but_not_on_a_full_disk(tmp_path, monkeypatch):
    import imageio.v3 as iio

    import utils.media
    from utils.files import DiskFullError

    frames = np.random.default_rng(0).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)

    def no_encoder(tmp, **kwargs):
        raise RuntimeError("no ffmpeg here")

    monkeypatch.setattr(utils.media.imageio, "get_writer", no_encoder)
    gif = utils.media.write_video(frames, tmp_path / "v.mp4")
    assert gif == tmp_path / "v.gif" and iio.imread(gif, index=None).shape[0] == 3

    def full(tmp, **kwargs):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(utils.media.imageio, "get_writer", full)
    with pytest.raises(DiskFullError) as info:
        utils.media.write_video(frames, tmp_path / "w.mp4")
    assert info.value.filename == str(tmp_path / "w.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.gif"]  # no w.gif, no temporary file


def test_train_log_drops_a_line_on_a_full_disk_and_reports_other_errors(tmp_path, capsys):
    import logging

    from utils.monitor import RunLogHandler

    class FailingStream:
        def __init__(self, exc):
            self.exc = exc

        def write(self, text):
            raise self.exc

        def flush(self):
            pass

    handler = RunLogHandler(tmp_path / "train.log")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "a line", None, None)
    handler.stream = FailingStream(OSError(errno.ENOSPC, "No space left on device"))
    handler.emit(record)
    assert capsys.readouterr().err == ""
    handler.stream = FailingStream(ValueError("not a disk problem"))
    handler.emit(record)
    assert "--- Logging error ---" in capsys.readouterr().err


def test_a_full_disk_before_training_is_one_message_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    import training.run

    def full(run_dir, argv):
        raise OSError(errno.ENOSPC, "No space left on device", str(run_dir / "command.txt"))

    monkeypatch.setattr(training.run, "write_run_metadata", full)
    assert _run(tmp_path / "out") == 1
    err = capsys.readouterr().err
    (error,) = _errors(err)
    assert error.startswith("the disk is full: could not write ") and error.endswith(
        "command.txt; free some space and run the command again (a run folder with a checkpoint continues "
        "with --resume)")
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_torch_save_on_a_full_disk_is_a_disk_full_error_naming_the_checkpoint(small_disk):
    """torch.save reports a full disk as a RuntimeError ('unexpected pos ...'), without errno."""
    from training.run_dir import atomic_torch_save
    from utils.files import DiskFullError

    target = small_disk / "checkpoints" / "last.pt"
    atomic_torch_save({"step": 1}, target)
    with pytest.raises(DiskFullError) as info:
        atomic_torch_save({"step": 2, "big": torch.zeros(8 << 20)}, target)  # 32 MiB on a 16 MiB disk
    assert info.value.filename == str(target) and isinstance(info.value.__cause__, RuntimeError)
    assert torch.load(target, weights_only=True) == {"step": 1}
    assert _temp_files(small_disk) == []
