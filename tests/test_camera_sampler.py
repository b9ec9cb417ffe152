"""Tests of the orbit cameras, the official training-camera sampler and the evaluation rings."""
from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch

from scene.camera_sampler import (
    OrbitCameraSampler,
    evaluation_ring,
    gen_random_pos,
    orbit_cameras,
    wrap_degrees,
)


def bagel_camera_cfg(**overrides) -> SimpleNamespace:
    cfg = dict(
        radius_range=[5.2, 5.5], max_radius_range=[3.5, 5.0], default_radius=3.5,
        theta_range=[45, 105], max_theta_range=[45, 105],
        phi_range=[-180, 180], max_phi_range=[-180, 180],
        fovy_range=[0.32, 0.60], max_fovy_range=[0.16, 0.60],
        rand_cam_gamma=1.0, jitter_pose=True, jitter_center=0.05, jitter_target=0.05, jitter_up=0.01,
        image_w=64, image_h=64, default_polar=90.0, default_azimuth=0.0, default_fovy=0.55, render_45=True,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def bagel_optim_cfg(**overrides) -> SimpleNamespace:
    cfg = dict(
        use_progressive=False, progressive_view_iter=500, scale_up_cameras_iter=500,
        scale_up_factor=0.95, fovy_scale_up_factor=[0.75, 1.1], phi_scale_up_factor=1.5,
    )
    cfg.update(overrides)
    return SimpleNamespace(**cfg)


def _sampler(seed: int = 0, **cam_overrides) -> OrbitCameraSampler:
    return OrbitCameraSampler(
        bagel_camera_cfg(**cam_overrides), bagel_optim_cfg(), torch.Generator().manual_seed(seed), stack_size=10
    )


def _project(cams, points):  # [B, 3] world points -> [B, 2] pixels, [B] depth
    homo = torch.cat([points, torch.ones(points.shape[0], 1)], dim=-1)
    cam = (cams.world_to_camera @ homo[..., None]).squeeze(-1)[:, :3]
    uvw = (cams.intrinsics() @ cam[..., None]).squeeze(-1)
    return uvw[:, :2] / uvw[:, 2:], cam[:, 2]


def test_wrap_degrees():
    angles = torch.tensor([0.0, 180.0, -180.0, 190.0, 360.0, 270.0, -90.0, 540.0])
    expected = torch.tensor([0.0, 180.0, 180.0, -170.0, 0.0, -90.0, -90.0, 180.0])
    torch.testing.assert_close(wrap_degrees(angles), expected)


def test_front_camera_on_plus_y_looking_at_origin():
    cams = orbit_cameras(torch.tensor([3.0]), torch.tensor([90.0]), torch.tensor([0.0]), torch.tensor([0.6]), 64, 48)
    torch.testing.assert_close(cams.camera_centers()[0], torch.tensor([0.0, 3.0, 0.0]), atol=1e-6, rtol=0)
    z_axis = cams.world_to_camera[0, 2, :3]  # camera +z in world coordinates
    torch.testing.assert_close(z_axis, torch.tensor([0.0, -1.0, 0.0]), atol=1e-6, rtol=0)
    uv, depth = _project(cams, torch.zeros(1, 3))
    torch.testing.assert_close(uv[0], torch.tensor([32.0, 24.0]), atol=1e-5, rtol=0)
    assert depth.item() == pytest.approx(3.0)
    up_uv, _ = _project(cams, torch.tensor([[0.0, 0.0, 0.5]]))
    assert up_uv[0, 1] < 24.0  # world up is image up (OpenCV y points down)
    right_uv, _ = _project(cams, torch.tensor([[-0.5, 0.0, 0.0]]))
    assert right_uv[0, 0] > 32.0  # facing -y with z up, the viewer's right is -x
    # fov_x follows from fov_y through the focal length.
    assert math.tan(cams.fov_x.item() / 2) == pytest.approx(math.tan(0.3) * 64 / 48, rel=1e-5)
    assert cams.azimuth_deg.item() == 0.0 and cams.polar_deg.item() == 90.0


def test_azimuth_90_on_plus_x_and_overhead_polar():
    cams = orbit_cameras(
        torch.tensor([2.0, 2.0, 2.0]), torch.tensor([90.0, 90.0, 30.0]), torch.tensor([90.0, 270.0, 0.0]),
        torch.full((3,), 0.5), 32, 32,
    )
    centres = cams.camera_centers()
    torch.testing.assert_close(centres[0], torch.tensor([2.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(centres[1], torch.tensor([-2.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(centres[2], torch.tensor([0.0, 1.0, math.sqrt(3.0)]), atol=1e-6, rtol=0)
    torch.testing.assert_close(cams.azimuth_deg, torch.tensor([90.0, -90.0, 0.0]))
    uv, _ = _project(cams, torch.zeros(3, 3))
    torch.testing.assert_close(uv, torch.full((3, 2), 16.0), atol=1e-4, rtol=0)
    rot = cams.world_to_camera[:, :3, :3]
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(3, 3, 3), atol=1e-6, rtol=0)
    assert torch.linalg.det(rot).allclose(torch.ones(3))


def test_sampled_values_within_ranges():
    sampler = _sampler(seed=1, jitter_pose=False, phi_range=[-80, 80], max_phi_range=[-180, 180], rand_cam_gamma=1.5)
    cams = sampler.sample(200)
    assert cams.radius.min() >= 5.2 and cams.radius.max() <= 5.5
    assert cams.polar_deg.min() >= 45 and cams.polar_deg.max() <= 105
    assert cams.azimuth_deg.min() >= -80 and cams.azimuth_deg.max() <= 80
    assert cams.azimuth_deg.min() < -40 and cams.azimuth_deg.max() > 40  # both signs after the +360 wrap
    assert cams.fov_y.min() >= 0.32 and cams.fov_y.max() <= 0.60
    assert (cams.width, cams.height) == (64, 64)
    # Without jitter the pose is exactly the sampled spherical position.
    c = cams.camera_centers()
    torch.testing.assert_close(c.norm(dim=-1), cams.radius, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.rad2deg(torch.acos(c[:, 2] / cams.radius)), cams.polar_deg, atol=1e-2, rtol=0)
    torch.testing.assert_close(torch.rad2deg(torch.atan2(c[:, 0], c[:, 1])), cams.azimuth_deg, atol=1e-2, rtol=0)


def test_jitter_keeps_cameras_near_their_orbit():
    cams = _sampler(seed=2).sample(100)
    c = cams.camera_centers()
    offset = (c.norm(dim=-1) - cams.radius).abs()
    assert offset.max() < 0.05 and offset.max() > 0  # centre jitter is at most 0.025 per axis
    uv, _ = _project(cams, torch.zeros(100, 3))
    dist = (uv - 32.0).norm(dim=-1)
    assert dist.max() > 0 and dist.max() < 8  # the origin stays near the image centre


def test_gen_random_pos_gamma():
    g = torch.Generator().manual_seed(3)
    uniform = gen_random_pos(20000, (10.0, 30.0), 1.0, g)
    peaked = gen_random_pos(20000, (10.0, 30.0), 1.5, g)
    for x in (uniform, peaked):
        assert x.min() >= 10 and x.max() <= 30
        assert x.mean().item() == pytest.approx(20.0, abs=0.2)
    assert (uniform - 20).abs().mean().item() == pytest.approx(5.0, abs=0.15)  # E|u| * 10
    assert (peaked - 20).abs().mean().item() == pytest.approx(4.0, abs=0.15)  # E[u^1.5] * 10 = 10 / 2.5


def test_stack_semantics_one_fov_per_stack():
    sampler = _sampler(seed=4)
    first = sampler.sample(1)
    assert len(sampler.stack) == 9
    popped = first.world_to_camera[0]
    assert not any(torch.equal(popped, m) for m in sampler.stack.world_to_camera)
    batches = [first] + [sampler.sample(4) for _ in range(5)] + [sampler.sample(3)]
    cams = type(first).cat(batches)  # 24 cameras = 2 full stacks + 4
    assert len(cams) == 24 and len(sampler.stack) == 6
    fovs = cams.fov_y
    assert torch.equal(fovs[:10], fovs[:1].expand(10))
    assert torch.equal(fovs[10:20], fovs[10:11].expand(10))
    assert fovs[0] != fovs[10] and fovs[10] != fovs[20]
    assert torch.equal(fovs[20:], fovs[20:21].expand(4))
    assert torch.equal(sampler.stack.fov_y, fovs[20:21].expand(6))
    # Batch 3 (cameras 9..12) mixes the first and the second stack.
    assert fovs[9] != fovs[10]
    flat = cams.world_to_camera.reshape(24, -1)
    assert torch.unique(flat, dim=0).shape[0] == 24  # nothing popped twice


# (step, fovy range, radius range) of the reference table for bagel.
BAGEL_SCHEDULE = [
    (500, (0.24, 0.60), (4.94, 5.225)),
    (1000, (0.18, 0.60), (4.693, 5.0)),
    (1500, (0.16, 0.60), (4.458, 5.0)),
    (2000, (0.16, 0.60), (4.235, 5.0)),
    (2500, (0.16, 0.60), (4.024, 5.0)),
    (3000, (0.16, 0.60), (3.822, 5.0)),
    (3500, (0.16, 0.60), (3.631, 5.0)),
    (4000, (0.16, 0.60), (3.5, 5.0)),
]


def test_progressive_schedule_matches_reference_table():
    sampler = _sampler()
    table = {}
    for step in range(1, 4001):
        changed = sampler.update_ranges(step)
        assert changed == (step % 500 == 0)
        if changed:
            table[step] = (list(sampler.fovy_range), list(sampler.radius_range))
            assert sampler.theta_range == [45.0, 105.0] and sampler.phi_range == [-180.0, 180.0]
    for step, fovy, radius in BAGEL_SCHEDULE:
        got_fovy, got_radius = table[step]
        assert got_fovy == pytest.approx(list(fovy), abs=5e-4), step
        assert got_radius == pytest.approx(list(radius), abs=5e-4), step
    sampler.update_ranges(4500)
    assert sampler.radius_range == pytest.approx([3.5, 5.0]) and sampler.fovy_range == pytest.approx([0.16, 0.6])


def test_progressive_phi_for_head_configs_and_inverted_flag():
    sampler = _sampler(phi_range=[-80, 80], theta_range=[45, 90], max_theta_range=[45, 105])
    sampler.update_ranges(500)
    assert sampler.phi_range == pytest.approx([-120.0, 120.0])
    assert sampler.theta_range == pytest.approx([45.0, 105.0])
    sampler.update_ranges(1000)
    assert sampler.phi_range == pytest.approx([-180.0, 180.0])
    off = OrbitCameraSampler(
        bagel_camera_cfg(), bagel_optim_cfg(use_progressive=True), torch.Generator().manual_seed(0)
    )
    assert not off.update_ranges(500) and off.radius_range == [5.2, 5.5]
    early = OrbitCameraSampler(
        bagel_camera_cfg(), bagel_optim_cfg(progressive_view_iter=1000), torch.Generator().manual_seed(0)
    )
    assert not early.update_ranges(500) and early.update_ranges(1000)


def test_new_ranges_apply_only_to_new_stacks():
    sampler = _sampler(seed=5, jitter_pose=False)
    sampler.sample(2)
    remaining = sampler.stack
    for step in range(500, 4001, 500):
        sampler.update_ranges(step)
    assert sampler.stack is remaining
    old = sampler.sample(8)
    assert old.radius.min() >= 5.2
    new = sampler.sample(10)
    assert new.radius.max() <= 5.0 and new.radius.min() >= 3.5


def test_state_dict_round_trip_continues_the_sequence():
    sampler = _sampler(seed=6)
    sampler.sample(3)
    sampler.update_ranges(500)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    expected = [sampler.sample(4) for _ in range(4)]

    buffer.seek(0)
    resumed = _sampler(seed=123)
    resumed.load_state_dict(torch.load(buffer, weights_only=False))
    assert resumed.radius_range == pytest.approx([4.94, 5.225]) and resumed.fovy_range == pytest.approx([0.24, 0.6])
    for want in expected:
        got = resumed.sample(4)
        for name in ("world_to_camera", "fov_x", "fov_y", "azimuth_deg", "polar_deg", "radius"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_evaluation_rings():
    cfg = bagel_camera_cfg()
    test_views = evaluation_ring(cfg, 8, cfg.render_45)
    assert len(test_views) == 16
    torch.testing.assert_close(test_views.polar_deg, torch.tensor([90.0] * 8 + [60.0] * 8))
    ring = torch.tensor([0.0, 45.0, 90.0, 135.0, 180.0, -135.0, -90.0, -45.0])
    torch.testing.assert_close(test_views.azimuth_deg, torch.cat([ring, ring]))
    torch.testing.assert_close(test_views.radius, torch.full((16,), 3.5))
    torch.testing.assert_close(test_views.fov_y, torch.full((16,), 0.55))
    centres = test_views.camera_centers()
    torch.testing.assert_close(centres[:8, 2], torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(centres[8:, 2], torch.full((8,), 3.5 * 0.5), atol=1e-5, rtol=0)
    torch.testing.assert_close(centres[1], torch.tensor([3.5, 3.5, 0.0]) / math.sqrt(2), atol=1e-5, rtol=0)
    uv, _ = _project(test_views, torch.zeros(16, 3))
    torch.testing.assert_close(uv, torch.full((16, 2), 32.0), atol=1e-4, rtol=0)
    turntable = evaluation_ring(cfg, 120, False, width=32, height=24)
    assert len(turntable) == 120 and (turntable.width, turntable.height) == (32, 24)
    assert torch.all(turntable.polar_deg == 90.0)
