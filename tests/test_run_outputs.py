"""What a user sees of a run: TensorBoard tags and image grids, the progress bar, evaluation size and
background, the SH augmentation, no-effect warnings and the recorded git commit."""
import json
import logging
import re
from pathlib import Path

import imageio.v2 as imageio
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from tests.test_train import TINY
from training.run_dir import git_commit
from training.trainer import Trainer
from utils.config import load_config
from utils.media import frame_grid, to_uint8
from utils.monitor import progress_fields


def _run(out: Path, *extra):
    assert train.main(["--quiet", f"output_dir={out}", *TINY, "save_video=false", *extra]) == 0
    return next(out.glob("*/*"))


def test_tensorboard_tags_grid_and_evaluation_size(tmp_path):
    run = _run(tmp_path, "eval_resolution=48", "GenerateCamParams.render_45=true")
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/total", "scene/gaussians", "health/skipped_steps", "guidance/grad_norm"} <= tags
    assert [e.value for e in acc.Scalars("scene/gaussians")][0] == 300
    image = acc.Images("test/rgb")[-1]
    assert (image.width, image.height) == (8 * 48, 2 * 48)  # all 16 views of both rings, 8 per row
    frame = imageio.imread(run / "test_views" / "iter_00004" / "rgb_015.png")
    assert frame.shape == (48, 48, 3)


def test_logged_and_saved_images_keep_every_pixel(tmp_path):
    """TensorBoard images and test-view PNGs are encoded at a fast zlib level: lossless all the same, and
    TensorBoard reads the grid back as add_image would have written it."""
    from utils.media import save_images
    from utils.monitor import Monitor

    images = torch.rand(3, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    monitor = Monitor(tmp_path / "run", total_steps=10, start_step=0, log_interval=1, quiet=True)
    monitor.log_images("test/rgb", images, 7)
    monitor.log_images("test/depth", images[:, :1], 7)
    monitor.close()
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"), size_guidance={"images": 0})
    acc.Reload()
    for tag, batch in (("test/rgb", images), ("test/depth", images[:, :1])):
        (event,) = acc.Images(tag)
        assert event.step == 7 and (event.width, event.height) == (72, 20)
        decoded = imageio.imread(event.encoded_image_string, format="png")
        assert (decoded == frame_grid(to_uint8(batch))).all()
    paths = save_images(images, tmp_path / "views", "rgb")
    assert [p.name for p in paths] == ["rgb_000.png", "rgb_001.png", "rgb_002.png"]
    assert all((imageio.imread(p) == frame).all() for p, frame in zip(paths, to_uint8(images)))


def test_frame_grid_and_progress_fields():
    frames = torch.arange(3 * 2 * 2 * 3, dtype=torch.uint8).reshape(3, 2, 2, 3).numpy()
    grid = frame_grid(frames, per_row=2)
    assert grid.shape == (4, 4, 3)
    assert (grid[:2, 2:] == frames[1]).all() and (grid[2:, :2] == frames[2]).all() and (grid[2:, 2:] == 0).all()
    assert frame_grid(frames[:1], per_row=8).shape == (2, 2, 3)  # one view: no padding columns
    fields = progress_fields({"grad_norm": 0.01234, "t": 412.0, "scene/gaussians": 900.0,
                              "health/skipped_steps": 2.0, "loss/total": 5.0})
    assert fields == {"|g|": "0.0123", "t": "412", "N": "900", "skipped": "2"}


def test_white_background_selects_the_evaluation_background(tmp_path):
    white = _run(tmp_path / "w", "OptimizationParams.iterations=1")
    black = _run(tmp_path / "b", "OptimizationParams.iterations=1", "ModelParams.white_background=false")
    corner = [imageio.imread(r / "test_views" / "iter_00001" / "rgb_000.png")[0, 0] for r in (white, black)]
    assert corner[0].tolist() == [255, 255, 255] and corner[1].tolist() == [0, 0, 0]


def _bright_trainer(*extra) -> Trainer:
    """A trainer whose Gaussians have non-zero SH colours (the grey initialisation's are 0)."""
    trainer = Trainer(load_config(None, [*TINY, "ModelParams.sh_deg_aug_ratio=0", *extra], warn_no_effect=False))
    with torch.no_grad():
        trainer.gaussians.params()["f_dc"].fill_(1.0)
    return trainer


def _training_render(trainer: Trainer) -> torch.Tensor:
    return trainer.render_batch(trainer.sampler.sample(2), torch.zeros(2, 3))[0].rgb.detach()


def test_sh_augmentation_changes_the_training_render_only_when_enabled():
    reference = _training_render(_bright_trainer())
    assert torch.equal(_training_render(_bright_trainer("ModelParams.shs_aug_ratio=0.0")), reference)
    assert (_training_render(_bright_trainer("ModelParams.shs_aug_ratio=1.0")) - reference).abs().max() > 1e-2


def test_unread_guidance_keys_warn_that_they_have_no_effect(caplog):
    with caplog.at_level(logging.WARNING, logger="utils.config"):
        load_config(None, ["GuidanceParams.denoise_guidance_scale=2", "GuidanceParams.xs_eta=0.5",
                           "GuidanceParams.vis_interval=5"])
    for key in ("GuidanceParams.denoise_guidance_scale", "GuidanceParams.xs_eta", "GuidanceParams.vis_interval"):
        assert f"{key} has no effect here" in caplog.text


def test_environment_records_the_git_commit(tmp_path):
    run = _run(tmp_path, "OptimizationParams.iterations=1")
    info = json.loads((run / "environment.json").read_text())
    commit = git_commit()
    assert info["git"] == commit
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit["commit"])
    assert git_commit(tmp_path) is None  # not a git checkout
