"""CPU tests of the PyTorch reference rasterizer, the render() front end and the depth normalisation."""
from __future__ import annotations

import math

import pytest
import torch

from gaussian_renderer import normalized_disparity, render
from gaussian_renderer.torch_backend import (
    _rasterize_pixels_dense,
    project_gaussians,
    quat_scale_to_covar,
    rasterize_pixels,
    rasterize_torch,
    sh_to_rgb,
    spherical_harmonics,
)
from gaussian_renderer.types import RasterizeInputs
from scene.camera_sampler import orbit_cameras
from scene.gaussian_tensors import GaussianTensors

SH_C0 = 0.28209479177387814


def _front_camera(size: int = 33, fov: float = 0.6, radius: float = 3.0, dtype=torch.float32):
    one = torch.ones(1, dtype=dtype)
    return orbit_cameras(radius * one, 90.0 * one, 0.0 * one, fov * one, size, size)


def _gaussians(means, scales, opacities, colors, dtype=torch.float32, quats=None) -> GaussianTensors:
    means = torch.as_tensor(means, dtype=dtype)
    n = means.shape[0]
    scales = torch.as_tensor(scales, dtype=dtype).expand(n, 3).clone()
    colors = torch.as_tensor(colors, dtype=dtype).reshape(n, 3)
    if quats is None:
        quats = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=dtype).expand(n, 4).clone()
    return GaussianTensors(
        means=means,
        quats=quats,
        scales=scales,
        opacities=torch.as_tensor(opacities, dtype=dtype),
        sh_coeffs=((colors - 0.5) / SH_C0)[:, None, :],
        sh_degree=0,
    )


def _random_scene(n: int, seed: int, dtype=torch.float32, sh_degree: int = 1) -> GaussianTensors:
    g = torch.Generator().manual_seed(seed)
    k = (sh_degree + 1) ** 2
    return GaussianTensors(
        means=(torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 1.2,
        quats=torch.randn(n, 4, generator=g, dtype=dtype),
        scales=0.05 + 0.15 * torch.rand(n, 3, generator=g, dtype=dtype),
        opacities=0.1 + 0.8 * torch.rand(n, generator=g, dtype=dtype),
        sh_coeffs=0.5 * torch.randn(n, k, 3, generator=g, dtype=dtype),
        sh_degree=sh_degree,
    )


def test_single_gaussian_centre_pixel_and_projection():
    cams = _front_camera()  # 33x33: the principal point is the centre of pixel (16, 16)
    colour = torch.tensor([0.2, 0.6, 0.9])
    bg = torch.tensor([0.1, 0.3, 0.0])
    out = render(_gaussians([[0.0, 0.0, 0.0]], 0.2, [0.7], colour), cams, bg, backend="torch")
    expected = colour * 0.7 + 0.3 * bg
    torch.testing.assert_close(out.rgb[0, :, 16, 16], expected, atol=1e-5, rtol=0)
    assert out.alpha[0, 0, 16, 16].item() == pytest.approx(0.7, abs=1e-5)
    assert out.radii[0, 0].item() > 0

    # Off-centre mean: the front camera (at +y, looking at -y, z up) has camera axes
    # x = -X, y = -Z, z = 3 - Y in world coordinates.
    point = torch.tensor([[0.3, 0.4, -0.2]])
    out = render(_gaussians(point, 0.05, [0.5], colour), cams, bg, backend="torch")
    x_c, y_c, z_c = -0.3, 0.2, 3.0 - 0.4
    focal = 0.5 * 33 / math.tan(0.3)
    expected_uv = torch.tensor([focal * x_c / z_c + 16.5, focal * y_c / z_c + 16.5])
    torch.testing.assert_close(out.means2d[0, 0], expected_uv, atol=1e-4, rtol=0)
    u, v = (int(c) for c in expected_uv)  # pixel containing the projected mean is the brightest
    alpha = out.alpha[0, 0]
    assert alpha[v, u] == alpha.max()


def test_nearer_gaussian_occludes_regardless_of_input_order():
    cams = _front_camera()
    red, blue = [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]
    bg = torch.tensor([0.0, 1.0, 0.0])
    near_far = _gaussians([[0.0, 0.5, 0.0], [0.0, -0.5, 0.0]], 0.15, [0.8, 0.8], [red, blue])
    far_near = _gaussians([[0.0, -0.5, 0.0], [0.0, 0.5, 0.0]], 0.15, [0.8, 0.8], [blue, red])
    expected = 0.8 * torch.tensor(red) + 0.2 * 0.8 * torch.tensor(blue) + 0.04 * bg
    for scene in (near_far, far_near):
        out = render(scene, cams, bg, backend="torch")
        torch.testing.assert_close(out.rgb[0, :, 16, 16], expected, atol=1e-5, rtol=0)
        assert out.alpha[0, 0, 16, 16].item() == pytest.approx(0.96, abs=1e-5)
    viewmats, ks = cams.world_to_camera, cams.intrinsics()
    _, depth, _, _, _ = rasterize_torch(RasterizeInputs(near_far, viewmats, ks, bg[None], 33, 33))
    assert depth[0, 16, 16, 0].item() == pytest.approx(2.5 * 0.8 + 3.5 * 0.16, abs=1e-4)


def test_alpha_cap_threshold_and_early_stop():
    dtype = torch.float64
    cams = _front_camera(dtype=dtype)
    bg = torch.tensor([0.0, 1.0, 0.0], dtype=dtype)
    red = [1.0, 0.0, 0.0]
    capped = render(_gaussians([[0.0, 0.0, 0.0]], 0.2, [0.999], red, dtype=dtype), cams, bg, backend="torch")
    assert capped.alpha[0, 0, 16, 16].item() == pytest.approx(0.99, abs=1e-12)
    faint = render(_gaussians([[0.0, 0.0, 0.0]], 0.2, [0.9 / 255], red, dtype=dtype), cams, bg, backend="torch")
    assert faint.alpha.abs().max().item() == 0.0
    # Three 0.98-opaque Gaussians in a row: T = 0.02, 4e-4, then 8e-6 < 1e-4, so the third is skipped.
    colours = torch.eye(3, dtype=dtype)
    stack = _gaussians([[0.0, 0.5, 0.0], [0.0, 0.0, 0.0], [0.0, -0.5, 0.0]], 0.2, [0.98] * 3, colours, dtype=dtype)
    out = render(stack, cams, bg, backend="torch")
    expected = 0.98 * colours[0] + 0.02 * 0.98 * colours[1] + 4e-4 * bg
    torch.testing.assert_close(out.rgb[0, :, 16, 16], expected, atol=1e-9, rtol=0)
    assert out.alpha[0, 0, 16, 16].item() == pytest.approx(1 - 4e-4, abs=1e-9)


def test_outputs_ranges_and_shapes():
    scene = _random_scene(40, seed=1)
    one = torch.ones(2)
    cams = orbit_cameras(3.0 * one, torch.tensor([90.0, 60.0]), torch.tensor([0.0, 135.0]), 0.6 * one, 24, 20)
    out = render(scene, cams, torch.rand(2, 3), backend="torch")
    assert out.rgb.shape == (2, 3, 20, 24)
    assert out.depth.shape == out.alpha.shape == (2, 1, 20, 24)
    assert out.means2d.shape == (2, 40, 2) and out.radii.shape == (2, 40)
    assert out.radii.dtype == torch.int32
    assert out.alpha.min() >= 0 and out.alpha.max() <= 1
    assert out.depth.min() >= 0 and out.depth.max() <= 1
    assert out.rgb.min() >= 0
    assert out.alpha.max() > 0.5


def test_behind_camera_is_culled():
    cams = _front_camera()
    behind = _gaussians([[0.0, 3.5, 0.0]], 0.3, [0.9], [1.0, 0.0, 0.0])  # y > radius: behind the camera
    out = render(behind, cams, torch.zeros(3), backend="torch")
    assert out.radii[0, 0].item() == 0
    assert out.alpha.abs().max().item() == 0.0


def test_normalized_disparity_formula():
    tan_half = 0.5  # focal = 1 / (2 tan(fov_x / 2)) = 1
    fov_x = torch.full((2,), 2 * math.atan(tan_half))
    depth = torch.tensor([[[[2.0, 3.0], [1.0, 0.0]]], [[[1.0, 2.0], [0.5, 0.0]]]])
    alpha = torch.tensor([[[[1.0, 0.95], [0.5, 0.0]]], [[[0.5, 0.5], [0.5, 0.2]]]])
    out = normalized_disparity(depth, alpha, fov_x)
    # Image 0: opaque pixels (T <= 0.1) are the top row, min over them = 1 / 3.50001.
    d0 = torch.tensor([1 / 2.00001, 1 / 3.50001, 1 / 6.00001, 1 / 10.00001])
    lo0, hi0 = 1 / 3.50001, 1 / 2.00001
    # Image 1: no opaque pixel, the global min is used.
    d1 = torch.tensor([1 / 6.00001, 1 / 7.00001, 1 / 5.50001, 1 / 8.00001])
    lo1, hi1 = 1 / 8.00001, 1 / 5.50001
    expected = torch.stack([((d0 - lo0) / (hi0 - lo0)).clamp(0, 1), (d1 - lo1) / (hi1 - lo1)]).reshape(2, 1, 2, 2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert out[0, 0, 0, 0] == 1 and out[0, 0, 0, 1] == 0 and out[0, 0, 1, 1] == 0
    empty = normalized_disparity(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), fov_x[:1])
    assert torch.isfinite(empty).all()


def test_background_per_camera():
    scene = _gaussians([[0.0, 0.0, 0.0]], 0.1, [0.9], [1.0, 1.0, 1.0])
    cams = orbit_cameras(torch.full((2,), 3.0), torch.full((2,), 90.0), torch.zeros(2), torch.full((2,), 0.6), 16, 16)
    bgs = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    out = render(scene, cams, bgs, backend="torch")
    torch.testing.assert_close(out.rgb[:, :, 0, 0], bgs)
    shared = render(scene, cams, bgs[0], backend="torch")
    torch.testing.assert_close(shared.rgb[1], out.rgb[0])


def test_batch_equals_single_renders():
    scene = _random_scene(30, seed=2, sh_degree=2)
    cams = orbit_cameras(
        torch.tensor([3.0, 2.5]), torch.tensor([80.0, 100.0]), torch.tensor([-30.0, 170.0]),
        torch.tensor([0.6, 0.45]), 20, 16,
    )
    bg = torch.tensor([[0.2, 0.3, 0.4], [0.9, 0.1, 0.0]])
    both = render(scene, cams, bg, backend="torch")
    for i in range(2):
        single = render(scene, cams[i], bg[i], backend="torch")
        for name in ("rgb", "depth", "alpha", "means2d"):
            torch.testing.assert_close(getattr(single, name)[0], getattr(both, name)[i], atol=1e-5, rtol=1e-5)
        assert torch.equal(single.radii[0], both.radii[i])


def test_pixel_chunking_is_exact():
    scene = _random_scene(20, seed=3)
    cams = _front_camera(size=12)
    inputs = RasterizeInputs(scene, cams.world_to_camera, cams.intrinsics(), torch.rand(1, 3), 12, 12)
    whole = rasterize_torch(inputs)
    chunked = rasterize_torch(inputs, max_chunk_elements=20 * 7)  # 7 pixels per chunk
    for a, b in zip(whole[:3], chunked[:3]):
        torch.testing.assert_close(a, b)


def test_gradcheck_float64():
    dtype = torch.float64
    scene = _gaussians(
        [[0.0, 0.0, 0.0], [0.25, 0.3, 0.1], [-0.2, -0.3, -0.15]], 0.25, [0.6, 0.5, 0.7],
        [[0.9, 0.2, 0.1], [0.1, 0.8, 0.3], [0.2, 0.3, 0.9]], dtype=dtype,
    )
    scene.scales = torch.tensor([[0.25, 0.2, 0.3], [0.3, 0.25, 0.2], [0.2, 0.3, 0.25]], dtype=dtype)
    scene.quats = torch.tensor([[1.0, 0.2, 0.0, 0.1], [0.9, 0.0, 0.3, 0.0], [1.0, 0.0, 0.0, -0.2]], dtype=dtype)
    cams = _front_camera(size=8, fov=0.6, radius=2.5, dtype=dtype)
    bg = torch.tensor([0.3, 0.5, 0.7], dtype=dtype)
    inputs = [t.clone().requires_grad_(True) for t in (scene.means, scene.scales, scene.opacities, scene.sh_coeffs)]

    def fn(means, scales, opacities, sh):
        g = GaussianTensors(means, scene.quats, scales, opacities, sh, 0)
        out = render(g, cams, bg, backend="torch", depth_grad_to_z=True)  # the exact derivative
        return out.rgb, out.alpha, out.depth

    with torch.no_grad():
        out = fn(*inputs)
        assert out[1].max() > 0.5 and out[1].min() < 0.5  # the scene covers part of the image
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_means2d_grad_matches_finite_difference():
    dtype = torch.float64
    scene = _random_scene(4, seed=4, dtype=dtype)
    cams = orbit_cameras(
        torch.tensor([2.0, 2.2], dtype=dtype), torch.tensor([90.0, 70.0], dtype=dtype),
        torch.tensor([0.0, 60.0], dtype=dtype), torch.tensor([0.7, 0.7], dtype=dtype), 10, 10,
    )
    bg = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.5, 0.5]], dtype=dtype)
    weights = torch.rand(2, 4, 10, 10, generator=torch.Generator().manual_seed(0), dtype=dtype)
    means = scene.means.clone().requires_grad_(True)
    out = render(GaussianTensors(means, scene.quats, scene.scales, scene.opacities, scene.sh_coeffs, 1),
                 cams, bg, backend="torch")
    loss = (torch.cat([out.rgb, out.alpha], dim=1) * weights).sum()
    loss.backward()
    grad = out.means2d.grad
    assert grad is not None and grad.shape == (2, 4, 2) and grad.abs().max() > 0

    # Re-run the rasterization stage alone with the projected centres perturbed directly.
    with torch.no_grad():
        viewmats, ks = cams.world_to_camera.to(dtype), cams.intrinsics().to(dtype)
        means2d, conics, depths, _, visible = project_gaussians(
            scene.means, quat_scale_to_covar(scene.quats, scene.scales), viewmats, ks, 10, 10, 0.01, 100.0
        )
        centers = cams.camera_centers().to(dtype)
        feats = torch.cat([sh_to_rgb(scene.means, scene.sh_coeffs, 1, centers), depths[..., None]], dim=-1)
        opac = torch.where(visible, scene.opacities.expand(2, -1), torch.zeros_like(depths))

        def loss_at(m2d):
            f, t = rasterize_pixels(m2d, conics, opac, feats, depths, 10, 10)
            rgb = f[..., :3] + t[..., None] * bg[:, None, None, :]
            img = torch.cat([rgb.permute(0, 3, 1, 2), (1 - t)[:, None]], dim=1)
            return (img * weights).sum()

        assert loss_at(means2d).item() == pytest.approx(loss.item(), rel=1e-12)
        h = 1e-6
        numeric = torch.zeros_like(means2d)
        for idx in torch.cartesian_prod(torch.arange(2), torch.arange(4), torch.arange(2)):
            b, n, k = idx.tolist()
            step = torch.zeros_like(means2d)
            step[b, n, k] = h
            numeric[b, n, k] = (loss_at(means2d + step) - loss_at(means2d - step)) / (2 * h)
    torch.testing.assert_close(grad, numeric, atol=1e-6, rtol=1e-5)


def test_sh_and_projection_match_gsplat_reference_implementation():
    ref = pytest.importorskip("gsplat.cuda._torch_impl")
    g = torch.Generator().manual_seed(5)
    dirs = torch.nn.functional.normalize(torch.randn(50, 3, generator=g, dtype=torch.float64), dim=-1)
    coeffs = torch.randn(50, 16, 3, generator=g, dtype=torch.float64)
    for degree in range(4):
        torch.testing.assert_close(
            spherical_harmonics(degree, dirs, coeffs), ref._spherical_harmonics(degree, dirs, coeffs)
        )
    scene = _random_scene(60, seed=6, dtype=torch.float64)
    scene.means = scene.means * 3  # some Gaussians leave the frustum: exercises the clamp
    cams = orbit_cameras(
        torch.tensor([2.0, 2.5], dtype=torch.float64), torch.tensor([90.0, 50.0], dtype=torch.float64),
        torch.tensor([10.0, -100.0], dtype=torch.float64), torch.tensor([0.5, 0.8], dtype=torch.float64), 32, 24,
    )
    covars = quat_scale_to_covar(scene.quats, scene.scales)
    viewmats, ks = cams.world_to_camera.double(), cams.intrinsics().double()
    means2d, conics, depths, _, _ = project_gaussians(scene.means, covars, viewmats, ks, 32, 24, 0.01, 100.0)
    _, ref_means2d, ref_depths, ref_conics, _ = ref._fully_fused_projection(
        scene.means, covars, viewmats, ks, 32, 24, eps2d=0.3
    )
    front = depths > 0.01
    torch.testing.assert_close(means2d[front], ref_means2d[front])
    torch.testing.assert_close(conics[front], ref_conics[front])
    torch.testing.assert_close(depths, ref_depths)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("means", torch.zeros(3, 2), "gaussians.means must be [N, 3]"),
        ("quats", torch.zeros(3, 3), "gaussians.quats must be"),
        ("scales", torch.zeros(2, 3), "gaussians.scales must be"),
        ("opacities", torch.zeros(3, 1), "gaussians.opacities must be"),
        ("sh_coeffs", torch.zeros(3, 1, 4), "gaussians.sh_coeffs must be"),
        ("sh_degree", 1, "needs K >= 4"),
    ],
)
def test_bad_gaussian_shapes(field, value, message):
    scene = _random_scene(3, seed=7, sh_degree=0)
    setattr(scene, field, value)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        render(scene, _front_camera(size=8), torch.zeros(3), backend="torch")


def test_bad_background_backend_and_device():
    scene = _random_scene(3, seed=8, sh_degree=0)
    cams = _front_camera(size=8)
    with pytest.raises(ValueError, match=r"background must be \[3\] or \[B=1, 3\], got \(2, 3\)"):
        render(scene, cams, torch.zeros(2, 3), backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        render(scene, cams, torch.zeros(3), backend="cuda")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        render(scene, cams, torch.zeros(3), backend="gsplat")
    scene.opacities = scene.opacities.to(torch.device("meta"))
    with pytest.raises(ValueError, match="gaussians.opacities is on meta"):
        render(scene, cams, torch.zeros(3), backend="torch")


def test_rasterize_inputs_check_the_cameras_and_broadcast_the_background():
    scene = _random_scene(3, seed=9, sh_degree=0)
    cams = _front_camera(size=8)
    viewmats, ks = cams.world_to_camera, cams.intrinsics()
    inputs = RasterizeInputs(scene, viewmats, ks, torch.tensor([0.1, 0.2, 0.3]), 8, 8)
    assert inputs.backgrounds.shape == (1, 3) and inputs.backgrounds[0, 2].item() == pytest.approx(0.3)
    with pytest.raises(ValueError, match=r"viewmats must be \[B, 4, 4\], got \(1, 3, 4\)"):
        RasterizeInputs(scene, viewmats[:, :3], ks, torch.zeros(3), 8, 8)
    with pytest.raises(ValueError, match=r"Ks must be \[B=1, 3, 3\], got \(2, 3, 3\)"):
        RasterizeInputs(scene, viewmats, ks.expand(2, 3, 3), torch.zeros(3), 8, 8)
    with pytest.raises(ValueError, match="image size must be positive, got 0x8"):
        RasterizeInputs(scene, viewmats, ks, torch.zeros(3), 0, 8)


def _stress_scene(dtype) -> GaussianTensors:
    """~300 Gaussians: an overlapping cluster (opaque enough for the early stop), Gaussians scattered
    partly or wholly off-screen, and some behind the front camera (at +y, radius 3)."""
    g = torch.Generator().manual_seed(11)
    cluster = 0.3 * torch.randn(200, 3, generator=g, dtype=dtype)
    scattered = (torch.rand(70, 3, generator=g, dtype=dtype) - 0.5) * torch.tensor([5.0, 2.0, 5.0], dtype=dtype)
    behind = torch.rand(30, 3, generator=g, dtype=dtype) * torch.tensor([1.0, 2.0, 1.0], dtype=dtype)
    behind = behind + torch.tensor([-0.5, 2.9, -0.5], dtype=dtype)  # y from 2.9 (near plane) to 4.9
    means = torch.cat([cluster, scattered, behind])
    n = means.shape[0]
    opacities = torch.cat([0.3 + 0.69 * torch.rand(200, generator=g, dtype=dtype),
                           0.02 + 0.9 * torch.rand(100, generator=g, dtype=dtype)])
    return GaussianTensors(
        means=means,
        quats=torch.randn(n, 4, generator=g, dtype=dtype),
        scales=0.02 + 0.2 * torch.rand(n, 3, generator=g, dtype=dtype),
        opacities=opacities,
        sh_coeffs=0.5 * torch.randn(n, 4, 3, generator=g, dtype=dtype),
        sh_degree=1,
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("size", [(32, 32), (30, 26)])
@pytest.mark.parametrize("tile_size, max_chunk", [(None, 1 << 23), (4, 1 << 23), (8, 1 << 23), (4, 3000)])
def test_sparse_rasterizer_matches_dense(monkeypatch, dtype, size, tile_size, max_chunk):
    from gaussian_renderer import torch_backend

    scene = _stress_scene(dtype)
    width, height = size
    cams = orbit_cameras(
        torch.tensor([3.0, 2.6], dtype=dtype), torch.tensor([90.0, 65.0], dtype=dtype),
        torch.tensor([0.0, 140.0], dtype=dtype), torch.tensor([0.7, 0.6], dtype=dtype), width, height,
    )
    viewmats, ks = cams.world_to_camera.to(dtype), cams.intrinsics().to(dtype)
    bg = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.3, 0.0]], dtype=dtype)
    weights = torch.rand(2, height, width, 5, generator=torch.Generator().manual_seed(12), dtype=dtype)

    def run(pixel_fn):
        monkeypatch.setattr(torch_backend, "rasterize_pixels", pixel_fn)
        inputs = [t.clone().requires_grad_(True) for t in (scene.means, scene.scales, scene.opacities, scene.sh_coeffs)]
        means, scales, opacities, sh = inputs
        gaussians = GaussianTensors(means, scene.quats, scales, opacities, sh, 1)
        rgb, depth, alpha, means2d, radii = torch_backend.rasterize_torch(
            RasterizeInputs(gaussians, viewmats, ks, bg, width, height)
        )
        (torch.cat([rgb, depth, alpha], dim=-1) * weights).sum().backward()
        return (rgb, depth, alpha, radii), [t.grad for t in inputs] + [means2d.grad]

    sparse = torch_backend.rasterize_pixels

    def sparse_fn(*args):  # several chunks when max_chunk is small
        return sparse(*args[:7], max_chunk_elements=max_chunk, tile_size=tile_size)

    (d_rgb, d_depth, d_alpha, radii), dense_grads = run(torch_backend._rasterize_pixels_dense)
    (s_rgb, s_depth, s_alpha, _), sparse_grads = run(sparse_fn)

    # The scene exercises culling (behind the camera, off-screen), partial visibility and the early stop.
    assert (radii == 0).any() and (radii > 0).sum() > 250
    assert d_alpha.max() > 1 - 1e-3 and d_alpha.min() < 0.5
    for sparse, dense in ((s_rgb, d_rgb), (s_depth, d_depth), (s_alpha, d_alpha)):
        assert (sparse - dense).abs().max().item() < 1e-5
    for sparse, dense in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4 * dense.abs().max().item())


def test_sparse_rasterizer_gradcheck_with_chunks_and_partial_tiles():
    """Hand-written backward of the sparse compositing, including several chunks (checkpointed)
    and tiles that stick out of a 10 x 7 image."""
    dtype = torch.float64
    g = torch.Generator().manual_seed(13)
    b, n = 2, 5
    means2d = torch.rand(b, n, 2, generator=g, dtype=dtype) * torch.tensor([10.0, 7.0], dtype=dtype)
    a = 0.2 + 0.3 * torch.rand(b, n, generator=g, dtype=dtype)
    c = 0.2 + 0.3 * torch.rand(b, n, generator=g, dtype=dtype)
    off = 0.1 * (torch.rand(b, n, generator=g, dtype=dtype) - 0.5)
    conics = torch.stack([a, off, c], dim=-1)
    opacities = 0.3 + 0.6 * torch.rand(b, n, generator=g, dtype=dtype)
    features = torch.rand(b, n, 4, generator=g, dtype=dtype)
    depths = torch.rand(b, n, generator=g, dtype=dtype) + 1.0
    inputs = [t.clone().requires_grad_(True) for t in (means2d, conics, opacities, features)]

    def fn(m, cn, o, f):
        feats, trans = rasterize_pixels(m, cn, o, f, depths, 10, 7, max_chunk_elements=16 * 16, tile_size=4)
        return feats, trans

    with torch.no_grad():
        dense = _rasterize_pixels_dense(means2d, conics, opacities, features, depths, 10, 7)
        sparse = fn(means2d, conics, opacities, features)
    for s, d in zip(sparse, dense):
        torch.testing.assert_close(s, d, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
