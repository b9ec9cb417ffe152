"""Every distillation loss against the analytic prior, whose answer is known: the hidden scene."""
import math

import pytest
import torch

from guidance.analytic_prior import AnalyticPrior, procedural_scene
from guidance.losses import LOSSES, StepInfo, build_loss
from guidance.losses.base import NoiseSource
from scene.camera_sampler import orbit_cameras
from tests.prior_doubles import RecordingPrior
from utils.config import load_config


@pytest.fixture(scope="module")
def prior():
    return AnalyticPrior(procedural_scene("blobs"), std=0.05, num_distractors=2, backend="torch")


@pytest.fixture(scope="module")
def views(prior):
    b = 3
    cams = orbit_cameras(torch.full((b,), 3.5), torch.full((b,), 80.0), torch.tensor([0.0, 120.0, 240.0]),
                         torch.full((b,), 0.55), 32, 32)
    background = torch.zeros(b, 3)
    return cams, background, prior.reference_images(cams, background)


def _cfg(**guidance):
    overrides = ["GuidanceParams.prior=analytic", "GuidanceParams.lambda_guidance=0.1",
                 "GuidanceParams.fix_noise=true", "GuidanceParams.phase_num=5"]
    overrides += [f"GuidanceParams.{k}={v}" for k, v in guidance.items()]
    return load_config(None, overrides, warn_no_effect=False).guidance


VARIANTS = [
    {"guidance_type": "sctd"},
    {"guidance_type": "sctd", "sctd_cross_prediction": "cond", "sctd_approximate_null": "false",
     "sctd_weighting": "paper", "t_mode": "mono"},
    {"guidance_type": "ism"},
    {"guidance_type": "sds"},
    {"guidance_type": "cds"},
    {"guidance_type": "gcs"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(str(x) for x in v.values()))
@pytest.mark.parametrize("rate", [1.0, 0.0])
def test_one_step_moves_render_towards_hidden_target(prior, views, variant, rate):
    """The injected direction g, averaged over a few timestep draws, satisfies <g, z0 - mu> > 0:
    a small descent step z0 - eta g gets closer to the hidden scene's render mu from a colour-shifted
    start. (A single GCS draw may point away: its compact-consistency term has no fixed sign.)"""
    cams, background, target = views
    loss = build_loss(_cfg(**variant), prior, torch.Generator().manual_seed(0))
    cond = prior.condition(cams, background)
    mu = prior.encode(target)
    shifted = (target + torch.tensor([0.25, -0.2, 0.15]).view(1, 3, 1, 1)).clamp(0, 1)
    z0 = prior.encode(shifted)
    g = torch.zeros_like(z0)
    for step in range(1, 7):
        out = loss(z0, cond, StepInfo(step=step, warm_up_rate=rate))
        assert out.latent_grad.shape == z0.shape and torch.isfinite(out.latent_grad).all()
        g += out.latent_grad
    assert (g * (z0 - mu)).sum() > 0
    eta = 0.05 * (z0 - mu).norm() / g.norm()
    assert (z0 - eta * g - mu).norm() < (z0 - mu).norm()


@pytest.mark.parametrize("variant,expected", [
    ({"guidance_type": "sctd", "t_threshold": 0}, [("null",), ("null",), ("neg", "pos"), ("null",)]),
    ({"guidance_type": "sctd", "t_threshold": 999}, [("null",), ("neg", "pos"), ("null",)]),
    ({"guidance_type": "sctd", "t_threshold": 0, "sctd_approximate_null": "false"},
     [("null",), ("null",), ("neg", "pos", "null"), ("null",)]),
    ({"guidance_type": "sds"}, [("neg", "pos")]),
    ({"guidance_type": "cds"}, [("neg", "pos"), ("neg", "pos")]),
    ({"guidance_type": "gcs"}, [("null",), ("null",), ("neg", "pos", "null"), ("null",), ("neg", "pos")]),
])
def test_denoiser_calls_per_loss(prior, views, variant, expected):
    """The denoiser calls each loss makes per step, as in the official `train_step`s (branches batched per call)."""
    cams, background, target = views
    counting = RecordingPrior(prior)
    loss = build_loss(_cfg(**variant), counting, torch.Generator().manual_seed(0))
    loss(prior.encode(target), prior.condition(cams, background), StepInfo(step=1, warm_up_rate=0.5))
    assert counting.branches == expected


def test_ism_inversion_calls_follow_the_interval(prior, views):
    """x_s comes from ceil(i_s / xs_delta_t) empty-prompt inversion steps from index 0 (timestep 1), plus the
    target call; indices i map to timesteps i + 1."""
    cams, background, target = views
    counting = RecordingPrior(prior)
    loss = build_loss(_cfg(guidance_type="ism"), counting, torch.Generator().manual_seed(3))
    seen = set()
    for step in range(12):
        counting.branches.clear()
        out = loss(prior.encode(target), prior.condition(cams, background), StepInfo(step=step, warm_up_rate=1.0))
        t, s = int(out.scalars["t"]), int(out.scalars["s"])
        assert s == max(t - 100, 1)  # delta_T = 100 at the start of the warm-up, i_s = max(i_t - 100, 0)
        n_inv = math.ceil((s - 1) / 200)
        assert counting.branches == [("null",)] * (n_inv + 1) + [("neg", "pos")]
        seen.add(n_inv)
    assert len(seen) >= 3  # several interval lengths were exercised


def test_sctd_paper_switches_change_the_direction(prior, views):
    cams, background, target = views
    z0 = prior.encode(target)
    cond = prior.condition(cams, background)
    official = build_loss(_cfg(guidance_type="sctd"), prior, torch.Generator().manual_seed(0))
    paper = build_loss(_cfg(guidance_type="sctd", sctd_cross_prediction="cond"), prior,
                       torch.Generator().manual_seed(0))
    a = official(z0 + 0.3, cond, StepInfo(1, 0.0)).latent_grad
    b = paper(z0 + 0.3, cond, StepInfo(1, 0.0)).latent_grad
    assert not torch.allclose(a, b)


def test_registry_lists_every_loss_and_rejects_unknown(prior):
    assert set(LOSSES) == {"sctd", "ism", "sds", "cds", "gcs"}
    cfg = _cfg()
    object.__setattr__(cfg, "guidance_type", "csd")
    with pytest.raises(ValueError, match="GuidanceParams.guidance_type"):
        build_loss(cfg, prior, torch.Generator())


def test_noise_source_fixed_and_fresh():
    like = torch.zeros(2, 4, 8, 8)
    fixed = NoiseSource(fixed=True, offset=0.1, seed=0)
    assert torch.equal(fixed(like), fixed(like))
    fresh = NoiseSource(fixed=False, offset=0.1, seed=0)
    assert not torch.equal(fresh(like), fresh(like))
    shared = NoiseSource(fixed=True, offset=0.1, seed=0, shared=True)(like)
    assert torch.equal(shared[0], shared[1])
    # reproducible from the seed
    assert torch.equal(NoiseSource(True, 0.1, 7)(like), NoiseSource(True, 0.1, 7)(like))
