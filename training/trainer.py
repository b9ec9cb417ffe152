"""The training loop: cameras -> render -> prior -> distillation loss -> Gaussians.

`Trainer` owns the parts built from one `Config` and runs iterations. Each iteration is
host-sync free (timesteps, augmentations and branch decisions come from CPU generators;
logging scalars are read only every `log_interval` iterations; a step with NaN/Inf is skipped on
the device, see training/health.py); densification iterations sync once, as they always did.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from gaussian_renderer import render, render_in_chunks
from gaussian_renderer.types import RenderOutput
from guidance.compile_cache import PortableCompileCache, default_cache_folder, setup_key
from guidance.losses import BatchShard, StepInfo, build_loss
from guidance.prior import Conditioning, DiffusionPrior
from guidance.timesteps import warm_up_rate
from scene.camera_sampler import OrbitCameraSampler
from scene.cameras import Cameras
from scene.densification import AllPrunedError, DensificationStrategy
from scene.gaussian_model import GaussianModel
from scene.initialisation import initial_points
from training.distributed import ProcessGroup
from training.health import NonFiniteGuard, TrainingStopped
from utils.config import Config
from utils.devices import resolve_device
from utils.losses import tv_loss
from utils.seeding import global_rng_state, restore_global_rng_state

log = logging.getLogger(__name__)

SHS_NOISE_STD = math.sqrt(0.2)  # official SH augmentation: sh + N(0, 1) * sqrt(0.2) * sh
# 2: per-part loss state, tensors and primitives only (weights_only loading);
# 3: the densification statistics apart from the Gaussians ("densification", scene/densification.py)
CHECKPOINT_VERSION = 3


@dataclass
class StepResult:
    loss: Tensor  # scalar, total surrogate loss (not meaningful as a value for distillation terms)
    scalars: dict[str, Tensor | float]  # named terms for logging
    render: RenderOutput
    images: Tensor  # [B, 3, H, W] what the prior saw (rgb or depth), before flipping
    shard: BatchShard | None = None  # this process's rows of the camera batch (None: all of them)


def build_prior(cfg: Config, device: torch.device) -> DiffusionPrior:
    """The prior named by GuidanceParams.prior."""
    if cfg.guidance.prior == "analytic":
        from guidance.analytic_prior import AnalyticPrior

        return AnalyticPrior.from_config(cfg.guidance, device, backend=cfg.pipeline.renderer)
    from guidance.stable_diffusion import StableDiffusionPrior

    prior = StableDiffusionPrior.from_config(cfg.guidance, device)
    apply_pipeline_options(prior, cfg.pipeline)
    return prior


def apply_pipeline_options(prior, pipe) -> None:
    """The PipelineParams speed/memory levers of a Stable Diffusion prior (CUDA-only ones are no-ops on a CPU)."""
    prior.enable_fast_path(cuda_graphs=pipe.cuda_graphs, channels_last=pipe.channels_last,
                           attention_slicing=pipe.attention_slicing, compile=pipe.compile,
                           compile_dynamic_batch=pipe.compile_dynamic_batch, compile_regions=pipe.compile_regions,
                           vae_attention=pipe.vae_attention, vae_channels_last=pipe.vae_channels_last)
    if pipe.encode_chunk:
        prior.set_posterior_sampling(False)  # the chunked encoder recomputes its forward: keep it deterministic


class NullTimer:
    """Section timer interface; the benchmark swaps in one that records CUDA events."""

    def __call__(self, name: str):
        return contextlib.nullcontext()


def gradient_clip_value(grad_clip: list[float] | None, step: int) -> float | None:
    """Official schedule: start + (end - start) min(1, step / ramp); None = no clipping."""
    if not grad_clip:
        return None
    start, end, ramp = grad_clip
    return start + (end - start) * min(1.0, step / ramp) if ramp > 0 else end


class Trainer:
    """Builds every part from a Config and runs the distillation loop."""

    def __init__(self, cfg: Config, prior: DiffusionPrior | None = None, device: torch.device | None = None,
                 group: ProcessGroup | None = None):
        self.cfg = cfg
        self.group = group or ProcessGroup()  # processes sharing each step's cameras (training.distributed)
        self.device = device or resolve_device(cfg.pipeline.device)
        self.rng = torch.Generator().manual_seed(cfg.seed)  # CPU: augmentation and branch decisions
        self.prior = prior if prior is not None else build_prior(cfg, self.device)
        self.loss = build_loss(cfg.guidance, self.prior, torch.Generator().manual_seed(cfg.guidance.noise_seed))
        self.sampler = OrbitCameraSampler(cfg.camera, cfg.optim, torch.Generator().manual_seed(cfg.seed + 1),
                                          stack_size=cfg.model.batch)
        xyz, rgb = initial_points(cfg.camera, torch.Generator().manual_seed(cfg.seed + 2))
        self.gaussians = GaussianModel.from_points(xyz, rgb, cfg.model.sh_degree, device=self.device)
        self.extent = float(cfg.camera.default_radius)
        self.gaussians.setup_optimizer(cfg.optim, spatial_lr_scale=self.extent)
        # every random draw of a step comes from the trainer's generators, none from torch's global ones:
        # a background compilation rewinds those (guidance/background_compile.py)
        self.noise_rng = torch.Generator(device=self.device).manual_seed(cfg.seed + 3)  # scale, SH, posterior, splits
        self.densification = DensificationStrategy.from_config(cfg.optim, self.extent, self.device,
                                                               generator=self.noise_rng)
        self.step = 0
        self.compile_cache: PortableCompileCache | None = None  # set by warm_up_prior
        self.compiled_prior_step: int | None = None  # first step on the compiled programs of a background compile
        self.batch_size = cfg.guidance.C_batch_size
        self.timer = NullTimer()
        self.health = NonFiniteGuard(self.device)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.pipeline.cudnn_benchmark

    def warm_up_prior(self, background: bool = False) -> None:
        """Compile the prior's networks on this run's step shapes before the first render (a no-op for a
        prior with nothing to compile): see StableDiffusionPrior.warm_up. background=True: compile in a
        background thread while the steps run uncompiled; train_step adopts the compiled programs at the
        first iteration boundary after they are ready (StableDiffusionPrior.start_background_warm_up)."""
        warm_up = getattr(self.prior, "warm_up", None)
        if warm_up is None:
            return
        shard = self.group.shard(self.batch_size)
        shape = (self.batch_size if shard is None else shard.size, int(self.cfg.camera.image_h),
                 int(self.cfg.camera.image_w))
        self.compile_cache = self._portable_compile_cache(shape)
        if self.compile_cache is not None:
            self.compile_cache.load()
        start = getattr(self.prior, "start_background_warm_up", None)
        if background and start is not None:
            start(*shape)  # the programs are saved when adopted
        else:
            warm_up(*shape)
            self._save_compile_cache()

    def _portable_compile_cache(self, shape: tuple[int, int, int]) -> PortableCompileCache | None:
        """PipelineParams.compile_cache's file for this prior's compiled programs at the step shapes; None when
        it is off or the prior compiles nothing."""
        folder = self.cfg.pipeline.compile_cache
        signature = getattr(self.prior, "compile_signature", lambda: None)()
        if folder == "none" or signature is None:
            return None
        folder = default_cache_folder() if folder == "auto" else folder
        return PortableCompileCache(folder, setup_key(self.device, {"prior": signature, "step_shape": shape}))

    def _save_compile_cache(self) -> None:
        if self.compile_cache is not None and self.group.is_writer:  # one writer for every process of a run
            self.compile_cache.save()

    def adopt_compiled_prior(self, step: int) -> None:
        """Between iterations: switch to the prior's compiled programs once its background compilation is
        done (`compiled_prior_step` records the first step that ran them)."""
        adopt = getattr(self.prior, "adopt_compiled_programs", None)
        if adopt is not None and adopt():
            self.compiled_prior_step = step
            self._save_compile_cache()

    # ------------------------------------------------------------------ one iteration

    def _uniform(self) -> float:
        return float(torch.rand((), generator=self.rng))

    def backgrounds(self, batch: int) -> Tensor:
        """[B, 3] training backgrounds: black, replaced with probability bg_aug_ratio by a random
        colour or black (half each), as the official renderer does per camera."""
        replace = torch.rand(batch, generator=self.rng) < self.cfg.model.bg_aug_ratio
        use_random = torch.rand(batch, generator=self.rng) < 0.5
        colours = torch.rand(batch, 3, generator=self.rng)
        bg = torch.where((replace & use_random).unsqueeze(1), colours, torch.zeros_like(colours))
        return bg.to(self.device)

    def scale_noise(self, cameras: int, shard: BatchShard | None = None) -> Tensor | None:
        """[cameras, N, 3] standard-normal scale noise, one draw per camera; None when no camera is augmented.

        The official `render()` draws `randn_like(scales)` at each call, i.e. independently per camera,
        each camera with probability scale_aug_ratio. Every process draws the whole batch's decisions and
        noise (the same streams as one process) and keeps its rows; a camera not augmented gets zero noise.
        """
        total = shard.total if shard is not None else cameras
        augmented = torch.rand(total, generator=self.rng) < self.cfg.model.scale_aug_ratio  # [total], on the CPU
        if not bool(augmented.any()):
            return None
        noise = torch.randn(total, self.gaussians.num_points, 3, generator=self.noise_rng, device=self.device)
        noise = noise * augmented.to(self.device, noise.dtype)[:, None, None]  # [total, N, 3]
        return noise if shard is None else noise[shard.start:shard.stop]

    def render_batch(self, cameras: Cameras, background: Tensor,
                     shard: BatchShard | None = None) -> tuple[RenderOutput, Tensor]:
        """Render with the training augmentations; returns the output and the (noised) scales, [b, N, 3]
        with one set per camera when the scale augmentation is on ([N, 3] otherwise)."""
        model = self.cfg.model
        sh_degree = 0 if self._uniform() < model.sh_deg_aug_ratio else None
        noise = self.scale_noise(len(cameras), shard)
        tensors = self.gaussians.gaussian_tensors(sh_degree=sh_degree, scale_noise=noise)
        # drawn only when enabled, so that runs without it keep their random streams
        if model.shs_aug_ratio > 0 and self._uniform() < model.shs_aug_ratio:
            sh = tensors.sh_coeffs
            noise = torch.randn(sh.shape, generator=self.noise_rng, device=self.device)
            tensors = dataclasses.replace(tensors, sh_coeffs=sh + noise * (SHS_NOISE_STD * sh))
        options = dict(backend=self.cfg.pipeline.renderer, depth_grad_to_z=self.cfg.pipeline.depth_grad_to_z)
        if not self.cfg.pipeline.render_per_camera:
            return render(tensors, cameras, background, **options), tensors.scales
        per_camera = tensors.scales.dim() == 3
        outs = [render(dataclasses.replace(tensors, scales=tensors.scales[i]) if per_camera else tensors,
                       cameras[i], background[i:i + 1], **options) for i in range(len(cameras))]
        return RenderOutput.concat(outs), tensors.scales

    def guidance_images(self, out: RenderOutput, step: int) -> Tensor:
        """The rendered RGB, or with probability as_latent_ratio the depth map as a 3-channel image."""
        as_latent = step < self.cfg.optim.geo_iter or self._uniform() < self.cfg.optim.as_latent_ratio
        return out.depth.expand(-1, 3, -1, -1) if as_latent else out.rgb

    def distillation_surrogate(self, images: Tensor, rgb: Tensor, cond: Conditioning, step: int,
                               shard: BatchShard | None = None) -> tuple[Tensor, dict]:
        """<sg(g), z0> (+ <sg(g_px), rgb>): its gradient is the loss's direction (no backward through the prior).

        images: [B, 3, H, W] what the prior encodes (the RGB, or the depth map); rgb: [B, 3, H, W] the
        rendered RGB, which a pixel constraint acts on whichever the prior saw (official `train_step`'s L_cp).
        """
        if self._uniform() < 0.5:
            images, rgb, cond = images.flip(-1), rgb.flip(-1), cond.hflip()
        info = StepInfo(step, warm_up_rate(step, self.cfg.optim.warmup_iter), shard)
        chunk = self.cfg.pipeline.encode_chunk
        if chunk and chunk < images.shape[0]:
            return self._chunked_surrogate(images, rgb, cond, info, chunk)
        with self.timer("encode"):
            z0 = self.prior.encode(images, self.noise_rng)
        with self.timer("guidance"):
            out = self.loss(z0.detach(), cond, info)
        surrogate = (out.latent_grad.float() * z0.float()).sum()
        if out.pixel_grad is not None:
            surrogate = surrogate + (out.pixel_grad.float() * rgb.float()).sum()
        return surrogate, out.scalars

    def _chunked_surrogate(self, images: Tensor, rgb: Tensor, cond: Conditioning, info: StepInfo, chunk: int):
        """Low-memory variant: encode without a graph, get the direction, then run the encoder's
        forward+backward `chunk` images at a time. Returns <dL/dx, x> (+ <g_px, rgb>), whose gradient
        on the images (and the RGB) is exactly the one the unchunked surrogate gives."""
        parts = range(0, images.shape[0], chunk)
        with self.timer("encode"), torch.no_grad():
            z0 = torch.cat([self.prior.encode(images[i:i + chunk], self.noise_rng) for i in parts])
        with self.timer("guidance"):
            out = self.loss(z0, cond, info)
        leaf = images.detach().requires_grad_(True)
        with self.timer("encode_backward"):
            for i in parts:
                z = self.prior.encode(leaf[i:i + chunk], self.noise_rng)
                (out.latent_grad[i:i + chunk].float() * z.float()).sum().backward()
        surrogate = (leaf.grad.detach().float() * images.float()).sum()
        if out.pixel_grad is not None:
            surrogate = surrogate + (out.pixel_grad.float() * rgb.float()).sum()
        return surrogate, out.scalars

    def train_step(self, step: int, before_update: Callable[[], None] | None = None) -> StepResult:
        """One iteration: gradients, then clipping, densification and the optimizer step.

        before_update: called between the two (the official train.py renders its test views and saves
            its snapshots there: before densification, the opacity reset and the step change the Gaussians).

        The last iteration (step == OptimizationParams.iterations) computes its loss and gradients but
        updates nothing: the official SegmentDreamer train.py steps the optimizer only
        `if iteration < opt.iterations`, and the asset it saves at that iteration (`scene.save`) is taken
        before its densification and opacity reset. So `iterations` steps make `iterations - 1` updates,
        and every final output (PLY, test views, video, mesh) is the state of that last snapshot, never
        the nearly transparent one right after an opacity reset. (The official code still densifies and
        resets the model it keeps in memory: its `testing()` renders after them.)
        """
        self.adopt_compiled_prior(step)
        result = self.compute_gradients(step)
        if before_update is not None:
            before_update()
        if self.is_last_step(step):
            self.discard_gradients()
            return result
        with self.timer("optimizer_densify"):
            self.after_backward(step, result.render, result.shard)
        return result

    def is_last_step(self, step: int) -> bool:
        return step >= self.cfg.optim.iterations

    def discard_gradients(self) -> None:
        """Drop the Gaussians' gradients without an update (what optimizer_step's zero_grad would do)."""
        for tensor in self.gaussians.params().values():
            tensor.grad = None

    def compute_gradients(self, step: int) -> StepResult:
        """Render a camera batch, run the distillation loss and back-propagate (no parameter update)."""
        cfg = self.cfg
        lrs = self.gaussians.update_learning_rate(step)
        if step % 500 == 0:
            self.gaussians.one_up_sh_degree()
        self.sampler.update_ranges(step)
        cameras = self.sampler.sample(self.batch_size).to(self.device)
        background = self.backgrounds(len(cameras))
        shard = self.group.shard(len(cameras))  # every process drew the whole batch; it keeps its rows
        if shard is not None:
            cameras, background = cameras[shard.start:shard.stop], shard.take(background)
        with self.timer("render"):
            out, scales = self.render_batch(cameras, background, shard)
        images = self.guidance_images(out, step)
        cond = self.prior.condition(cameras, background)
        surrogate, scalars = self.distillation_surrogate(images, out.rgb, cond, step, shard)
        loss_tv = tv_loss(out.rgb) + tv_loss(out.depth)
        loss_scale = scales.mean()  # official: the mean of the per-camera noised scales
        if shard is not None:  # after the gradient sum: both are the whole batch's means
            loss_tv = loss_tv * (shard.size / shard.total)
            loss_scale = loss_scale * (shard.size / shard.total)
        total = surrogate + cfg.optim.lambda_tv * loss_tv + cfg.optim.lambda_scale * loss_scale
        with self.timer("backward"):
            total.backward()
        scalars = {**scalars, "loss/tv": loss_tv.detach(), "loss/scale": loss_scale.detach(),
                   **{f"lr/{k}": v for k, v in lrs.items()}}
        return StepResult(loss=total.detach(), scalars=scalars, render=out, images=images.detach(), shard=shard)

    def after_backward(self, step: int, out: RenderOutput, shard: BatchShard | None = None) -> None:
        """Clipping, densification, opacity reset, BEG, then the optimizer step (official order).
        With several processes, gradients are summed and screen-space statistics gathered first."""
        cfg, g = self.cfg.optim, self.gaussians
        with self.timer("communication"):
            self.group.sum_gradients(list(g.params().values()))
        # after the sum: the same flag on every process
        skip = self.health.check(g.params())  # 1.0 on the device when anything is NaN/Inf: no update
        clip = gradient_clip_value(cfg.grad_clip, step)
        if clip is not None:
            g.clip_gradients(clip)
        if self.densification.collects(step):
            with self.timer("communication"):  # the statistics take the whole batch, camera by camera
                means2d_grad = self.group.gather_rows(out.means2d_grad(), shard)  # [B, N, 2]
                radii = self.group.gather_rows(out.radii, shard)  # [B, N]
            self.densify(step, means2d_grad, radii, out.rgb.shape[-1], out.rgb.shape[-2], skip)
        if self.cfg.guidance.BEG and cfg.start_reset_iter < step < cfg.end_reset_iter:
            self.brightness_equalization(out.rgb.detach(), shard)
        g.optimizer_step(skip)

    def densify(self, step: int, means2d_grad: Tensor, radii: Tensor, width: int, height: int,
                skip: Tensor) -> dict[str, int] | None:
        """The strategy's statistics, densification and opacity reset; an empty model stops the run."""
        cfg = self.cfg.optim
        try:
            return self.densification.step_post_backward(self.gaussians, step, means2d_grad, radii, width, height,
                                                         skip)
        except AllPrunedError as exc:
            raise TrainingStopped(
                f"training stopped at step {step}: {exc}. Lower OptimizationParams.min_opacity "
                f"(now {cfg.min_opacity}) or set OptimizationParams.max_screen_size=0; the opacity reset every "
                f"OptimizationParams.opacity_reset_interval={cfg.opacity_reset_interval} iterations caps every "
                "opacity at 0.01, so min_opacity must stay below that") from None

    def brightness_equalization(self, rgb: Tensor, shard: BatchShard | None = None) -> None:
        """BEG (GCS): if the 0.85-quantile of the per-view bright-pixel quantiles exceeds lgt_thresh,
        scale every SH coefficient by reset_rate. The foreground mask is the official 'mean > 0'
        (it assumes the black training background). Runs its quantiles on the device; one sync."""
        cfg = self.cfg.optim
        brightness = rgb.mean(1).flatten(1)  # [B, H*W]
        masked = torch.where(brightness > 0, brightness, torch.full_like(brightness, float("nan")))
        per_view = torch.nan_to_num(torch.nanquantile(masked, cfg.thresh, dim=1), nan=0.0)
        per_view = self.group.gather_rows(per_view, shard)  # [B] over the whole batch
        if float(torch.quantile(per_view, cfg.thresh)) > cfg.lgt_thresh:
            self.gaussians.scale_colors(cfg.reset_rate)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def render_views(self, cameras: Cameras, background: Tensor, chunk: int = 8) -> RenderOutput:
        """Render many cameras in chunks (evaluation; no augmentation, active SH degree)."""
        return render_in_chunks(self.gaussians.gaussian_tensors(), cameras, background, chunk,
                                backend=self.cfg.pipeline.renderer)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "gaussians": self.gaussians.state_dict(),
            "densification": self.densification.state_dict(),
            "sampler": self.sampler.state_dict(),
            "loss": self.loss.state_dict(),
            "rng": self.rng.get_state(),
            "noise_rng": self.noise_rng.get_state(),
            "global_rng": global_rng_state(),
            "health": self.health.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint format version {state.get('version')} is not this program's "
                             f"{CHECKPOINT_VERSION}: it was written by another version of train.py")
        self.step = int(state["step"])
        self.gaussians.load_state_dict(state["gaussians"])
        self.densification.load_state_dict(state["densification"])
        self.sampler.load_state_dict(state["sampler"])
        self.loss.load_state_dict(state["loss"])
        self.rng.set_state(state["rng"])
        self.noise_rng.set_state(state["noise_rng"])
        restore_global_rng_state(state["global_rng"])
        self.health.load_state_dict(state["health"])
