"""Shared diffusion maths checked against independent computations."""
import math

import pytest
import torch

from guidance.analytic_prior import mixture_eps, mixture_posterior_mean, stable_diffusion_alphas_cumprod
from guidance.diffusion import NoiseSchedule, cfg_combine, eps_from_v, perp_neg_combine, perpendicular
from guidance.losses.sctd import (
    consistency_terms,
    monotonic_edges,
    sample_sctd_timesteps,
    segment_start,
    uniform_edges,
)
from guidance.timesteps import TimestepGrid, TimestepWindow, warm_up_rate

SD_GRID = TimestepGrid.with_offset(1000, 1)  # SD 2.1's scheduler: index i -> timestep i + 1


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule(stable_diffusion_alphas_cumprod())


def _t(v, b=3):
    return torch.full((b,), v, dtype=torch.long)


def test_schedule_matches_reference_magnitudes(schedule):
    # known values of the SD schedule: abar_t and w(t) = sigma_t / alpha_t at a few timesteps (the official
    # code's 1-based timesteps index alphas_cumprod directly, as ours do)
    for t, abar, w in [(100, 0.894, 0.34), (500, 0.276, 1.62), (979, 0.006, 12.97)]:
        assert schedule.alphas_cumprod[t].item() == pytest.approx(abar, abs=2e-3)
        assert schedule.snr_weight(_t(t, 1)).item() == pytest.approx(w, rel=0.02)


@pytest.mark.parametrize("t,s", [(500, 212), (212, 500), (979, 20), (21, 20)])
def test_ddim_step_equals_dpm_solver_1(schedule, t, s):
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    ddim = schedule.step(z, eps, _t(t), _t(s))
    dpm = schedule.step_dpm_solver(z, eps, _t(t), _t(s))
    # independent formula: alpha_s * x0 + sigma_s * eps from the raw table
    abar = schedule.alphas_cumprod.double()
    x0 = (z.double() - (1 - abar[t]).sqrt() * eps.double()) / abar[t].sqrt()
    expected = abar[s].sqrt() * x0 + (1 - abar[s]).sqrt() * eps.double()
    torch.testing.assert_close(ddim.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dpm.double(), expected, rtol=1e-4, atol=1e-4)


def test_inversion_then_denoising_returns_start_with_constant_noise(schedule):
    g = torch.Generator().manual_seed(1)
    z, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    up = schedule.step(schedule.step(z, eps, _t(20, 2), _t(300, 2)), eps, _t(300, 2), _t(700, 2))
    down = schedule.step(schedule.step(up, eps, _t(700, 2), _t(150, 2)), eps, _t(150, 2), _t(20, 2))
    torch.testing.assert_close(down, z, rtol=1e-4, atol=1e-4)
    # and the inverted sample is the forward-noised one: z_700 = alpha_700 x0 + sigma_700 eps
    x0 = schedule.pred_x0(z, eps, _t(20, 2))
    torch.testing.assert_close(up, schedule.add_noise(x0, eps, _t(700, 2)), rtol=1e-4, atol=1e-4)


def test_step_scale_is_the_coefficient_of_eps(schedule):
    z, eps = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
    t, e = _t(404, 1), _t(212, 1)
    assert schedule.step(z, eps, t, e).item() == pytest.approx(-schedule.step_scale(t, e).item(), rel=1e-5)


def test_eps_from_v_recovers_eps(schedule):
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    a, s = schedule.coefficients(torch.tensor([10, 200, 600, 990]))
    v = a * eps - s * x0
    torch.testing.assert_close(eps_from_v(v, a * x0 + s * eps, a, s), eps, rtol=1e-5, atol=1e-5)


def test_cfg_and_perp_neg():
    g = torch.Generator().manual_seed(3)
    neg, pos = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    comps = torch.randn(2, 2, 4, 8, 8, generator=g)
    assert torch.allclose(cfg_combine(neg, pos, 7.5), neg + 7.5 * (pos - neg))
    # zero (or tiny) weights reduce Perp-Neg to CFG
    zero = torch.tensor([[0.0, 5e-5], [0.0, 0.0]])
    torch.testing.assert_close(perp_neg_combine(neg, pos, comps, zero, 7.5), cfg_combine(neg, pos, 7.5))
    # the added direction is orthogonal to d_pos per sample
    w = torch.tensor([[-1.0, 0.0], [-2.0, 0.0]])
    extra = perp_neg_combine(neg, pos, comps, w, 1.0) - pos
    inner = (extra * (pos - neg)).flatten(1).sum(1)
    assert torch.allclose(inner, torch.zeros(2), atol=1e-4)
    p = perpendicular(comps[0], pos)
    assert torch.allclose((p * pos).flatten(1).sum(1), torch.zeros(2), atol=1e-4)


@pytest.mark.parametrize("n,edges", [
    (5, [20, 212, 404, 596, 788, 980]), (4, [20, 260, 500, 740, 980]), (6, [20, 180, 340, 500, 660, 820, 980]),
])
def test_uniform_edges_official_values(n, edges):
    assert uniform_edges(n, SD_GRID) == edges
    assert all(b - a == (980 - 20) / n for a, b in zip(edges, edges[1:]))


@pytest.mark.parametrize("n,edges", [
    (5, [20, 150, 311, 503, 726, 980]), (4, [20, 150, 353, 629, 980]), (6, [20, 150, 292, 446, 612, 790, 980]),
])
def test_monotonic_edges_official_values(n, edges):
    got = monotonic_edges(n, 150)
    assert got == edges
    lengths = [b - a for a, b in zip(got, got[1:])][:-1]
    assert lengths == sorted(lengths) and lengths[0] == 130  # Sec. 4.3: increasing, first = t_tau


def test_monotonic_edges_reject_impossible_threshold():
    with pytest.raises(ValueError, match="t_threshold"):
        monotonic_edges(8, 150)


def test_sctd_timesteps_respect_segment_rules():
    cfg = type("G", (), {"t_range": [0.02, 0.5], "max_t_range": 0.98})()
    window = TimestepWindow.from_config(cfg, 1000, slide_lower=True)
    assert window.bounds(1.0) == (500, 980) and window.bounds(0.0) == (20, 500)
    edges = uniform_edges(5, SD_GRID)
    g = torch.Generator().manual_seed(0)
    for rate in (1.0, 0.5, 0.0):
        low, high = window.bounds(rate)
        for _ in range(200):
            ts = sample_sctd_timesteps(window, edges, rate, 80, SD_GRID, g)
            assert ts.edge in edges[:-1] and ts.edge == segment_start(edges, ts.t)
            assert ts.t >= ts.edge + 80 and ts.edge + 10 <= ts.s < ts.t - 10
            assert ts.t >= low + 1 and ts.t < max(high + 1, ts.edge + 81)  # values = indices + 1


def test_warm_up_rate():
    assert warm_up_rate(0, 1500) == 1.0 and warm_up_rate(750, 1500) == 0.5 and warm_up_rate(3000, 1500) == 0.0


def test_sds_residual_equals_sctd_rewriting(schedule):
    """Supplementary C-D (Eq. 17-21): with z_t = alpha_t z0 + sigma_t eps and G^m the Eq. 5 step,
    (self + cross + generative prior) / c(t, s_m) == eps_null + (w + 1)(eps_y - eps_null) - eps exactly,
    whatever the predictions and whatever z_s is."""
    g = torch.Generator().manual_seed(4)
    b, w = 3, 7.5
    z0, eps = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    eps_null, eps_y = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    t, s, e = _t(611, b), _t(540, b), _t(404, b)
    z_t, z_e = schedule.add_noise(z0, eps, t), schedule.add_noise(z0, eps, e)
    z_s = schedule.step(z_t, eps_y, t, s)
    g_s_null = schedule.step(z_s, torch.randn(b, 4, 8, 8, generator=g), s, e)
    terms = consistency_terms(z_e, g_s_null, schedule.step(z_t, eps_null, t, e), schedule.step(z_t, eps_y, t, e), w)
    rewritten = sum(terms) / schedule.step_scale(t, e).view(-1, 1, 1, 1)
    sds = cfg_combine(eps_null, eps_y, w + 1.0) - eps
    torch.testing.assert_close(rewritten, sds, rtol=1e-3, atol=1e-3)


def test_mixture_denoiser_matches_monte_carlo():
    """E[x | z_t] of a 2-component mixture in 2-D against importance-sampled Monte Carlo."""
    g = torch.Generator().manual_seed(5)
    means = torch.tensor([[[0.6, -0.2], [-0.5, 0.4]]])  # [B=1, K=2, D=2]
    log_w = torch.log(torch.tensor([0.3, 0.7]))
    std, alpha, sigma = 0.3, torch.tensor([0.8]), torch.tensor([0.6])
    z_t = torch.tensor([[0.2, 0.1]])
    n = 400_000
    comp = torch.multinomial(log_w.exp(), n, replacement=True, generator=g)
    x = means[0, comp] + std * torch.randn(n, 2, generator=g)
    logp = -((z_t - alpha * x) ** 2).sum(1) / (2 * sigma**2)
    weights = torch.softmax(logp.double(), 0).float()
    mc = (weights[:, None] * x).sum(0, keepdim=True)
    exact = mixture_posterior_mean(z_t, alpha, sigma, means, log_w, std)
    torch.testing.assert_close(exact, mc, atol=5e-3, rtol=0)
    eps = mixture_eps(z_t, alpha, sigma, means, log_w, std)
    torch.testing.assert_close(eps, (z_t - alpha * exact) / sigma)


def test_single_gaussian_denoiser_closed_form():
    mu = torch.tensor([[[1.0, -1.0, 0.5]]])
    alpha, sigma, std = torch.tensor([0.5]), torch.tensor([math.sqrt(0.75)]), 0.2
    z = torch.tensor([[0.3, 0.0, -0.4]])
    got = mixture_posterior_mean(z, alpha, sigma, mu, torch.zeros(1), std)
    gain = alpha * std**2 / (alpha**2 * std**2 + sigma**2)
    torch.testing.assert_close(got, mu[:, 0] + gain * (z - alpha * mu[:, 0]))
