"""Timestep values and the SCTD direction against the official code, on the tiny random SD (float32).

Where the official values come from (repository, file, function; line numbers at the commits the
project's notes were written against: LucidDreamer 2ecf093, SegmentDreamer ceb78a6, GCS a3bd9ae):
  * index -> timestep: LucidDreamer guidance/sd_utils.py `StableDiffusion.__init__` (L119-125) and the same
    lines in SegmentDreamer guidance/sctd_utils.py and GCS guidance/gcs_utils.py (L124-130):
    `scheduler.set_timesteps(1000)`, `timesteps = flip(scheduler.timesteps)`; SD 2.1's scheduler config has
    steps_offset 1 with "leading" spacing, so timesteps = [1, 2, ..., 1000] and index i means timestep i + 1.
  * ISM: LucidDreamer guidance/sd_utils.py `train_step` (L376-405): delta = int(80 + rate * 20);
    ind_t = randint(20, 500 + int(480 rate)); ind_s = max(ind_t - delta, 0); x_s by `add_noise_with_cfg`
    (L159-215) from timesteps[max(ind_s - 200 * 5, 0)] in strides of 200 indices up to ind_s; target eps at
    timesteps[ind_s]; CFG at timesteps[ind_t]. `train_step_perpneg` (L250): delta = int(80 + ceil(rate * 20)).
  * SDS (`sds: true`): the same file, `train_step`: one CFG call at timesteps[ind_t].
  * SCTD: SegmentDreamer guidance/sctd_utils.py `trajectory_segmentation` (L168-182): edges =
    timesteps[linspace(20, 980, N + 1) - 1]; `timestep_setting` (L631-652): t = timesteps[randint(20 + k, 500 + k)],
    e = largest edge <= t, t = max(t, e + 80), s = randint(e + 10, t - 10) (a value); `train_step` (L338-471):
    denoiser calls at e, s (inversion), t (CFG), s (consistency target).
  * GCS: GCS guidance/gcs_utils.py `train_step` (L449-465): ind_t, ind_s = ind_t - delta, ind_e, each mapped
    through timesteps.
  * CDS: Consistent3D threestudio/models/guidance/stable_diffusion_guidance.py `__call__` (L548-585): timestep
    values used as drawn (no grid).
"""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from guidance.analytic_prior import AnalyticPrior, procedural_scene
from guidance.losses import StepInfo, build_loss
from guidance.losses.ism import ism_interval
from guidance.losses.sctd import SCTDTimesteps, uniform_edges
from guidance.stable_diffusion import StableDiffusionPrior, scheduler_timestep_grid
from guidance.timesteps import TimestepGrid
from scene.cameras import Cameras
from tests.prior_doubles import RecordingPrior
from utils.config import load_config

B = 2


def _cameras(b=B):
    full = lambda v: torch.full((b,), v)  # noqa: E731
    return Cameras(world_to_camera=torch.eye(4).repeat(b, 1, 1), fov_x=full(0.8), fov_y=full(0.8),
                   azimuth_deg=torch.linspace(-150.0, 150.0, b), polar_deg=full(90.0), radius=full(3.0),
                   width=64, height=64)


@pytest.fixture(scope="module")
def sd_prior(tiny_sd_dir, make_guidance_cfg):
    return StableDiffusionPrior.from_config(make_guidance_cfg(model_key=str(tiny_sd_dir), precision="fp32"), "cpu")


@pytest.fixture(scope="module")
def sd_perpneg_prior(tiny_sd_dir, make_guidance_cfg):
    cfg = make_guidance_cfg(model_key=str(tiny_sd_dir), precision="fp32", perpneg=True)
    return StableDiffusionPrior.from_config(cfg, "cpu")


def _guidance_cfg(**keys):
    overrides = ["GuidanceParams.lambda_guidance=0.1", "GuidanceParams.fix_noise=true", "GuidanceParams.phase_num=5",
                 "GuidanceParams.t_threshold=150"]
    overrides += [f"GuidanceParams.{k}={v}" for k, v in keys.items()]
    return load_config(None, overrides, warn_no_effect=False).guidance


def _run(prior, seed, rate, **keys):
    """One loss evaluation on random latents; returns (loss output, denoiser call timesteps)."""
    recording = RecordingPrior(prior)
    loss = build_loss(_guidance_cfg(**keys), recording, torch.Generator().manual_seed(seed))
    z0 = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(100 + seed))
    out = loss(z0, prior.condition(_cameras()), StepInfo(step=1, warm_up_rate=rate))
    return out, recording.timesteps


def _draw(seed):
    """The official draws replayed: the same generator calls, in the same order, as the official sampler."""
    g = torch.Generator().manual_seed(seed)
    return lambda low, high: int(torch.randint(low, high, (1,), generator=g))


def test_sd21_scheduler_grid_is_index_plus_one(sd_prior):
    """SD 2.1's scheduler config (steps_offset 1, leading): timesteps = [1, ..., 1000] (module docstring)."""
    assert sd_prior.scheduler.config.steps_offset == 1
    grid = sd_prior.timestep_grid
    assert len(grid) == 1000 and grid(0) == 1 and grid(200) == 201 and grid(979) == 980 and grid(999) == 1000
    assert grid == TimestepGrid.with_offset(1000, 1)


@pytest.mark.parametrize("config,first,last", [
    ({"steps_offset": 0}, 0, 999),
    ({"steps_offset": 1, "timestep_spacing": "trailing"}, 0, 999),
    ({"steps_offset": 1, "timestep_spacing": "linspace"}, 0, 999),
])
def test_scheduler_grid_follows_offset_and_spacing(config, first, last):
    grid = scheduler_timestep_grid(DDIMScheduler(num_train_timesteps=1000, **config))
    assert grid(0) == first and grid(999) == last and list(grid.values) == sorted(grid.values)


def test_analytic_prior_uses_the_sd_convention():
    """No scheduler config of its own: SD's noise schedule and SD's grid, so a draw means the same noise level."""
    prior = AnalyticPrior(procedural_scene("blobs"), backend="torch")
    assert prior.timestep_grid == TimestepGrid.with_offset(1000, 1)
    assert AnalyticPrior(procedural_scene("blobs"), backend="torch", steps_offset=0).timestep_grid(20) == 20


def test_uniform_edges_follow_the_grid_and_truncate_like_tensor_indexing():
    sd, identity = TimestepGrid.with_offset(1000, 1), TimestepGrid.with_offset(1000, 0)
    assert uniform_edges(5, sd) == [20, 212, 404, 596, 788, 980]
    assert uniform_edges(5, identity) == [19, 211, 403, 595, 787, 979]
    # N = 7: linspace(20, 980, 8) - 1 = [19, 156.14, 293.29, 430.43, 567.57, ...]; indexing truncates
    assert uniform_edges(7, sd) == [20, 157, 294, 431, 568, 705, 842, 980]


def test_window_beyond_the_schedule_is_refused(sd_prior):
    """max_t_range 1.0 lets the window draw index 999, timestep 1000: the model has 0..999."""
    with pytest.raises(ValueError, match="GuidanceParams.max_t_range"):
        build_loss(_guidance_cfg(guidance_type="sctd", max_t_range=1.0), sd_prior, torch.Generator())


@pytest.mark.parametrize("seed,rate", [(0, 1.0), (1, 0.5), (2, 0.0), (3, 0.0)])
def test_sctd_timesteps_equal_the_official_draw(sd_prior, seed, rate):
    draw = _draw(seed)
    k = int(480 * rate)
    t = draw(20 + k, 500 + k) + 1
    edge = max(e for e in (20, 212, 404, 596, 788, 980) if e <= t)
    t = max(t, edge + 80)
    s = draw(edge + 10, t - 10)
    out, calls = _run(sd_prior, seed, rate, guidance_type="sctd")
    assert (out.scalars["t"], out.scalars["s"], out.scalars["s_m"]) == (t, s, edge)
    inversion = [edge, s] if t >= 150 else [edge]  # two inversion steps from t_threshold = 150 on
    assert calls == [[v] * B for v in inversion + [t, s]]


@pytest.mark.parametrize("seed,rate", [(0, 1.0), (1, 0.3), (2, 0.0)])
def test_ism_timesteps_and_inversion_grid_equal_the_official(sd_prior, seed, rate):
    draw = _draw(seed)
    i_t = draw(20, 500 + int(480 * rate))
    i_s = max(i_t - int(80 + rate * 20), 0)
    start = max(i_s - 200 * 5, 0)
    # 1, 201, 401, ... below s (with i_s = 0 the official code makes one zero-length, no-op inversion call)
    inversion = [i + 1 for i in range(start, i_s, 200)]
    out, calls = _run(sd_prior, seed, rate, guidance_type="ism")
    assert (out.scalars["t"], out.scalars["s"]) == (i_t + 1, i_s + 1)
    assert calls == [[v] * B for v in inversion + [i_s + 1, i_t + 1]]


def test_ism_inversion_with_fewer_steps_starts_below_s(sd_prior):
    """xs_inv_steps = 1: the official inversion starts at index max(i_s - 200, 0), one stride below s."""
    draw = _draw(5)
    i_t = draw(20, 980)
    i_s = max(i_t - 100, 0)
    _, calls = _run(sd_prior, 5, 1.0, guidance_type="ism", xs_inv_steps=1)
    expected = ([[max(i_s - 200, 0) + 1] * B] if i_s > 0 else []) + [[i_s + 1] * B, [i_t + 1] * B]
    assert calls == expected


def test_ism_perp_neg_rounds_the_interval_up(sd_perpneg_prior):
    rate = 0.33  # 20 * 0.33 = 6.6: int gives 86, ceil gives 87
    assert ism_interval(rate, 80, 100, True) == 86 and ism_interval(rate, 80, 100, True, round_up=True) == 87
    assert ism_interval(rate, 80, 100, False, round_up=True) == 80
    draw = _draw(4)
    i_t = draw(20, 500 + int(480 * rate))
    out, _ = _run(sd_perpneg_prior, 4, rate, guidance_type="ism", perpneg="true")
    assert (out.scalars["t"], out.scalars["s"]) == (i_t + 1, max(i_t - 87, 0) + 1)


@pytest.mark.parametrize("seed,rate", [(0, 1.0), (1, 0.0)])
def test_sds_timestep_equals_the_official_draw(sd_prior, seed, rate):
    t = _draw(seed)(20, 500 + int(480 * rate)) + 1
    out, calls = _run(sd_prior, seed, rate, guidance_type="sds")
    assert out.scalars["t"] == t and calls == [[t] * B]


@pytest.mark.parametrize("seed,rate", [(0, 1.0), (1, 0.0)])
def test_gcs_timesteps_equal_the_official_draw(sd_prior, seed, rate):
    draw = _draw(seed)
    delta = 80 + math.ceil(rate * 20)
    k = int(480 * rate)
    i_t = max(draw(20 + k, 500 + k), delta + 1)
    i_s = i_t - delta
    i_e = max(draw(max(i_t - 2 * delta, 0), max(i_t - delta - 10, 1)), 1)
    t, s, e = i_t + 1, i_s + 1, i_e + 1
    out, calls = _run(sd_prior, seed, rate, guidance_type="gcs")
    assert (out.scalars["t"], out.scalars["s"], out.scalars["e"]) == (t, s, e)
    assert calls == [[e] * B, [s] * B, [t] * B, [s] * B, [e] * B]


def test_cds_uses_timestep_values_without_a_grid(sd_prior):
    """threestudio conditions on the drawn values: at step 0, s = cds_t_start = 700 and t = s + U[100, 300)."""
    gaps = torch.randint(100, 300, (B,), generator=torch.Generator().manual_seed(0))
    _, calls = _run(sd_prior, 0, 1.0, guidance_type="cds", cds_anneal_iters=3000)
    step1_s = int(700 + (100 - 700) * math.sqrt(1 / 3000))
    assert calls == [(step1_s + gaps).tolist(), [step1_s] * B]


def _dpm_solver_1(x, eps, t, s, alphas_cumprod):
    """SegmentDreamer guidance/solver.py, first-order DPM-Solver++ written in its lambda form:
    x_s = (sigma_s / sigma_t) x - alpha_s (exp(-h) - 1) x0_hat, h = lambda_s - lambda_t, indexed at the values."""
    a_t, a_s = alphas_cumprod[t].sqrt(), alphas_cumprod[s].sqrt()
    sig_t, sig_s = (1 - alphas_cumprod[t]).sqrt(), (1 - alphas_cumprod[s]).sqrt()
    h = torch.log(a_s / sig_s) - torch.log(a_t / sig_t)
    x0 = (x - sig_t * eps) / a_t
    return (sig_s / sig_t) * x - a_s * (torch.exp(-h) - 1) * x0


def _official_sctd(prior, z0, noise, cond, t, s, e, scale, lambda_g, w_cp):
    """SegmentDreamer guidance/sctd_utils.py `train_step` (non-Perp-Neg) recomputed from its steps, with the
    diffusers scheduler's add_noise and the UNet called directly."""
    unet, ac = prior.unet, prior.scheduler.alphas_cumprod.double()
    null, neg, pos = (cond.branches[k] for k in ("null", "neg", "pos"))

    def eps(x, step, context):
        return unet(x, torch.full((x.shape[0],), step), encoder_hidden_states=context).sample.double()

    def cfg(x, step):
        both = unet(torch.cat([x, x]).float(), torch.full((2 * x.shape[0],), step),
                    encoder_hidden_states=torch.cat([neg, pos])).sample.double()
        e_neg, e_pos = both.chunk(2)
        return e_neg + scale * (e_pos - e_neg)

    def step(x, noise_pred, a, b):
        return _dpm_solver_1(x.double(), noise_pred, a, b, ac).float()

    x_e0 = prior.scheduler.add_noise(z0, noise, torch.tensor([e]))
    if t >= 150:  # t_threshold: two inversion steps e -> s -> t
        x_s_inv = step(x_e0, eps(x_e0, e, null), e, s)
        x_t = step(x_s_inv, eps(x_s_inv, s, null), s, t)
    else:
        x_t = step(x_e0, eps(x_e0, e, null), e, t)
    eps_t = cfg(x_t, t)
    x_s = step(x_t, eps_t, t, s)
    x_e_s_null = step(x_s, eps(x_s, s, null), s, e)
    x_e_t_cond = step(x_t, eps_t, t, e)
    grad = (x_e_s_null.double() - x_e0.double()) + (scale + 1) * (x_e0.double() - x_e_t_cond.double())
    grad = lambda_g * ((1 - ac[t]) / ac[t]).sqrt() * grad
    x0_cond = (x_e_t_cond.double() - (1 - ac[e]).sqrt() * cfg(x_e_t_cond, e)) / ac[e].sqrt()
    x0_null = (x_e0.double() - (1 - ac[e]).sqrt() * eps(x_e0, e, null)) / ac[e].sqrt()
    decoded = prior.decode(torch.cat([x0_cond, x0_null]).float()).double()
    pixel = 2 * w_cp * (decoded[B:] - decoded[:B]) / B  # d/d rgb of w_cp |rgb - sg(rgb + D_cond - D_null)|^2 / B
    return grad, pixel


@torch.no_grad()
@pytest.mark.parametrize("t,s,e", [(520, 470, 404), (130, 115, 20), (900, 812, 788)])
def test_sctd_equals_the_official_computation_for_explicit_timesteps(sd_prior, t, s, e):
    loss = build_loss(_guidance_cfg(guidance_type="sctd", w_cp=0.5, perpneg="false"), sd_prior, torch.Generator())
    cond = sd_prior.condition(_cameras())
    z0 = torch.randn(B, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    noise = loss.noise(z0)  # fixed noise: the tensor the loss uses
    out = loss.direction(z0, cond, SCTDTimesteps(t=t, s=s, edge=e))
    want, want_pixel = _official_sctd(sd_prior, z0, noise, cond, t, s, e, 7.5, 0.1, 0.5)
    for got, ref in ((out.latent_grad.double(), want), (out.pixel_grad.double(), want_pixel)):
        assert ref.norm() > 0
        assert ((got - ref).norm() / ref.norm()).item() < 1e-4


def test_uniform_edges_need_a_first_index():
    with pytest.raises(ValueError, match=r"GuidanceParams.t_range\[0\]"):
        uniform_edges(5, TimestepGrid.with_offset(1000, 1), first=0)
